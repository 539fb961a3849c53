"""``python -m tc_llava.eval`` / ``tc-llava-eval``: build a model from Hydra config and run a benchmark.

Works as one process or under ``accelerate launch`` / ``torchrun`` (each rank runs this;
the benchmark shards its items). On a machine without CUDA the ranks talk over gloo.
Everything that can fail without the model (benchmark paths, saved predictions, the judge)
is checked before the model loads, which takes minutes at 7B.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

import hydra
import torch
from accelerate import PartialState
from omegaconf import DictConfig

from tc_llava.cli import one_line_errors
from tc_llava.eval import mvbench, nextqa, videochatgpt, videomme, zeroshot_qa
from tc_llava.eval.judge import JudgeError
from tc_llava.model.build import model_from_config
from tc_llava.runtime import fix_numerics

log = logging.getLogger(__name__)


class Benchmark(Protocol):
    """What every benchmark module exposes (see :mod:`tc_llava.eval`)."""

    def check_inputs(self, cfg: DictConfig, run_dir: str | Path, state: PartialState) -> None:
        """Raise on anything that would fail without the model, before it loads."""

    def evaluate(self, model: Any, cfg: DictConfig, run_dir: str | Path, state: PartialState) -> dict[str, Any] | None:
        """Run the benchmark (``model`` is None for a judging-only stage); results on the main process."""


# benchmark.protocol -> the module that runs it
BENCHMARKS: dict[str, Benchmark] = {
    "mvbench": mvbench,  # and every benchmark in its layout: TVBench, MLVU, the synthetic set
    "nextqa": nextqa,
    "videomme": videomme,
    "videochatgpt": videochatgpt,
    "zeroshot_qa": zeroshot_qa,
}


def run(cfg: DictConfig) -> Any:
    """Evaluate ``cfg.model`` on ``cfg.benchmark``, writing into ``cfg.run_dir``."""
    protocol = cfg.benchmark.protocol
    if protocol not in BENCHMARKS:
        raise ValueError(f"benchmark.protocol {protocol!r} is not one of {sorted(BENCHMARKS)}")
    benchmark = BENCHMARKS[protocol]
    cpu = not torch.cuda.is_available()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # accelerate launch / torchrun with several ranks
    state = PartialState(cpu=cpu, backend="gloo" if cpu and launched else None)
    fix_numerics(cfg.threads, cfg.deterministic)
    torch.manual_seed(cfg.seed)
    benchmark.check_inputs(cfg.benchmark, cfg.run_dir, state)
    if cfg.benchmark.get("stage") in ("score", "calibrate"):  # judging saved predictions needs no model
        return benchmark.evaluate(None, cfg.benchmark, cfg.run_dir, state)
    model = model_from_config(cfg).to(state.device).eval()
    log.info("rank %d/%d on %s", state.process_index, state.num_processes, state.device)
    return benchmark.evaluate(model, cfg.benchmark, cfg.run_dir, state)


@hydra.main(config_path="../configs", config_name="eval", version_base=None)
def _app(cfg: DictConfig) -> None:
    with one_line_errors(FileNotFoundError, JudgeError):  # a wrong path, a judge that cannot work: one line
        run(cfg)


def main() -> None:
    """Console entry point (``tc-llava-eval``)."""
    _app()


if __name__ == "__main__":
    main()
