"""``python -m tc_llava.train`` / ``tc-llava-train``: the Hydra entry point of SFT."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tc_llava.cli import one_line_errors
from tc_llava.train.checkpoint import checkpoint_dirs
from tc_llava.train.loop import TRAIN_ERRORS, train

log = logging.getLogger(__name__)


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that both stop the run the same way."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(run_dir: Path) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's stop; torchrun forwards it to every rank) end training with
    one line saying how to resume, and exit 128 + the signal number. A save cut short is left as
    ``step_N.tmp``, which is never taken for a checkpoint."""
    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt as e:
        # A loader worker killed by the same SIGTERM trips torch's SIGCHLD handler, which would raise here
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signum = getattr(e, "signum", signal.SIGINT)
        log.debug("traceback", exc_info=True)
        if os.environ.get("RANK", "0") == "0":
            found = checkpoint_dirs(run_dir)
            how = (f"the newest checkpoint is {found[-1]}; to continue, rerun the same command with resume=latest"
                   if found else "no checkpoint was written yet; rerun the same command with overwrite=true to start "
                   "again")
            log.error("stopped by %s: %s", signal.Signals(signum).name, how)
        sys.exit(128 + signum)
    finally:
        signal.signal(signal.SIGTERM, previous)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    with one_line_errors(*TRAIN_ERRORS), stop_on_signals(Path(cfg.run_dir)):
        result = train(cfg)
    losses = result["losses"]
    if losses:
        log.info("loss: first %.4f -> last %.4f over %d steps", losses[0], losses[-1], len(losses))
    log.info("run: %s; export: %s; data: %s", result["run_dir"], result["export"], json.dumps(result["data"]))
    return result


if __name__ == "__main__":
    main()
