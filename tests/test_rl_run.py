"""The RL app end to end on the synthetic set, from a tiny SFT export: a short run raises the mean reward, a run
killed mid-way and resumed repeats the uninterrupted run's rollouts and losses, and the export loads as the
evaluator loads an SFT export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from hydra import compose, initialize_config_dir

import tc_llava.rl.loop as loop
from tc_llava.data.synthetic import generate
from tc_llava.model.tc_llava import TCLlava
from tc_llava.rl.loop import train
from tc_llava.rl.rewards import score
from tc_llava.train.checkpoint import NonFiniteError, checkpoint_dirs
from tc_llava.train.loop import train as sft

from conftest import CONFIGS, REPO, TINY

TIMINGS = ("rollout_s", "train_s", "peak_mem_gb")


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic set and a tiny model SFT'd on it for 80 steps (it answers with a letter now and then): the
    data root and the export."""
    root = tmp_path_factory.mktemp("rl")
    generate(root / "data" / "synthetic", num_train=48, num_eval_per_task=4, seed=0, num_frames=8)
    tiny = [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data={root / 'data'}", f"run_dir={root / 'sft'}", *tiny,
                                          "data.num_frames=4", "data.num_workers=0", "data.batch_size=4",
                                          "tuning=full", "trainer.lr=1e-3", "trainer.warmup_ratio=0",
                                          "trainer.max_steps=80", "trainer.save_every=1000", "threads=1"])
    return root / "data", Path(sft(cfg)["export"])


def rl_overrides(start: tuple[Path, Path], run_dir: Path, *extra: str) -> list[str]:
    data, export = start
    return [f"paths.data={data}", f"run_dir={run_dir}", "model=pretrained", f"model.checkpoint={export}",
            "tuning=full", "algorithm.num_generations=8", "algorithm.max_completion_length=1", "algorithm.beta=0",
            "prompts.batch_size=4", "prompts.num_frames=4", "trainer.save_every=1000", "threads=1", *extra]


def rl_cfg(start, run_dir: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("rl", overrides=rl_overrides(start, run_dir, *extra))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_short_run_raises_the_mean_reward(start, tmp_path):
    """40 GRPO steps of 4 prompts x 8 one-token completions (the answer letter after ``Best option:(``; full
    fine-tuning, lr 3e-3, no KL) from the 80-step SFT start: the benchmark's letter check rewards the answer.

    Measured (CPU, threads=1, torch 2.14, one sampling seed per completion): mean reward 0.006 over the first 10
    steps, 0.169 over the last 10 (the start rarely answers with a letter at all; the policy learns to answer with
    one). Run seeds 1 and 2: 0.069 -> 0.331 and 0.094 -> 0.347; lr 5e-3: 0.006 -> 0.253. (With one seed per
    step and process, before: 0.025 -> 0.316; lr 1e-3 rose only to 0.17 in 40 steps, 3e-4 not measurably.)"""
    train(rl_cfg(start, tmp_path / "run", "trainer.lr=3e-3", "trainer.max_steps=40", "export.enabled=false"))
    rewards = [r["reward"] for r in rows(tmp_path / "run" / "metrics.jsonl")]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert first < 0.05 and last > 0.15


# LoRA with the reference its adapters disabled (beta > 0), two optimiser steps per rollout batch (ratios != 1)
RESUME = ("tuning=lora", "tuning.lora.r=4", "algorithm.beta=0.04", "algorithm.num_iterations=2",
          "algorithm.num_generations=4", "algorithm.max_completion_length=3", "prompts.batch_size=2",
          "trainer.lr=1e-3", "trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_last=0",
          "export.enabled=false")


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMINGS}


