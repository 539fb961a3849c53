"""Run directories that are never clobbered, checkpoints that resume exactly, and the export.

A checkpoint is ``accelerator.save_state`` (model, optimiser, scheduler, RNG states; the
DeepSpeed engine's own shards under ZeRO) plus ``trainer_state.json`` (optimizer step, data
position and counts, loss history, the run's own checkpoints). It is written to
``step_N.tmp`` and renamed once complete, so an interrupted save never shadows the last good
checkpoint; weights that are not finite are never written. Pruning removes only checkpoints
this run (and the runs it resumed) wrote.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tc_llava.model.hf_compat import whole_models

STATE_FILE = "trainer_state.json"
# What a training run (and the ablation job's evaluation) writes into its run_dir; Hydra's own
# .hydra/ and log files are left alone.
RUN_ARTEFACTS = ("checkpoints", "export", "metrics.jsonl", "config.yaml", "meta.json", "eval", "ablation.json", "wandb")
# Held (flock) by the one process that trains into a run_dir, for that process's lifetime: the kernel
# releases it when the process ends, however it ends. It names its holder for the refusal message.
LOCK_FILE = ".lock"
# A directory below run_dir holding one of these is another run's or an evaluation's: a training run
# (its lock, its config.yaml), any Hydra app's output dir (.hydra) or an evaluation (results.json).
OTHER_RUN_SIGNS = frozenset({LOCK_FILE, "config.yaml", ".hydra", "results.json", "ablation.json"})
_OWN_TREES = ("checkpoints", "export", "wandb", ".hydra")  # written by this run (and Hydra) alone: not searched
_held: dict[Path, int] = {}  # lock file -> open descriptor, for the life of this process


class NonFiniteError(RuntimeError):
    """A NaN/inf loss, gradient or weight: the run stops before anything poisoned is saved."""


class RunDirError(FileExistsError):
    """A run_dir that holds another run, or checkpoints that resuming would overwrite."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # index of the next micro-batch within its epoch
    losses: list[float] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # DataReport.state_dict(): counts continue on resume
    checkpoints: list[str] = field(default_factory=list)  # this run's checkpoints under run_dir, oldest first


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


def run_artefacts(run_dir: Path) -> list[str]:
    """The names of a run's outputs already in ``run_dir``."""
    return [name for name in RUN_ARTEFACTS if (run_dir / name).exists()]


def other_outputs(run_dir: Path) -> list[str]:
    """Directories below ``run_dir`` (relative, sorted) that hold another run or an evaluation: ones with
    a sign of :data:`OTHER_RUN_SIGNS`. ``eval/`` with only a ``results.json`` is the ablation job's own
    evaluation when ``run_dir`` is a training run's (has its ``config.yaml``)."""
    own_eval = run_dir / "eval" if (run_dir / "config.yaml").is_file() else None
    found = []
    for top, dirs, files in os.walk(run_dir):
        here = Path(top)
        if here == run_dir:
            dirs[:] = [d for d in dirs if d not in _OWN_TREES]
            continue
        signs = OTHER_RUN_SIGNS.intersection(files + dirs) - ({"results.json"} if here == own_eval else set())
        if signs:
            found.append(str(here.relative_to(run_dir)))
            dirs[:] = []  # what lies below is that run's
    return sorted(found)


def lock_run_dir(run_dir: Path) -> None:
    """Hold ``run_dir/.lock`` until this process ends; raise :class:`RunDirError` naming the holder if another
    process holds it. Re-entrant within a process (a sweep's jobs, or an ablation job's evaluation after its
    training, run in one process)."""
    path = (run_dir / LOCK_FILE).absolute()
    held = _held.get(path)
    if held is not None:
        if path.exists() and os.path.samestat(os.fstat(held), path.stat()):
            return
        os.close(held)  # the directory was deleted and made again: lock the new file
        del _held[path]
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(f"run_dir={run_dir} is in use by {holder} (it holds {path}); one process trains in a "
                          "run_dir at a time: wait for it to end, or give this run another run_dir=") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[path] = fd


def claim_run_dir(accelerator: Accelerator, run_dir: Path) -> None:
    """The main process locks ``run_dir`` (:func:`lock_run_dir`); every rank learns the outcome, so a refusal
    stops all ranks at once and none waits at a barrier for one that left."""
    error = None
    if accelerator.is_main_process:
        try:
            lock_run_dir(run_dir)
        except RunDirError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        raise RunDirError(error)


