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
from omegaconf.errors import OmegaConfBaseException

from tc_llava.cli import one_line_composition_errors, one_line_errors, stop_on_signals
from tc_llava.eval import mvbench, nextqa, videochatgpt, videomme, zeroshot_qa
from tc_llava.eval.jsonl import DiskFullError, writing
from tc_llava.eval.judge import JudgeError
from tc_llava.eval.settings import JUDGING_STAGES, EvalSettingsError, check_eval_config, from_export, one_line
from tc_llava.model.build import ModelSettingsError, model_from_config
from tc_llava.model.tc_llava import WeightsError
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


def check_settings(cfg: DictConfig, state: PartialState) -> Benchmark:
    """Every setting and input that can be wrong without the model, as one :class:`EvalSettingsError`
    line; frame count, sampling and dtype left null completed from the export."""
    try:
        check_eval_config(cfg, BENCHMARKS)
        from_export(cfg)
        benchmark = BENCHMARKS[cfg.benchmark.protocol]
        benchmark.check_inputs(cfg.benchmark, cfg.run_dir, state)
    except OmegaConfBaseException as e:
        raise EvalSettingsError(one_line(e)) from None
    except EvalSettingsError:
        raise
    except ValueError as e:  # the benchmarks' own checks, each naming its setting or input file
        raise EvalSettingsError(str(e)) from None
    return benchmark


def run(cfg: DictConfig) -> Any:
    """Evaluate ``cfg.model`` on ``cfg.benchmark``, writing into ``cfg.run_dir``."""
    cpu = not torch.cuda.is_available()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # accelerate launch / torchrun with several ranks
    state = PartialState(cpu=cpu, backend="gloo" if cpu and launched else None)
    benchmark = check_settings(cfg, state)
    fix_numerics(cfg.threads, cfg.deterministic)
    torch.manual_seed(cfg.seed)
    if cfg.benchmark.get("stage") in JUDGING_STAGES:  # judging saved predictions needs no model
        return benchmark.evaluate(None, cfg.benchmark, cfg.run_dir, state)
    model = model_from_config(cfg).to(state.device).eval()
    log.info("rank %d/%d on %s", state.process_index, state.num_processes, state.device)
    return benchmark.evaluate(model, cfg.benchmark, cfg.run_dir, state)


def how_to_continue(run_dir: str) -> str:
    """What a stopped evaluation says: its answers so far are cached, and the same command goes on from them."""
    return (f"the answers so far are cached under {Path(run_dir) / 'cache'}; rerun the same command to continue "
            "from them")


@hydra.main(config_path="../configs", config_name="eval", version_base=None)
def _app(cfg: DictConfig) -> None:
    # a wrong setting or path, a checkpoint that does not fit, a judge that cannot work: one line
    with one_line_errors(EvalSettingsError, FileNotFoundError, JudgeError, ModelSettingsError, WeightsError,
                         DiskFullError), writing(cfg.run_dir), stop_on_signals(lambda: how_to_continue(cfg.run_dir)):
        run(cfg)


def main() -> None:
    """Console entry point (``tc-llava-eval``)."""
    with one_line_composition_errors():  # benchmark=nope, a key no config has: one line, as the app's own
        _app()


if __name__ == "__main__":
    main()
