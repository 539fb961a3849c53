"""``python -m tc_llava.rl`` / ``tc-llava-rl``: the Hydra entry point of the RL stage (docs/rl.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tc_llava.cli import one_line_composition_errors, one_line_errors, stop_on_signals
from tc_llava.rl.loop import RL_ERRORS, train
from tc_llava.train.checkpoint import how_to_resume

log = logging.getLogger(__name__)


@hydra.main(config_path="../configs", config_name="rl", version_base="1.3")
def _app(cfg: DictConfig) -> dict:
    with one_line_errors(*RL_ERRORS), stop_on_signals(lambda: how_to_resume(Path(cfg.run_dir))):
        result = train(cfg)
    log.info("run: %s; export: %s; %d steps", result["run_dir"], result["export"], result["step"])
    return result


def main() -> None:
    """Console entry point (``tc-llava-rl``)."""
    with one_line_composition_errors():
        _app()


if __name__ == "__main__":
    main()