def test_a_killed_run_resumes_with_the_same_rollouts_and_losses(start, tmp_path):
    """A real ``python -m tc_llava.rl`` killed (SIGKILL, its process group) once checkpoint step_2 exists, resumed
    with resume=latest: metrics.jsonl (losses, rewards, KL, clip fractions, seeds) and rollouts.jsonl (every
    completion) equal an uninterrupted run's."""
    reference = train(rl_cfg(start, tmp_path / "reference", *RESUME))
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tc_llava.rl", *rl_overrides(start, run, *RESUME)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not any(p.name == "step_2" for p in checkpoint_dirs(run)) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, 9)
    proc.wait(timeout=60)
    assert proc.returncode == -9  # killed, not finished
    stopped_at = checkpoint_dirs(run)[-1].name
    assert stopped_at in ("step_2", "step_3")
    resumed = train(rl_cfg(start, run, *RESUME, "resume=latest"))
    assert resumed["losses"] == reference["losses"]
    assert [without_timings(r) for r in rows(run / "metrics.jsonl")] == \
        [without_timings(r) for r in rows(tmp_path / "reference" / "metrics.jsonl")]
    assert rows(run / "rollouts.jsonl") == rows(tmp_path / "reference" / "rollouts.jsonl")
    assert rows(run / "metrics.jsonl")[-1]["kl"] > 0  # not vacuous: the policy has left its reference


def test_t_grpo_records_its_frame_orders_and_exports_a_loadable_model(start, tmp_path):
    """Two T-GRPO steps: each prompt's shuffled group saw a recorded permutation of its 4 frames drawn from a
    recorded seed (not the identity for every prompt), the bonus follows the rule on the recorded accuracies,
    and the export loads as the evaluator loads it, recording the frames it was trained with."""
    result = train(rl_cfg(start, tmp_path / "run", "algorithm=t_grpo", "algorithm.beta=0.04",
                          "algorithm.num_generations=4", "prompts.batch_size=2", "trainer.max_steps=2",
                          "algorithm.max_completion_length=2"))
    records = rows(tmp_path / "run" / "rollouts.jsonl")
    assert len(records) == 4 and all(sorted(r["shuffled"]["frame_order"]) == [0, 1, 2, 3] for r in records)
    assert any(r["shuffled"]["frame_order"] != [0, 1, 2, 3] for r in records)
    assert len({r["shuffled"]["frame_seed"] for r in records}) == 4
    assert all(len(r["shuffled"]["completions"]) == 2 for r in records)  # G // 2
    for r in records:
        p, shuffled = sum(r["accuracy"]) / 4, sum(r["shuffled"]["accuracy"]) / 2
        assert r["bonus"] == [0.3 if p >= 0.8 * shuffled and a > 0.1 else 0.0 for a in r["accuracy"]]
        assert [round(t - b, 6) for t, b in zip(r["rewards"], r["bonus"])] == r["accuracy"]
    metrics = rows(tmp_path / "run" / "metrics.jsonl")
    assert {"shuffled_accuracy", "temporal_bonus", "rollout_s", "train_s", "accuracy", "rewards/mcq_letter",
            "clip_ratio/region_mean", "completion_length", "kl"} <= set(metrics[0])
    exported = TCLlava.from_pretrained(result["export"])
    assert exported.frame_sampling["num_frames"] == 4 and exported.frame_sampling["sampling"] == "middle"


def test_records_with_numeric_and_span_answers_are_scored_by_their_type(start, tmp_path):
    """The synthetic rl.json (VideoChat2-IT records: mcq, number, span), its first 13 prompts in one step: each
    prompt's completions are scored by its answer type's reward (and the format reward), and every answer the
    rewards could not read is counted in metrics.jsonl."""
    train(rl_cfg(start, tmp_path / "run", "prompts=synthetic_records", "prompts.limit=13", "prompts.batch_size=13",
                 "rewards=video_r1", "algorithm.num_generations=4", "algorithm.max_completion_length=4",
                 "trainer.max_steps=1", "export.enabled=false"))
    records, metrics = rows(tmp_path / "run" / "rollouts.jsonl"), rows(tmp_path / "run" / "metrics.jsonl")
    assert len({r["prompt"] for r in records}) == 13
    assert {r["answer_type"] for r in records} == {"mcq", "number", "span"}
    weights = {"mcq_letter": 1.0, "numeric_mra": 1.0, "temporal_iou": 1.0, "format": 1.0}
    malformed = dict.fromkeys(weights, 0)
    for r in records:
        scored = score(r["completions"], [r["solution"]] * 4, [r["answer_type"]] * 4, weights)
        assert r["rewards"] == pytest.approx(scored.total)
        malformed = {k: v + scored.malformed[k] for k, v in malformed.items()}
    assert {k: sum(m[f"malformed/{k}"] for m in metrics) for k in weights} == malformed


