"""Resume is exact and refuses what would make it silently inexact: across epochs the data order, frame draws,
counts, losses and weights equal an uninterrupted run's; a checkpoint missing part of its state, a changed
setting, a torn record or an interrupted process is named in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import tc_llava.train.loop as loop
from tc_llava.train.checkpoint import CheckpointError, StorageError, checkpoint_dirs, checkpoint_problem
from tc_llava.train.loop import train

from conftest import REPO
from test_train import overrides, synthetic, train_cfg  # noqa: F401 (synthetic is a fixture)

# 16 samples an epoch in micro-batches of 4, two per step: 2 steps an epoch, 3 epochs.
EPOCHS = ("data.epoch_size=16", "trainer.grad_accum=2", "trainer.max_steps=null", "trainer.epochs=3",
          "trainer.save_every=1",
          "trainer.keep_last=0", "export.enabled=false", "tuning=lora", "tuning.lora.r=4", "tuning.lora.dropout=0.1")


def reset() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)


def record_batches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], float]]:
    """Each micro-batch the loop draws: its samples' sources and a checksum of its frames (the frame draw)."""
    seen, stream = [], loop.micro_batches

    def recorded(*args):
        for batch in stream(*args):
            seen.append((batch["sources"], round(float(batch["pixel_values"].double().sum()), 3)))
            yield batch

    monkeypatch.setattr(loop, "micro_batches", recorded)
    return seen


def stopped_copy(run: Path, to: Path, step: int) -> Path:
    """``run`` as a run stopped right after checkpoint ``step_{step}`` would have left it."""
    shutil.copytree(run, to, ignore=lambda d, names: [n for n in names if n.startswith("step_")
                                                      and int(n.split("_")[1].split(".")[0]) > step])
    rows = (to / "metrics.jsonl").read_text().splitlines()
    (to / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= step))
    return to


@pytest.fixture(scope="module")
def epochs_run(synthetic, tmp_path_factory) -> tuple[Path, dict, list]:
    """An uninterrupted 3-epoch run with a checkpoint at every step, and the micro-batches it drew."""
    run = tmp_path_factory.mktemp("epochs") / "reference"
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = record_batches(monkeypatch)
        result = train(train_cfg(synthetic, run, *EPOCHS))
    reset()
    assert len(result["losses"]) == 6 and len(seen) == 12
    return run, result, seen


