"""``python -m tc_llava.train`` / ``tc-llava-train``: the Hydra entry point of SFT."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tc_llava.cli import one_line_composition_errors, one_line_errors, stop_on_signals
from tc_llava.train.checkpoint import how_to_resume
from tc_llava.train.loop import TRAIN_ERRORS, train

log = logging.getLogger(__name__)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def _app(cfg: DictConfig) -> dict:
    with one_line_errors(*TRAIN_ERRORS), stop_on_signals(lambda: how_to_resume(Path(cfg.run_dir))):
        result = train(cfg)
    losses = result["losses"]
    if losses:
        log.info("loss: first %.4f -> last %.4f over %d steps", losses[0], losses[-1], len(losses))
    log.info("run: %s; export: %s; data: %s", result["run_dir"], result["export"], json.dumps(result["data"]))
    return result


def main() -> None:
    """Console entry point (``tc-llava-train``)."""
    with one_line_composition_errors():  # rope=nope, a key no config has: one line, as the app's own
        _app()


if __name__ == "__main__":
    main()
