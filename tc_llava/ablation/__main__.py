"""``python -m tc_llava.ablation``: the sweep of ``experiment=ablation``, one train-then-evaluate job each."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tc_llava.ablation.job import check_benchmark, evaluate_run
from tc_llava.cli import one_line_composition_errors, one_line_errors, stop_on_signals
from tc_llava.train.checkpoint import how_to_resume
from tc_llava.train.loop import TRAIN_ERRORS, train

log = logging.getLogger(__name__)


@hydra.main(config_path="../configs", config_name="ablation", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    tic = time.perf_counter()
    with stop_on_signals(lambda: how_to_resume(Path(cfg.run_dir))):
        with one_line_errors(*TRAIN_ERRORS):
            check_benchmark(cfg)  # its files are read only after training
            result = train(cfg)
        evaluate_run(cfg, result, time.perf_counter() - tic)


def main() -> None:
    """Console entry point: Hydra's composition errors (rope=nope) in one line, as the app's own."""
    with one_line_composition_errors():
        _app()


if __name__ == "__main__":
    main()
