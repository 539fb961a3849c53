"""``python -m tc_llava.train`` / ``tc-llava-train``: the Hydra entry point of SFT."""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from tc_llava.cli import one_line_errors
from tc_llava.train.loop import TRAIN_ERRORS, train

log = logging.getLogger(__name__)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    with one_line_errors(*TRAIN_ERRORS):
        result = train(cfg)
    losses = result["losses"]
    if losses:
        log.info("loss: first %.4f -> last %.4f over %d steps", losses[0], losses[-1], len(losses))
    log.info("run: %s; export: %s; data: %s", result["run_dir"], result["export"], json.dumps(result["data"]))
    return result


if __name__ == "__main__":
    main()
