"""Resume is exact and refuses what would make it silently inexact: across epochs the data order, frame draws,
counts, losses and weights equal an uninterrupted run's; a checkpoint missing part of its state, a changed
setting, a torn record or an interrupted process is named in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import tc_llava.train.loop as loop
from tc_llava.train.loop import train

from test_train import synthetic, train_cfg  # noqa: F401 (synthetic is a fixture)

# 16 samples an epoch in micro-batches of 4, two per step: 2 steps an epoch, 3 epochs.
EPOCHS = ("data.epoch_size=16", "trainer.grad_accum=2", "trainer.max_steps=null", "trainer.epochs=3",
          "trainer.save_every=1",
          "trainer.keep_last=0", "export.enabled=false", "tuning=lora", "tuning.lora.r=4", "tuning.lora.dropout=0.1")


def reset() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)


def record_batches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], float]]:
    """Each micro-batch the loop draws: its samples' sources and a checksum of its frames (the frame draw)."""
    seen, stream = [], loop.micro_batches

    def recorded(*args):
        for batch in stream(*args):
            seen.append((batch["sources"], round(float(batch["pixel_values"].double().sum()), 3)))
            yield batch

    monkeypatch.setattr(loop, "micro_batches", recorded)
    return seen


def stopped_copy(run: Path, to: Path, step: int) -> Path:
    """``run`` as a run stopped right after checkpoint ``step_{step}`` would have left it."""
    shutil.copytree(run, to, ignore=lambda d, names: [n for n in names if n.startswith("step_")
                                                      and int(n.split("_")[1].split(".")[0]) > step])
    rows = (to / "metrics.jsonl").read_text().splitlines()
    (to / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= step))
    return to


@pytest.fixture(scope="module")
def epochs_run(synthetic, tmp_path_factory) -> tuple[Path, dict, list]:
    """An uninterrupted 3-epoch run with a checkpoint at every step, and the micro-batches it drew."""
    run = tmp_path_factory.mktemp("epochs") / "reference"
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = record_batches(monkeypatch)
        result = train(train_cfg(synthetic, run, *EPOCHS))
    reset()
    assert len(result["losses"]) == 6 and len(seen) == 12
    return run, result, seen


@pytest.mark.parametrize("stop", [2, 3, 4], ids=["epoch-boundary", "mid-epoch-1", "into-epoch-2"])
def test_resume_across_epochs_equals_the_uninterrupted_run(synthetic, epochs_run, tmp_path, monkeypatch, stop):
    reference_dir, reference, drawn = epochs_run
    seen = record_batches(monkeypatch)
    run = stopped_copy(reference_dir, tmp_path / "resumed", stop)
    resumed = train(train_cfg(synthetic, run, *EPOCHS, "resume=latest"))
    assert seen == drawn[2 * stop:]  # the same samples and frame draws, batch by batch
    assert resumed["losses"] == reference["losses"]
    assert resumed["data"] == reference["data"] and resumed["media"] == reference["media"]
    final = "checkpoints/step_6/"
    ours, theirs = (json.loads((d / final / "trainer_state.json").read_text()) for d in (run, reference_dir))
    assert ours["data"] == theirs["data"] and (ours["epoch"], ours["batch_in_epoch"]) == (2, 4)
    a, b = (load_file(d / final / "model.safetensors") for d in (run, reference_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
