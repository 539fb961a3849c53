"""``python -m tc_llava.train`` / ``tc-llava-train``: the Hydra entry point of SFT.

With ``ablation.evaluate=true`` (``experiment=ablation``) the job then evaluates its export
in the same process (:mod:`tc_llava.train.ablation`).
"""

from __future__ import annotations

import json
import logging
import sys
import time

import hydra
from omegaconf import DictConfig

from tc_llava.data.datasets import DataError
from tc_llava.train.ablation import check_benchmark, evaluate_run
from tc_llava.train.checkpoint import NonFiniteError, RunDirError
from tc_llava.train.loop import train
from tc_llava.train.settings import SettingsError

log = logging.getLogger(__name__)


# Errors in what the user gave (settings, data, the run dir) or a run stopped to keep its state
# clean: one line says what and where; the traceback goes to the debug log (hydra.verbose=true).
USER_ERRORS = (SettingsError, DataError, RunDirError, NonFiniteError)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    tic = time.perf_counter()
    try:
        if cfg.get("ablation", {}).get("evaluate"):
            check_benchmark(cfg)
        result = train(cfg)
    except USER_ERRORS as e:
        log.debug("traceback", exc_info=True)
        if getattr(e, "worker_traceback", None):
            log.debug("in the DataLoader worker: %s", e.worker_traceback)
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(1)
    losses = result["losses"]
    if losses:
        log.info("loss: first %.4f -> last %.4f over %d steps", losses[0], losses[-1], len(losses))
    log.info("run: %s; export: %s; data: %s", result["run_dir"], result["export"], json.dumps(result["data"]))
    if cfg.get("ablation", {}).get("evaluate"):
        evaluate_run(cfg, result, time.perf_counter() - tic)


if __name__ == "__main__":
    main()
