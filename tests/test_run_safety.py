"""A run never loses or poisons work: non-finite state is never saved, run dirs are never clobbered,
records stay true across a resume, and bad settings stop the run before the model loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import tc_llava.train.loop as loop
from tc_llava.data.datasets import SampleError
from tc_llava.model.tc_llava import TCLlava
from tc_llava.train.checkpoint import NonFiniteError, RunDirError
from tc_llava.train.loop import train
from tc_llava.train.settings import SettingsError

from conftest import CONFIGS, REPO
from test_train import overrides, synthetic, train_cfg  # noqa: F401 (synthetic is a fixture)

FAST = ("trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_last=10", "export.enabled=false")


class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_call(monkeypatch, call: int, how) -> None:
    """Make the ``call``-th model forward's loss ``how(loss)``."""
    forward, calls = TCLlava.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            out.loss = how(out.loss)
        return out

    monkeypatch.setattr(TCLlava, "forward", poisoned)


def reset() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_nan_gradient_with_a_finite_loss_stops_before_the_step(synthetic, tmp_path, monkeypatch):
    poison_call(monkeypatch, 3, _NanGradient.apply)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(nan\) at step 3 with a finite loss"):
        train(train_cfg(synthetic, run, *FAST))
    assert checkpoints(run) == ["step_1", "step_2"]  # step 3 never reached a checkpoint
    assert all(bool(torch.isfinite(t).all()) for t in load_file(run / "checkpoints/step_2/model.safetensors").values())
    assert metric_steps(run) == [1, 2]


def test_nan_gradient_at_the_last_step_writes_no_export(synthetic, tmp_path, monkeypatch):
    poison_call(monkeypatch, 2, _NanGradient.apply)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="step 2"):
        train(train_cfg(synthetic, run, "trainer.max_steps=2", "trainer.save_every=1"))
    assert checkpoints(run) == ["step_1"] and not (run / "export").exists()


def test_weights_that_turn_non_finite_are_never_saved(synthetic, tmp_path, monkeypatch):
    """An optimizer step that leaves NaN weights (finite gradients) is caught at the save."""
    step = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        if self._step_count_for_test == 2:  # the second optimizer step
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        self._step_count_for_test += 1
        return out

    monkeypatch.setattr(torch.optim.AdamW, "_step_count_for_test", 1, raising=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="not saving step_2: 1 trainable tensors hold NaN/inf"):
        train(train_cfg(synthetic, run, *FAST))
    assert checkpoints(run) == ["step_1"]


def test_existing_run_dir_is_refused_then_replaced_only_on_request(synthetic, tmp_path):
    run = tmp_path / "run"
    train(train_cfg(synthetic, run, "trainer.max_steps=2", "trainer.save_every=1"))
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}
    reset()
    with pytest.raises(RunDirError, match="already holds a run .*resume=latest.*overwrite=true"):
        train(train_cfg(synthetic, run, "trainer.max_steps=2", "trainer.save_every=1"))
    assert {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing touched
    reset()
    train(train_cfg(synthetic, run, "trainer.max_steps=1", "overwrite=true"))
    assert checkpoints(run) == ["step_1"] and metric_steps(run) == [1]  # the old step_2 and rows are gone


def test_pruning_removes_only_this_runs_checkpoints(synthetic, tmp_path):
    """A run resumed from another run's checkpoint prunes its own, never the source's nor one left beside its own."""
    first, second = tmp_path / "first", tmp_path / "second"
    train(train_cfg(synthetic, first, "trainer.max_steps=2", "trainer.save_every=1", "export.enabled=false"))
    shutil.copytree(first / "checkpoints/step_1", second / "checkpoints/step_1")  # another run's, older by name
    reset()
    train(train_cfg(synthetic, second, "trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_last=1",
                    "export.enabled=false", f"resume={first / 'checkpoints/step_2'}",
                    "resume_allow_changes=[trainer.max_steps]"))
    assert checkpoints(first) == ["step_1", "step_2"] and checkpoints(second) == ["step_1", "step_4"]


def test_resuming_an_earlier_checkpoint_over_later_ones_is_refused(synthetic, tmp_path):
    run = tmp_path / "run"
    train(train_cfg(synthetic, run, "trainer.max_steps=3", "trainer.save_every=1", "trainer.keep_last=5",
                    "export.enabled=false"))
    reset()
    with pytest.raises(RunDirError, match=r"later checkpoints \['step_3'\]"):
        train(train_cfg(synthetic, run, "trainer.max_steps=3", f"resume={run / 'checkpoints/step_2'}"))
    assert checkpoints(run) == ["step_1", "step_2", "step_3"]


def test_default_run_dirs_differ_by_rope_and_mask():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        names = [compose("train", overrides=list(extra)).run_dir
                 for extra in [(), ("rope=vanilla",), ("mask=causal",), ("rope=vanilla", "mask=causal")]]
    assert len(set(names)) == 4 and names[0].endswith("train/tiny/tad-frame_block_causal")


def test_resumed_records_count_each_step_and_sample_once(synthetic, tmp_path, monkeypatch):
    """Stopped after step 5 was logged (checkpoint at 4), resumed: one row per step, and totals of a whole run."""
    args = ("trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=5", "export.enabled=false")
    reference = train(train_cfg(synthetic, tmp_path / "reference", *args))
    reset()
    poison_call(monkeypatch, 6, lambda loss: loss * float("nan"))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError):
        train(train_cfg(synthetic, run, *args))
    assert metric_steps(run) == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    reset()
    resumed = train(train_cfg(synthetic, run, *args, "resume=latest"))
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]
    assert resumed["data"] == reference["data"] and resumed["data"]["samples"] == 6 * 4
    saved = json.loads((run / "checkpoints/step_6/trainer_state.json").read_text())["data"]
    assert saved["total"]["samples"] == 24


