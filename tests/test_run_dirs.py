"""Run dirs that sweeps never share, an overwrite that removes only its own run, and one process per run dir.

The sweeps run through Hydra's multirun in real processes; the lock is tested against a second real
process, and against one killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tc_llava.ablation.collect import load_runs, summarize, write_report
from tc_llava.data.synthetic import generate
from tc_llava.train.checkpoint import RunDirError, check_run_dir, other_outputs
from tc_llava.train.loop import train
from tc_llava.train.settings import param_word

from conftest import CONFIGS, REPO, TINY, free_port
from test_train import overrides, synthetic, train_cfg  # noqa: F401 (synthetic is a fixture)

TINY_ARGS = [f"model.tiny.{k}={v}" for k, v in TINY.items()]
FAST = ["data.num_frames=4", "data.num_workers=0", "data.batch_size=4", "tuning=full", "trainer.max_steps=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def rules_part(*extra: str) -> str:
    """The last component of the default run dir for these overrides."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return Path(compose("train", overrides=list(extra)).run_dir).name


# --------------------------------------------------------------------------- naming
def test_param_words_are_stable_and_filesystem_safe():
    assert param_word(0.5) == param_word(0.50) == param_word(5e-1) == "0.5"
    assert param_word(1) == param_word(1.0) == "1" and param_word(0) == param_word(0.0) == "0"
    assert param_word(1e-7) == "1e-07" and param_word(0.1 + 0.2) == "0.30000000000000004"  # never rounded together
    assert param_word([4, 6, 6]) == param_word((4.0, 6, 6)) == "4x6x6"
    assert (param_word(None), param_word(True), param_word(False)) == ("null", "true", "false")
    assert param_word("a/b c-d") == "a_b_c_d"


def test_run_dirs_name_every_rule_parameter_that_differs_from_its_default():
    assert rules_part() == rules_part("rope.gamma=1") == rules_part("rope.gamma=1.0") == "tad-frame_block_causal"
    gammas = [rules_part(f"rope.gamma={g}") for g in ("0", "0.5", "1")]
    assert gammas == ["tad-gamma0-frame_block_causal", "tad-gamma0.5-frame_block_causal", "tad-frame_block_causal"]
    assert rules_part("rope.gamma=0.50") == rules_part("rope.gamma=5e-1") == gammas[1]
    # parameters sorted by name, whatever the order of the overrides
    assert (rules_part("rope=videorope", "rope.temporal_pairs=8", "rope.delta=1")
            == rules_part("rope=videorope", "rope.delta=1.0", "rope.temporal_pairs=8")
            == "videorope-delta1-temporal_pairs8-frame_block_causal")
    assert rules_part("rope=mrope", "rope.mrope_section=[16,24,24]", "mask=causal") == "mrope-mrope_section16x24x24-causal"
    # the projector: unnamed when it is the default MLP, named (with its parameters) otherwise
    assert rules_part("projector=mlp") == "tad-frame_block_causal"
    assert rules_part("projector=pllava_pool") == "tad-frame_block_causal-pllava_projector"
    assert (rules_part("projector=pllava_pool", "projector.pooling_shape=[4,6,6]")
            == "tad-frame_block_causal-pllava_projector-pooling_shape4x6x6")
    assert rules_part("~rope") == "saved-frame_block_causal"
    # every shipped rule at its config file's values is named by its rule alone (a file drifting from the
    # rule's defaults would rename its default runs)
    for group in ("rope", "mask"):
        for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
            with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
                cfg = compose("train", overrides=[f"{group}={option}"])
            assert Path(cfg.run_dir).name == f"{instantiate(cfg.rope).name}-{instantiate(cfg.mask).name}", option