@pytest.mark.parametrize(("ckpt", "template"), [("tiny_qwen2_5_vl", "qwen2_vl"), ("tiny_qwen3_vl", "qwen3_vl")])
def test_a_qwen_policy_runs_t_grpo_and_exports(ckpt, template, request, tmp_path_factory, tmp_path):
    """Two T-GRPO steps of a Qwen-VL export (LoRA, KL to the adapters disabled) on the synthetic set, frames by
    its frame budget: completions on ordered and on shuffled frames, and an export that loads with its budget."""
    data = tmp_path_factory.mktemp("rl_qwen")
    generate(data / "synthetic", num_train=4, num_eval_per_task=2, seed=0, num_frames=8)
    start = tmp_path / "start"
    budget = {"fps": 4.0, "max_frames": 4}
    TCLlava.from_pretrained(request.getfixturevalue(ckpt), attn_implementation="sdpa",
                            frame_budget=budget).save_pretrained(start)
    result = train(rl_cfg((data, start), tmp_path / "run", f"model.template={template}",
                          "prompts.num_frames=null", "algorithm=t_grpo",
                          "tuning=lora", "tuning.lora.r=4", "algorithm.beta=0.04", "algorithm.num_generations=2",
                          "prompts.batch_size=2", "trainer.max_steps=2", "algorithm.max_completion_length=2"))
    records = rows(tmp_path / "run" / "rollouts.jsonl")
    assert len(records) == 4 and all(sorted(r["shuffled"]["frame_order"]) == [0, 1, 2, 3] for r in records)
    assert all(len(r["completions"]) == 2 and len(r["shuffled"]["completions"]) == 1 for r in records)
    assert rows(tmp_path / "run" / "metrics.jsonl")[-1]["kl"] >= 0
    exported = TCLlava.from_pretrained(result["export"], attn_implementation="sdpa")
    assert exported.family.model_type == ckpt.removeprefix("tiny_")
    assert (exported.preprocessing.budget.fps, exported.preprocessing.budget.max_frames) == (4.0, 4)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_micro_batches_give_the_update_of_the_whole_rollout_batch(start, tmp_path, loss_type):
    """trainer.grad_accum=3 splits each optimiser step's 8 completions into parts of 3, 3 and 2: per-sequence
    (grpo) and per-token (dapo) normalisation are weighted so the update is the whole batch's. Two steps of two
    optimiser steps each (ratios != 1 on the second): the same losses, rewards and KL to float rounding."""
    args = ("tuning=full", f"algorithm.loss_type={loss_type}", "algorithm.beta=0.04", "algorithm.num_iterations=2",
            "algorithm.num_generations=4", "algorithm.max_completion_length=3", "prompts.batch_size=2",
            "trainer.lr=1e-3", "trainer.max_steps=2", "export.enabled=false",
            "seed=1")  # seed 0 draws groups that all score alike at both steps: nothing would move
    whole = train(rl_cfg(start, tmp_path / "whole", *args))
    parts = train(rl_cfg(start, tmp_path / "parts", *args, "trainer.grad_accum=3"))
    a, b = rows(tmp_path / "whole" / "metrics.jsonl"), rows(tmp_path / "parts" / "metrics.jsonl")
    assert [r["reward"] for r in a] == [r["reward"] for r in b]
    assert rows(tmp_path / "whole" / "rollouts.jsonl") == rows(tmp_path / "parts" / "rollouts.jsonl")
    assert whole["losses"] == pytest.approx(parts["losses"], abs=1e-6)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-5)
    assert a[-1]["grad_norm"] > 0 and a[-1]["kl"] > 0


