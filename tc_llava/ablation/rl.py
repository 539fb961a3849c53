"""``python -m tc_llava.ablation.rl``: the RL sweep of issue 27 (GRPO vs T-GRPO x causal vs frame-block mask).

``configs/rl_ablation.yaml`` is the RL app's ``rl.yaml`` as a Hydra multirun. Each job trains as
``python -m tc_llava.rl`` does, then scores its export and its SFT start (the checkpoint it started from,
under the job's own rules: the policy at step 0) on the prompt set's benchmark with the evaluator
(:func:`tc_llava.ablation.job.evaluate_model`), and writes ``ablation.json`` with the start's scores under
``start``. :mod:`tc_llava.ablation.collect` pairs every job with its start question by question (McNemar).
The sweep lives here, not in the ``rl`` room, because only the study imports both the stages and the evaluator.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import torch
from accelerate import PartialState
from omegaconf import DictConfig

from tc_llava.ablation.job import check_benchmark, evaluate_model, evaluate_run
from tc_llava.cli import one_line_composition_errors, one_line_errors, stop_on_signals
from tc_llava.model.build import model_from_config
from tc_llava.rl.loop import RL_ERRORS, train
from tc_llava.rl.settings import algorithm_label
from tc_llava.train.checkpoint import how_to_resume
from tc_llava.train.settings import rule_labels

log = logging.getLogger(__name__)

START = "sft"  # the algorithm label of a job's start


@hydra.main(config_path="../configs", config_name="rl_ablation", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    tic = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    with stop_on_signals(lambda: how_to_resume(run_dir)):
        with one_line_errors(*RL_ERRORS):
            check_benchmark(cfg)  # its files are read only after training
            result = train(cfg)
        seconds = time.perf_counter() - tic
        labels = {"algorithm": algorithm_label(cfg.algorithm),
                  **rule_labels(cfg.get("rope"), cfg.get("mask"), cfg.get("projector"))}
        start_model = model_from_config(cfg).to(PartialState().device, torch.float32).eval()
        start = evaluate_model(cfg, start_model, run_dir / "start" / "eval", {**labels, "algorithm": START}, 0.0,
                               None)
        del start_model
        extra = None if start is None else {"start": {key: start[key] for key in ("tasks", "results")}}
        evaluate_run(cfg, result, seconds, labels, extra)


def main() -> None:
    """Console entry point: Hydra's composition errors in one line, as the app's own."""
    with one_line_composition_errors():
        _app()


if __name__ == "__main__":
    main()