# --------------------------------------------------------------------------- sweeps through Hydra's multirun
def test_a_gamma_sweep_trains_three_runs_in_three_run_dirs(synthetic, tmp_path):
    out = tmp_path / "outputs"
    cmd = [sys.executable, "-m", "tc_llava.train", "-m", "rope.gamma=0,0.5,1", f"paths.data={synthetic}",
           f"paths.outputs={out}", *TINY_ARGS, *FAST, "export.enabled=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(p.name for p in (out / "train/tiny").iterdir())
    assert runs == ["tad-frame_block_causal", "tad-gamma0-frame_block_causal", "tad-gamma0.5-frame_block_causal"]
    for name, gamma in zip(runs, (1.0, 0.0, 0.5)):
        recorded = yaml.safe_load((out / "train/tiny" / name / "config.yaml").read_text())
        assert recorded["rope"]["gamma"] == gamma
        assert (out / "train/tiny" / name / "checkpoints/step_1").is_dir()


def test_the_ablation_sweeps_a_parameter_and_collects_a_row_per_value(tmp_path):
    data, sweep = tmp_path / "data", tmp_path / "sweep"
    generate(data / "ablation", num_train=8, num_eval_per_task=1, seed=0, num_frames=8)
    cmd = [sys.executable, "-m", "tc_llava.ablation", "rope=tad", "rope.gamma=0,0.5,1", "mask=causal", "seed=0",
           f"paths.data={data}", f"hydra.sweep.dir={sweep}", *TINY_ARGS, "data.num_workers=0", "data.batch_size=4",
           "trainer.max_steps=1", "ablation.benchmark.decode.num_workers=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_tad-gamma0-causal_s0", "1_tad-gamma0.5-causal_s0", "2_tad-causal_s0"]

    runs = load_runs(sweep)
    rows = summarize(runs)
    assert [(r["rope"], r["mask"], r["seeds"]) for r in rows] == [
        ("tad-gamma0", "causal", 1), ("tad-gamma0.5", "causal", 1), ("tad", "causal", 1)]
    md = write_report(rows, runs, sweep, baseline=("tad", "causal", "mlp"))["md"].read_text()
    assert "| rope | mask | seeds |" in md and "| tad-gamma0.5 | causal | 1 |" in md
    assert "Paired against tad/causal" in md
    # each job's run dir is one run: its own evaluation does not make it "another run's"
    assert other_outputs(sweep / jobs[0]) == []
    assert check_run_dir(sweep / jobs[0], None, overwrite=True) is None
    assert other_outputs(sweep) == jobs  # the sweep dir holds three runs: never overwritten as one


def test_collector_shows_the_projector_when_a_job_changed_it(tmp_path):
    tasks = {"Order": {"family": "temporal", "accuracy": 50.0, "chance": 25.0, "total": 4}}
    for num, projector in enumerate([None, "pllava_projector-pooling_shape4x6x6"]):
        job = tmp_path / f"{num}_job"
        job.mkdir()
        run = {"rope": "tad", "mask": "causal", "seed": 0, "train_seconds": 1.0, "eval_seconds": 1.0, "tasks": tasks}
        (job / "ablation.json").write_text(json.dumps(run | ({"projector": projector} if projector else {})))
    runs = load_runs(tmp_path)
    md = write_report(summarize(runs), runs, tmp_path)["md"].read_text()
    assert "| rope | mask | projector | seeds |" in md
    assert "| tad | causal | mlp | 1 |" in md and "| tad | causal | pllava_projector-pooling_shape4x6x6 | 1 |" in md


# --------------------------------------------------------------------------- overwrite removes only its own run
def eval_output(root: Path) -> Path:
    """What ``python -m tc_llava.eval`` leaves in its run dir: Hydra's record and the results."""
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra/config.yaml").write_text("benchmark: {name: mvbench}\n")
    (root / "results.json").write_text(json.dumps({"accuracy": 37.0}))
    return root / "results.json"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_dir_holding_evaluations_and_runs_is_never_cleared(synthetic, tmp_path, overwrite):
    outputs = tmp_path / "outputs"
    results = eval_output(outputs / "eval/mvbench")
    train(train_cfg(synthetic, outputs / "train/tiny/a", "trainer.max_steps=1", "export.enabled=false"))
    with pytest.raises(RunDirError) as caught:
        train(train_cfg(synthetic, outputs, "trainer.max_steps=1", f"overwrite={str(overwrite).lower()}"))
    message = str(caught.value)
    assert f"run_dir={outputs} holds other runs or evaluations (eval/mvbench, train/tiny/a)" in message
    assert "overwrite=true" not in message and "\n" not in message
    assert results.is_file() and (outputs / "train/tiny/a/checkpoints/step_1").is_dir()
    assert not (outputs / "checkpoints").exists() and not (outputs / "config.yaml").exists()


# --------------------------------------------------------------------------- one process per run dir
HOLDER = ("import sys, time; from pathlib import Path; from tc_llava.train.checkpoint import lock_run_dir; "
          "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")


def hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock, as a training run there does; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_a_run_dir_in_use_exits_at_once(synthetic, tmp_path):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        args = [*overrides(synthetic, run, "trainer.max_steps=1"), "resume=latest"]
        proc = subprocess.run([sys.executable, "-m", "tc_llava.train", *args], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    errors = [line for line in output.splitlines() if "RunDirError" in line]
    assert len(errors) == 1 and f"run_dir={run} is in use by pid {holder.pid} on " in errors[0], output
    assert "Traceback" not in output and "parameters:" not in output  # stopped before the model loaded
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written


def test_a_killed_holder_leaves_no_stale_lock(synthetic, tmp_path):
    run = tmp_path / "run"
    holder = hold(run)
    with pytest.raises(RunDirError, match=f"is in use by pid {holder.pid} "):
        train(train_cfg(synthetic, run, "trainer.max_steps=1", "export.enabled=false", "resume=latest"))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = train(train_cfg(synthetic, run, "trainer.max_steps=1", "export.enabled=false", "resume=latest"))
    assert len(result["losses"]) == 1 and (run / "checkpoints/step_1").is_dir()
    assert (run / ".lock").read_text().startswith(f"pid {os.getpid()} on ")


@pytest.mark.slow
@pytest.mark.parametrize("early", [True, False], ids=["hydra_callback", "setup"])
def test_two_ranks_refused_a_run_dir_in_use_both_exit(synthetic, tmp_path, early):
    """Only the main rank locks: refused in Hydra's callback, it exits and torchrun stops the other rank;
    refused in ``setup`` (the callback off, as for a sweep's jobs), every rank learns it instead of
    waiting at a barrier for the main one."""
    run = tmp_path / "run"
    holder = hold(run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tc_llava.train",
           *overrides(synthetic, run, "trainer=ddp", "trainer.backend=gloo", "trainer.max_steps=1"),
           *([] if early else ["~hydra.callbacks.run_dir_lock"])]
    tic = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    output = proc.stdout + proc.stderr
    refusals = output.count(f"RunDirError: run_dir={run} is in use by pid {holder.pid}")
    assert proc.returncode != 0 and refusals == (1 if early else 2), output
    assert time.perf_counter() - tic < 240 and "parameters:" not in output