class LockRunDir(Callback):
    """Hydra callback (``hydra.callbacks`` of train.yaml): a single run locks ``run_dir`` before Hydra writes
    its ``.hydra/`` record and log there, so a refused second process changes nothing of the run in use.
    Only the main rank (``RANK`` 0 or unset) locks; :func:`claim_run_dir` in ``setup`` takes the same lock
    again (re-entrant), and is what locks each job's run dir in a sweep."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("RANK", "0") != "0":
            return
        HydraConfig.instance().set_config(config)  # as Hydra's run_job does next, so ${hydra:...} resolves
        try:
            lock_run_dir(Path(config.run_dir))
        except RunDirError as e:
            print(f"RunDirError: {e}", file=sys.stderr)
            sys.exit(1)


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> Path | None:
    """Where to resume from; refuses to start over another run's outputs. Every rank calls it.

    A fresh run (``resume=null``) needs a run_dir without outputs, unless ``overwrite=true``, which
    replaces one run's outputs only: a run_dir that also holds other runs or evaluations
    (:func:`other_outputs`) is refused either way. Resuming from a checkpoint of this run_dir refuses
    when later checkpoints exist there, which the resumed run would overwrite.
    """
    if resume and overwrite:
        raise ValueError("resume= and overwrite=true exclude each other: continue the run, or replace it")
    found = run_artefacts(run_dir)
    if not resume:
        others = other_outputs(run_dir) if found else []
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise RunDirError(
                f"run_dir={run_dir} holds other runs or evaluations ({shown}) beside outputs ({', '.join(found)}); "
                "it is not one run's directory: give this run its own run_dir= (or name=)")
        if found and not overwrite:
            raise RunDirError(
                f"run_dir={run_dir} already holds a run ({', '.join(found)}); pass resume=latest to continue it, "
                "overwrite=true to delete its outputs and start again, or another run_dir= (or name=)")
        return None
    source = resolve_resume(run_dir, resume)
    if source is not None and source.parent.resolve() == (run_dir / "checkpoints").resolve():
        later = [p.name for p in checkpoint_dirs(run_dir) if _step(p) > _step(source)]
        if later:
            raise RunDirError(
                f"resume={resume}: {run_dir} has later checkpoints {later} that this run would overwrite; "
                "resume=latest continues from the newest, or give the resumed run its own run_dir=")
    return source


def clear_run_dir(run_dir: Path) -> None:
    """Delete a previous run's outputs (``overwrite=true``, after :func:`check_run_dir` found no other run's
    there); its lock and whatever else lies in ``run_dir`` stay. Main process only."""
    for name in run_artefacts(run_dir):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("_")[1])


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters holding NaN/inf on this rank (ZeRO-3: its own shard)."""
    return [name for name, p in model.named_parameters()
            if p.requires_grad and not bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())]


def check_finite(accelerator: Accelerator, model: torch.nn.Module, what: str, run_dir: Path) -> None:
    """Raise :class:`NonFiniteError` on every rank if any rank's trainable weights are not finite."""
    bad = nonfinite_parameters(model)
    total = int(accelerator.reduce(torch.tensor(len(bad), device=accelerator.device), "sum").item())
    if total:
        raise NonFiniteError(
            f"not saving {what}: {total} trainable tensors hold NaN/inf (e.g. {bad[:3]}); stopping. "
            f"The last good checkpoint is untouched under {run_dir / 'checkpoints'}")


def save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, state: TrainState,
                    keep_last: int) -> Path:
    """Write ``step_N`` (refusing non-finite weights), then prune this run's oldest beyond ``keep_last``."""
    final = run_dir / "checkpoints" / f"step_{state.step}"
    check_finite(accelerator, model, final.name, run_dir)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    state.checkpoints = [name for name in state.checkpoints if name != final.name] + [final.name]
    pruned = state.checkpoints[:-keep_last] if keep_last > 0 else []
    state.checkpoints = state.checkpoints[len(pruned):]
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for name in pruned:
            shutil.rmtree(run_dir / "checkpoints" / name, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, run_dir: Path) -> TrainState:
    """Restore ``path``; its run's checkpoint list carries on only when it lives in this ``run_dir``."""
    accelerator.load_state(str(path))
    state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    if path.parent.resolve() != (run_dir / "checkpoints").resolve():
        state.checkpoints = []  # another run's checkpoints are never ours to prune
    return state


def export_model(accelerator: Accelerator, model: torch.nn.Module, build_fresh, out_dir: Path,
                 lora: bool, merge_lora: bool) -> Path | None:
    """Write a llava-hf directory that ``TCLlava.from_pretrained`` (and the evaluator) loads.

    The weights are consolidated by accelerate (gathering ZeRO-3 shards), loaded into a
    fresh CPU copy of the model on the main process, and saved there: with LoRA either
    merged into the LLM, or as a peft adapter beside the base weights.
    """
    check_finite(accelerator, model, f"the export {out_dir}", out_dir.parent)
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    with whole_models():  # the main process alone builds the export copy
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
