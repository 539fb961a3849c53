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
from hydra import compose, initialize_config_dir

from tc_llava.data.synthetic import generate
from tc_llava.model.tc_llava import TCLlava
from tc_llava.rl.loop import train
from tc_llava.train.checkpoint import checkpoint_dirs
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
