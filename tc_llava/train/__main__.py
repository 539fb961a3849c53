"""``python -m tc_llava.train`` / ``tc-llava-train``: the Hydra entry point of SFT.

With ``ablation.evaluate=true`` (``experiment=ablation``) the job then evaluates its export
in the same process (:mod:`tc_llava.train.ablation`).
"""

from __future__ import annotations

import json
import logging
import time

import hydra
from omegaconf import DictConfig

from tc_llava.train.ablation import evaluate_run
from tc_llava.train.loop import train

log = logging.getLogger(__name__)


@hydra.main(config_path="../../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    tic = time.perf_counter()
    result = train(cfg)
    losses = result["losses"]
    if losses:
        log.info("loss: first %.4f -> last %.4f over %d steps", losses[0], losses[-1], len(losses))
    log.info("run: %s; export: %s; data: %s", result["run_dir"], result["export"], json.dumps(result["data"]))
    if cfg.get("ablation", {}).get("evaluate"):
        evaluate_run(cfg, result, time.perf_counter() - tic)


if __name__ == "__main__":
    main()
