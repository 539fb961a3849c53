"""Run directories that are never clobbered, checkpoints that resume exactly, and the export.

A checkpoint is ``accelerator.save_state`` (model, optimiser, scheduler, RNG states; the
DeepSpeed engine's own shards under ZeRO) plus ``trainer_state.json`` (optimizer step, data
position and counts summed over ranks, loss history, the run's own checkpoints, settings changed
on resume), ``config.yaml`` (the resolved settings its steps ran with) and, written last,
``manifest.json`` (every file's size). It is written to ``step_N.tmp`` and renamed once complete,
so an interrupted save never shadows the last good checkpoint; weights that are not finite are
never written. A checkpoint is resumed only when every file its manifest names is there with
its size (safetensors headers parsed too); checkpoints written before manifests are refused.
Pruning removes only checkpoints this run (and the runs it resumed) wrote, each renamed to
``step_N.deleting`` before it is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tc_llava.model.hf_compat import whole_models

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"  # the resolved settings, in run_dir (the run's first) and in each checkpoint (its own)
MANIFEST = "manifest.json"  # written last into a checkpoint: {"files": {relative path: size in bytes}}
# Settings that may differ on resume without changing what is trained: where things are and are written,
# how often to save, what to log, how to export, how many loader workers (the data is a function of seed,
# epoch and index). Any other change must be named by resume_allow_changes.
RESUME_FREE = ("resume", "resume_allow_changes", "overwrite", "run_dir", "name", "paths", "logging", "export",
               "data.num_workers", "trainer.save_every", "trainer.keep_last")
# What a training run (and the ablation job's evaluation) writes into its run_dir; Hydra's own
# .hydra/ and log files are left alone.
RUN_ARTEFACTS = ("checkpoints", "export", "metrics.jsonl", "rollouts.jsonl", "config.yaml", "meta.json", "eval", "ablation.json", "wandb")
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed exactly: not there, incomplete, corrupt, or of other settings."""