@pytest.mark.parametrize("override,message", [
    ("trainer.lr=abc", r"trainer\.lr='abc': Value 'abc' of type 'str' could not be converted to Float"),
    ("trainer.lr=-1", r"trainer\.lr=-1\.0: expected a finite number > 0"),
    ("trainer.grad_accum=0", r"trainer\.grad_accum=0: expected an integer >= 1"),
    ("data.num_frames=0", r"data\.num_frames must be a positive integer"),
    ("data.corpora.synthetic.json=/nonexistent/train.json", r"json /nonexistent/train\.json not found"),
    ("trainer=zero3", r"trainer=zero3 runs DeepSpeed, which needs a launcher: accelerate launch"),
    ("rope.gamma=nan", r"rope\.gamma must be a finite number >= 0, got nan"),
])
def test_bad_settings_stop_before_the_model_loads(synthetic, tmp_path, monkeypatch, override, message):
    monkeypatch.setattr(loop, "model_from_config", lambda cfg: pytest.fail("the model was loaded"))
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SettingsError, match=message):
        train(train_cfg(synthetic, tmp_path / "run", override))
    assert not (tmp_path / "run").exists()


def test_worker_media_error_is_one_line(synthetic, tmp_path):
    """A broken video read in a DataLoader worker: the CLI says one line naming file and record, exits 1."""
    data = tmp_path / "data"
    (data / "synthetic/videos").mkdir(parents=True)
    records = json.loads((synthetic / "synthetic/train.json").read_text())[:8]
    for r in records:
        (data / "synthetic" / r["video"]).write_bytes((synthetic / "synthetic" / r["video"]).read_bytes())
    broken = data / "synthetic" / records[0]["video"]
    broken.write_bytes(b"\x00not a video" * 50)
    (data / "synthetic/train.json").write_text(json.dumps(records))

    with pytest.raises(SampleError) as caught:
        train(train_cfg(data, tmp_path / "lib", "trainer.max_steps=1", "data.num_workers=1"))
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"{broken}: ")
    assert "record 0 of" in str(caught.value) and "Original Traceback" in caught.value.worker_traceback

    args = [a for a in overrides(data, tmp_path / "cli", "trainer.max_steps=1") if a != "data.num_workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tc_llava.train", *args, "data.num_workers=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert f"SampleError: {broken}: " in output and "record 0 of" in output
    assert "Traceback" not in output


def test_ablation_benchmark_is_checked_before_training(tmp_path):
    from tc_llava.ablation.job import check_benchmark

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=ablation", f"paths.data={tmp_path}", f"run_dir={tmp_path}/job"])
    with pytest.raises(SettingsError, match=f"ablation.benchmark.root={tmp_path}/ablation/mvbench: .* not found"):
        check_benchmark(cfg)
