"""Checkpoints that resume exactly, and the export of a loadable model directory.

A checkpoint is ``accelerator.save_state`` (model, optimiser, scheduler, RNG states; the
DeepSpeed engine's own shards under ZeRO) plus ``trainer_state.json`` (optimizer step, data
position, loss history). It is written to ``step_N.tmp`` and renamed once complete, so an
interrupted save never shadows the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers.integrations import deepspeed as hf_deepspeed

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # index of the next micro-batch within its epoch
    losses: list[float] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    done = [p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``null`` (fresh run), ``latest`` (newest complete checkpoint, if any) or a path."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume={resume}: {path / STATE_FILE} not found (not a complete checkpoint)")
    return path


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState, keep_last: int) -> Path:
    final = run_dir / "checkpoints" / f"step_{state.step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainState:
    accelerator.load_state(str(path))
    return TrainState(**json.loads((path / STATE_FILE).read_text()))


@contextlib.contextmanager
def _whole_models():
    """Under ZeRO-3, transformers builds models partitioned across ranks (a collective call);
    the main process alone builds the export copy, so it must be built whole."""
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def export_model(accelerator: Accelerator, model: torch.nn.Module, build_fresh, out_dir: Path,
                 lora: bool, merge_lora: bool) -> Path | None:
    """Write a llava-hf directory that ``TCLlava.from_pretrained`` (and the evaluator) loads.

    The weights are consolidated by accelerate (gathering ZeRO-3 shards), loaded into a
    fresh CPU copy of the model on the main process, and saved there: with LoRA either
    merged into the LLM, or as a peft adapter beside the base weights.
    """
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    with _whole_models():
        fresh, handle = build_fresh()
    fresh.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    if lora and not merge_lora:
        handle.save_pretrained(out_dir)  # adapter_config.json + adapter_model.safetensors
        handle.unload()
    elif lora:
        handle.merge_and_unload()
    fresh.save_pretrained(out_dir)
    accelerator.wait_for_everyone()
    return out_dir