@pytest.mark.parametrize("stop", [2, 3, 4], ids=["epoch-boundary", "mid-epoch-1", "into-epoch-2"])
def test_resume_across_epochs_equals_the_uninterrupted_run(synthetic, epochs_run, tmp_path, monkeypatch, stop):
    reference_dir, reference, drawn = epochs_run
    seen = record_batches(monkeypatch)
    run = stopped_copy(reference_dir, tmp_path / "resumed", stop)
    resumed = train(train_cfg(synthetic, run, *EPOCHS, "resume=latest"))
    assert seen == drawn[2 * stop:]  # the same samples and frame draws, batch by batch
    assert resumed["losses"] == reference["losses"]
    assert resumed["data"] == reference["data"] and resumed["media"] == reference["media"]
    final = "checkpoints/step_6/"
    ours, theirs = (json.loads((d / final / "trainer_state.json").read_text()) for d in (run, reference_dir))
    assert ours["data"] == theirs["data"] and (ours["epoch"], ours["batch_in_epoch"]) == (2, 4)
    a, b = (load_file(d / final / "model.safetensors") for d in (run, reference_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SHORT = ("trainer.max_steps=3", "trainer.save_every=1", "trainer.keep_last=0", "export.enabled=false")


@pytest.fixture(scope="module")
def short_run(synthetic, tmp_path_factory) -> tuple[Path, list[float]]:
    """A 3-step run with checkpoints step_1..step_3."""
    run = tmp_path_factory.mktemp("short") / "run"
    losses = train(train_cfg(synthetic, run, *SHORT))["losses"]
    reset()
    return run, losses


def no_model(monkeypatch) -> None:
    monkeypatch.setattr(loop, "model_from_config", lambda cfg: pytest.fail("the model was loaded"))


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {"random_states_0.pkl": Path.unlink, "scheduler.bin": Path.unlink, "model.safetensors": cut,
          "optimizer.bin": cut}


@pytest.mark.parametrize("name", DAMAGE)
def test_a_checkpoint_missing_part_of_its_state_is_refused_naming_the_file(synthetic, short_run, tmp_path,
                                                                            monkeypatch, name):
    run = tmp_path / "run"
    shutil.copytree(short_run[0], run)
    DAMAGE[name](run / "checkpoints/step_3" / name)
    no_model(monkeypatch)
    with pytest.raises(CheckpointError, match=f"resume=.*step_3: {run}/checkpoints/step_3/{name} (is missing|has "
                                              r"\d+ bytes, its manifest says \d+)"):
        train(train_cfg(synthetic, run, *SHORT, f"resume={run / 'checkpoints/step_3'}"))


def test_latest_skips_a_corrupt_newest_checkpoint_and_an_earlier_one_is_not_refused(synthetic, short_run, tmp_path,
                                                                                    caplog):
    """resume=latest passes over a cut step_3 in one line and replays step 3 from step_2; resume=step_2 is not
    refused for the corrupt step_3 after it."""
    reference, losses = short_run
    for how in ("latest", "step_2"):
        run = tmp_path / how
        shutil.copytree(reference, run)
        cut(run / "checkpoints/step_3/model.safetensors")
        resume = how if how == "latest" else run / "checkpoints" / how
        with caplog.at_level("WARNING"):
            resumed = train(train_cfg(synthetic, run, *SHORT, f"resume={resume}"))
        reset()
        assert resumed["losses"] == losses
        assert checkpoint_problem(run / "checkpoints/step_3") is None  # rewritten whole
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert skipped == [f"resume=latest: skipping step_3: {tmp_path}/latest/checkpoints/step_3/model.safetensors has "
                       f"{(reference / 'checkpoints/step_3/model.safetensors').stat().st_size // 2} bytes, its "
                       f"manifest says {(reference / 'checkpoints/step_3/model.safetensors').stat().st_size} "
                       "(cut short or replaced)"]


def test_changed_settings_are_refused_then_allowed_and_recorded(synthetic, short_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(short_run[0], run)
    shutil.rmtree(run / "checkpoints/step_3")
    changed = ("trainer.max_steps=4", "trainer.lr=5e-4", "trainer.keep_last=1", "data.num_workers=1")
    with monkeypatch.context() as m:
        no_model(m)
        with pytest.raises(CheckpointError, match=r"settings changed since this checkpoint \(trainer\.lr: 0\.001 -> "
                                                  r"0\.0005; trainer\.max_steps: 3 -> 4\); resume with the same "
                                                  r"settings, or pass resume_allow_changes=\[trainer\.lr,trainer"
                                                  r"\.max_steps\]$"):
            train(train_cfg(synthetic, run, *SHORT, *changed, "resume=latest"))
        with pytest.raises(CheckpointError,
                           match=r"resume_allow_changes=\['trainer\.lrr'\]: \['trainer\.lrr'\] name no setting"):
            train(train_cfg(synthetic, run, *SHORT, "resume=latest", "resume_allow_changes=[trainer.lrr]"))
    first = (run / "config.yaml").read_text()
    train(train_cfg(synthetic, run, *SHORT, *changed, "resume=latest", "export.enabled=true",
                    "resume_allow_changes=[trainer]"))
    assert (run / "config.yaml").read_text() == first  # the run's first settings, not rewritten
    expected = [{"step": 2, "changes": {"trainer.lr": [0.001, 0.0005], "trainer.max_steps": [3, 4]}}]
    assert json.loads((run / "checkpoints/step_4/trainer_state.json").read_text())["setting_changes"] == expected
    assert "lr: 0.0005" in (run / "checkpoints/step_4/config.yaml").read_text()
    record = json.loads((run / "export/training.json").read_text())
    assert record["settings"]["trainer"]["lr"] == 0.0005 and record["setting_changes"] == expected


def test_a_new_batch_size_continues_at_the_same_sample_or_is_refused(synthetic, short_run, tmp_path, monkeypatch):
    """From step_1 (4 samples in, batches of 4): batches of 2 continue at sample 4; batches of 8 cannot."""
    run = tmp_path / "run"
    shutil.copytree(short_run[0], run)
    for name in ("step_2", "step_3"):
        shutil.rmtree(run / "checkpoints" / name)
    with monkeypatch.context() as m:
        no_model(m)
        with pytest.raises(CheckpointError, match=r"data\.batch_size: 4 -> 2\)"):
            train(train_cfg(synthetic, run, *SHORT, "data.batch_size=2", "resume=latest"))
        with pytest.raises(CheckpointError, match=r"stopped 4 samples into its epoch, inside a micro-batch of "
                                                  r"data\.batch_size=8 on 1 ranks"):
            train(train_cfg(synthetic, run, *SHORT, "data.batch_size=8", "resume=latest",
                            "resume_allow_changes=[data.batch_size]"))
    reference = record_batches(monkeypatch)
    train(train_cfg(synthetic, tmp_path / "reference", *SHORT))
    reset()
    drawn, reference[:] = [s for sources, _ in reference for s in sources], []
    train(train_cfg(synthetic, run, *SHORT, "data.batch_size=2", "resume=latest",
                    "resume_allow_changes=[data.batch_size]"))
    assert [s for sources, _ in reference for s in sources] == drawn[4:8]


def test_torn_last_metrics_lines_are_dropped_and_counted(synthetic, short_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(short_run[0], run)
    shutil.rmtree(run / "checkpoints/step_3")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[:2] + [rows[2][:20]]))  # killed while writing step 3's row
    with caplog.at_level("WARNING"):
        train(train_cfg(synthetic, run, *SHORT, "resume=latest"))
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert f"{run}/metrics.jsonl: dropped 1 torn last line(s) (a write cut short)" in caplog.messages


def cli(data: Path, run: Path, *extra: str, **popen) -> subprocess.Popen:
    args = [a for a in overrides(data, run, *extra) if a != "data.num_workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tc_llava.train", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_a_bad_resume_path_is_one_line(synthetic, tmp_path):
    proc = cli(synthetic, tmp_path / "run", "resume=/bad/path", "data.num_workers=0")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and "Traceback" not in output
    assert "CheckpointError: resume=/bad/path: no such checkpoint directory; expected latest or " \
           ".../checkpoints/step_N" in output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_training_with_one_line_saying_how_to_resume(synthetic, tmp_path, signum):
    """The signal goes to the whole process group, as a terminal's Ctrl-C does (the loader worker too)."""
    run = tmp_path / "run"
    proc = cli(synthetic, run, "trainer.max_steps=1000", "trainer.save_every=1", "export.enabled=false",
               "data.num_workers=1", start_new_session=True)
    deadline = time.monotonic() + 240
    while not checkpoint_dirs(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output
    newest = checkpoint_dirs(run)[-1]
    name = signal.Signals(signum).name
    assert f"stopped by {name}: the newest checkpoint is {newest}; to continue, rerun the same command with " \
           "resume=latest" in output
    assert all(checkpoint_problem(p) is None for p in (run / "checkpoints").glob("step_*")
               if p.name.removeprefix("step_").isdigit())


def test_a_full_disk_names_the_checkpoint_it_was_writing(synthetic, tmp_path, monkeypatch):
    """torch.save into /dev/full, a real ENOSPC: torch's own error says only ``unexpected pos`` or ``file write
    failed``. The cut save is removed, so nothing under checkpoints/ is left half-written."""
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *args, **kwargs: save(obj, "/dev/full", *args, **kwargs))
    run = tmp_path / "run"
    with pytest.raises(StorageError, match=rf"^{run}/checkpoints/step_1\.tmp: writing failed \(.*unexpected pos.*; "
                                           r"torch's words for a full disk among other write errors\), \d+ MiB free "
                                           "there$"):
        train(train_cfg(synthetic, run, *SHORT))
    assert list((run / "checkpoints").iterdir()) == []


def test_a_full_disk_names_the_metrics_file(synthetic, tmp_path, monkeypatch):
    """metrics.jsonl made a link to /dev/full once the run has set up: its first row's write fails for real."""
    keep = loop.keep_metrics_until

    def full_metrics(path, step):
        keep(path, step)
        path.symlink_to("/dev/full")

    monkeypatch.setattr(loop, "keep_metrics_until", full_metrics)
    run = tmp_path / "run"
    with pytest.raises(StorageError, match=rf"^{run}/metrics\.jsonl: No space left on device \(\d+ MiB "
                                           r"free there\)$"):
        train(train_cfg(synthetic, run, *SHORT))
