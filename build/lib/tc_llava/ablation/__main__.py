"""``python -m tc_llava.ablation``: the sweep of ``experiment=ablation``, one train-then-evaluate job each."""

from __future__ import annotations

import logging
import time

import hydra
from omegaconf import DictConfig

from tc_llava.ablation.job import check_benchmark, evaluate_run
from tc_llava.cli import one_line_errors
from tc_llava.train.loop import TRAIN_ERRORS, train

log = logging.getLogger(__name__)


@hydra.main(config_path="../configs", config_name="ablation", version_base="1.3")
def main(cfg: DictConfig) -> None:
    tic = time.perf_counter()
    with one_line_errors(*TRAIN_ERRORS):
        check_benchmark(cfg)  # its files are read only after training
        result = train(cfg)
    evaluate_run(cfg, result, time.perf_counter() - tic)


if __name__ == "__main__":
    main()