def test_a_nan_loss_stops_the_run_before_the_optimiser_moves(start, tmp_path, monkeypatch):
    """A NaN loss at step 2: NonFiniteError naming the step, the optimiser never stepped on it (checkpoint step_1
    is the last, unchanged), and resume=latest replays steps 2-3 as an uninterrupted run does."""
    args = ("tuning=full", "algorithm.num_generations=4", "algorithm.max_completion_length=2", "prompts.batch_size=2",
            "trainer.lr=1e-3", "trainer.max_steps=3", "trainer.save_every=1", "trainer.keep_last=0",
            "export.enabled=false")
    reference = train(rl_cfg(start, tmp_path / "reference", *args))
    original, calls = loop.policy_loss, {"n": 0}

    def poisoned(*a, **kw):
        result = original(*a, **kw)
        calls["n"] += 1
        return result if calls["n"] != 2 else type(result)(result.loss * float("nan"), result.stats)

    monkeypatch.setattr(loop, "policy_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at step 2 \(iteration 1\); stopping. The last good "
                                             "checkpoint is untouched under"):
        train(rl_cfg(start, run, *args))
    assert [p.name for p in checkpoint_dirs(run)] == ["step_1"]
    monkeypatch.setattr(loop, "policy_loss", original)
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(rl_cfg(start, run, *args, "resume=latest"))
    assert resumed["losses"] == reference["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["cpu", "zero3"])
def test_two_ranks_run_and_export(start, tmp_path, cache_dir, trainer):
    """Two ranks over gloo (torchrun), plain DDP or DeepSpeed ZeRO-3 (partitioned weights generate the rollouts,
    LoRA reference with KL): each rank's prompts are scored and recorded, rewards gathered, the export loads."""
    from conftest import free_port

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TC_LLAVA_CACHE": str(cache_dir),
           "TORCH_EXTENSIONS_DIR": str(Path(cache_dir).parent / "torch_extensions")}
    args = rl_overrides(start, run, f"trainer={trainer}", "trainer.backend=gloo", "tuning=lora", "tuning.lora.r=4",
                        "algorithm.beta=0.04", "algorithm.num_generations=4", "algorithm.max_completion_length=3",
                        "trainer.max_steps=2")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "-m", "tc_llava.rl", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics, records = rows(run / "metrics.jsonl"), rows(run / "rollouts.jsonl")
    assert len(metrics) == 2 and metrics[-1]["kl"] >= 0
    assert len({seed for r in records for seed in r["seeds"]}) == 32  # one per completion, none shared by ranks
    assert len(records) == 8 and len({r["prompt"] for r in records[:4]}) == 4  # 4 prompts a step, 2 per rank
    TCLlava.from_pretrained(run / "export")


def test_the_rl_sweep_pairs_each_job_with_its_sft_start(start, tmp_path):
    """``python -m tc_llava.ablation.rl`` over GRPO and T-GRPO (2 jobs x 2 steps, real processes): each job scores
    its export and its SFT start on the prompt set's benchmark, and the collector's McNemar counts are those of
    the two jobs' own predictions files, question by question."""
    data, export = start
    sweep = tmp_path / "sweep"
    args = [f"paths.data={data}", f"hydra.sweep.dir={sweep}", "model=pretrained", f"model.checkpoint={export}",
            "tuning=full", "algorithm.num_generations=4", "algorithm.max_completion_length=1", "algorithm.beta=0",
            "prompts.batch_size=4", "prompts.num_frames=4", "trainer.max_steps=2", "trainer.lr=3e-3", "threads=1",
            "algorithm=grpo,t_grpo", "mask=frame_block_causal"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tc_llava.ablation.rl", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(sweep.glob("*/ablation.json"))
    assert [p.parent.name for p in jobs] == ["0_grpo-saved-frame_block_causal_s0", "1_t_grpo-saved-frame_block_causal_s0"]
    proc = subprocess.run([sys.executable, "-m", "tc_llava.ablation.collect", str(sweep)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((sweep / "rl_ablation.json").read_text())
    assert [(r["algorithm"], r["mask"]) for r in table] == [("grpo", "frame_block_causal"),
                                                           ("t_grpo", "frame_block_causal")]
    for path, row in zip(jobs, table):
        rl, sft = (rows(path.parent / where / "predictions.jsonl") for where in ("eval", "start/eval"))
        before = {r["id"]: r["correct"] for r in sft}
        after = {r["id"]: r["correct"] for r in rl}
        assert len(after) == len(before) == 24  # 6 tasks x 4 questions
        overall = row["overall"]
        assert overall["n"] == 24
        assert overall["only_a"] == sum(before[q] and not after[q] for q in after)
        assert overall["only_b"] == sum(after[q] and not before[q] for q in after)
        assert row["start"]["overall"] == pytest.approx(100 * sum(before.values()) / 24)
        assert row["rl"]["overall"] == pytest.approx(100 * sum(after.values()) / 24)
    assert "| t_grpo | saved | frame_block_causal | 0 |" in (sweep / "rl_ablation.md").read_text()