class StorageError(OSError):
    """A write that failed for want of space (or quota), naming the file."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # index of the next micro-batch within its epoch
    losses: list[float] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # DataReport.state_dict(): counts continue on resume
    checkpoints: list[str] = field(default_factory=list)  # this run's checkpoints under run_dir, oldest first
    world_size: int = 1  # ranks, each drawing every world_size-th micro-batch (the data position's unit)
    # Settings changed on resume by resume_allow_changes: [{"step": N, "changes": {key: [old, new]}}]
    setting_changes: list[dict[str, Any]] = field(default_factory=list)


def _candidates(run_dir: Path) -> list[Path]:
    """``step_N`` directories under ``run_dir/checkpoints``, oldest first (``step_N.tmp`` is a save in progress)."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()]
    return sorted(found, key=_step)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (their manifest vouches for every file), oldest first."""
    return [p for p in _candidates(run_dir) if checkpoint_problem(p) is None]


def _safetensors_problem(path: Path, size: int) -> str | None:
    """Why a safetensors file is not whole: its header must parse and its tensors end where the file does."""
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            return "no safetensors header"
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its safetensors header does not parse"
    return None if 8 + n + end == size else f"its tensors end at byte {8 + n + end}, the file at {size}"


def checkpoint_problem(path: Path) -> str | None:
    """What makes ``path`` not a resumable checkpoint, naming the file; ``None`` when every file its manifest
    names is there with its size. Sizes and safetensors headers, not hashes: validating a 7B checkpoint
    must not read tens of GB."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        if (path / STATE_FILE).is_file():
            return (f"{manifest} not found: written before checkpoints carried a manifest, it cannot be checked for "
                    "missing or cut files; resume it with the tc-llava version that wrote it")
        return f"{manifest} not found (not a complete checkpoint)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest} does not parse ({e})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{file} has {actual} bytes, its manifest says {size} (cut short or replaced)"
        why = _safetensors_problem(file, size) if file.suffix == ".safetensors" else None
        if why:
            return f"{file}: {why}"
    return None


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``null`` (fresh run), ``latest`` (newest complete checkpoint, if any) or a path.

    ``latest`` passes over checkpoints that fail validation, saying why in one line each, and refuses
    when checkpoints exist but none is complete; a named checkpoint that fails is refused.
    """
    if not resume:
        return None
    if resume == "latest":
        candidates = _candidates(run_dir)
        for path in reversed(candidates):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            log.warning("resume=latest: skipping %s: %s", path.name, problem)
        if candidates:
            raise CheckpointError(f"resume=latest: none of the {len(candidates)} checkpoints under "
                                  f"{run_dir / 'checkpoints'} is complete (see the lines above)")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={resume}: no such checkpoint directory; expected latest or "
                              ".../checkpoints/step_N")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"resume={resume}: {problem}")
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


def how_to_resume(run_dir: Path) -> str:
    """What a stopped run says: its newest checkpoint and the override that continues it. A save cut short
    is left as ``step_N.tmp``, which is never taken for a checkpoint."""
    found = checkpoint_dirs(run_dir)
    if found:
        return f"the newest checkpoint is {found[-1]}; to continue, rerun the same command with resume=latest"
    return "no checkpoint was written yet; rerun the same command with overwrite=true to start again"


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


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name the file and the cause when a write runs out of space. ``torch.save`` loses the errno of a full
    disk and says only ``unexpected pos ...`` (its zip writer), so that case is told by the space left."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StorageError(f"{e.filename or path}: {os.strerror(e.errno)} ({_free(path)} free there)") from e
    except RuntimeError as e:
        if "PytorchStreamWriter" not in str(e) and "unexpected pos" not in str(e):
            raise
        raise StorageError(f"{path}: writing failed ({str(e).splitlines()[0].strip()}; torch's words for a full "
                           f"disk among other write errors), {_free(path)} free there") from e


def _free(path: Path) -> str:
    existing = next(p for p in (path, *path.parents) if p.exists())
    return f"{shutil.disk_usage(existing).free / 2**20:.0f} MiB"


def write_manifest(directory: Path) -> None:
    """``manifest.json``: every file under ``directory`` with its size; written last, it vouches for the rest."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _remove(path: Path) -> None:
    """Delete a checkpoint so that no interruption leaves it half-deleted under its own name."""
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, state: TrainState,
                    keep_last: int, settings: str) -> Path:
    """Write ``step_N`` with the ``settings`` (resolved YAML) its steps ran with, refusing non-finite weights;
    then prune this run's oldest beyond ``keep_last``."""
    final = run_dir / "checkpoints" / f"step_{state.step}"
    check_finite(accelerator, model, final.name, run_dir)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        with writing(tmp):
            accelerator.save_state(str(tmp))
    except StorageError:
        shutil.rmtree(tmp, ignore_errors=True)  # a cut save frees its space; the last good checkpoint stays
        raise
    accelerator.wait_for_everyone()
    state.checkpoints = [name for name in state.checkpoints if name != final.name] + [final.name]
    pruned = state.checkpoints[:-keep_last] if keep_last > 0 else []
    state.checkpoints = state.checkpoints[len(pruned):]
    if accelerator.is_main_process:
        with writing(tmp):
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
            (tmp / CONFIG_FILE).write_text(settings)
            write_manifest(tmp)
        if final.exists():
            _remove(final)
        tmp.rename(final)
        for name in pruned:
            if (run_dir / "checkpoints" / name).exists():
                _remove(run_dir / "checkpoints" / name)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, run_dir: Path) -> TrainState:
    """Restore ``path`` (validated by :func:`resolve_resume`); its run's checkpoint list carries on only when it
    lives in this ``run_dir``."""
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, ValueError, EOFError, OSError) as e:  # a file corrupt within its recorded size
        raise CheckpointError(f"resume from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    if path.parent.resolve() != (run_dir / "checkpoints").resolve():
        state.checkpoints = []  # another run's checkpoints are never ours to prune
    return state


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (a list is a leaf)."""
    if not isinstance(tree, Mapping) or not tree:
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def changed_settings(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{dotted key: [saved value, new value]}`` for every setting outside :data:`RESUME_FREE` that differs."""
    old, now = _flat(saved), _flat(new)
    return {key: [old.get(key), now.get(key)] for key in sorted(old.keys() | now.keys())
            if old.get(key) != now.get(key) and not _under(key, RESUME_FREE)}


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_resume(path: Path, settings: Mapping[str, Any], world_size: int,
                 allowed: Sequence[str]) -> tuple[dict[str, list[Any]], int]:
    """The settings changed since checkpoint ``path`` (``world_size`` among them) and the data position
    (micro-batch in its epoch) to continue at; before any model loads.

    Refuses a change that ``allowed`` (``resume_allow_changes``: keys or their parents) does not name, and
    a new batch or world size whose micro-batches cannot start where the checkpoint stopped.
    """
    known = _flat(settings).keys() | {"world_size"}
    unknown = [key for key in allowed if not any(_under(k, [key]) for k in known)]
    if unknown:
        raise CheckpointError(f"resume_allow_changes={list(allowed)}: {unknown} name no setting")
    saved = OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE), resolve=True)
    state = json.loads((path / STATE_FILE).read_text())
    changes = changed_settings(saved, settings)
    if state["world_size"] != world_size:
        changes["world_size"] = [state["world_size"], world_size]
    refused = [key for key in changes if not _under(key, allowed)]
    if refused:
        listed = "; ".join(f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in refused)
        raise CheckpointError(f"resume from {path}: settings changed since this checkpoint ({listed}); resume with "
                              f"the same settings, or pass resume_allow_changes=[{','.join(refused)}]")
    samples = state["batch_in_epoch"] * saved["data"]["batch_size"] * state["world_size"]
    per_batch = settings["data"]["batch_size"] * world_size
    if samples % per_batch:
        raise CheckpointError(f"resume from {path}: the checkpoint stopped {samples} samples into its epoch, inside a "
                              f"micro-batch of data.batch_size={settings['data']['batch_size']} on {world_size} "
                              "ranks; resume at a batch or world size that divides it")
    return changes, samples // per_batch


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
