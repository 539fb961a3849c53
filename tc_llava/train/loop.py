"""The SFT loop, one recipe of Accelerate code for CPU, DDP and DeepSpeed ZeRO: :func:`train` runs
:func:`setup`, then :func:`step` until ``max_steps`` (checkpointing as it goes), then :func:`finish`.

Gradient accumulation is exact: a window of ``k`` micro-batches is normalised by the label
tokens of the whole window on every rank (``num_items_in_batch``), so its update equals
the update of one batch ``k`` times larger (PLLaVA's loop zeroes gradients inside the
window; this one does not).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo.utils import counters as dynamo_counters
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, gather_object, set_seed
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from tc_llava.data.collate import MODEL_KEYS, DataReport, PackingCollator, SFTCollator
from tc_llava.data.datasets import DataError
from tc_llava.data.templates import get_template
from tc_llava.model.build import model_from_config
from tc_llava.model.hf_compat import enable_activation_checkpointing
from tc_llava.model.sequence_parallel import SequenceParallel
from tc_llava.model.tc_llava import WeightsError
from tc_llava.provenance import run_meta
from tc_llava.runtime import fix_numerics
from tc_llava.train.checkpoint import (
    CONFIG_FILE, CheckpointError, NonFiniteError, RunDirError, StorageError, TrainState, check_resume, check_run_dir,
    claim_run_dir, clear_run_dir, export_model, load_checkpoint, save_checkpoint, writing,
)
from tc_llava.train.optim import cosine_with_warmup, param_groups
from tc_llava.train.settings import SettingsError, check_train_config
from tc_llava.train.tuning import apply_tuning, trainable_summary

log = logging.getLogger(__name__)

# What train() raises for a mistake in what it was given, or to stop before its state is poisoned.
TRAIN_ERRORS = (SettingsError, DataError, RunDirError, NonFiniteError, CheckpointError, WeightsError, StorageError)
METRICS = "metrics.jsonl"  # one row per optimizer step, in run_dir
TRAINING_RECORD = "training.json"  # in the export: the settings of its last step and the changes allowed on resume


def make_accelerator(cfg: DictConfig) -> Accelerator:
    """Accelerator for ``cfg.trainer``; the DeepSpeed JSON comes from the trainer config."""
    t = cfg.trainer
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    plugin = None
    if t.deepspeed:
        plugin = DeepSpeedPlugin(hf_ds_config=str(t.deepspeed), gradient_clipping=t.max_grad_norm,
                                 gradient_accumulation_steps=t.grad_accum)
    return Accelerator(
        # without cpu=True, the CPU ranks of a launch silently train alone (DeepSpeed inits its own group)
        cpu=not torch.cuda.is_available() and plugin is None,
        mixed_precision=t.mixed_precision,
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, whatever the world size
        deepspeed_plugin=plugin,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum, sync_with_dataloader=False),
        log_with="wandb" if cfg.logging.wandb.mode != "disabled" else None,
        kwargs_handlers=[InitProcessGroupKwargs(backend=t.backend)] if t.backend and distributed else [],
    )


def sequence_parallel(accelerator: Accelerator, size: int) -> SequenceParallel | None:
    """This process's sequence-parallel group of ``trainer.sp_size`` processes (None for 1): ranks ``[k * size,
    (k + 1) * size)`` form group ``k`` (on one host, or a node's consecutive ranks). Every process creates every
    group, as torch requires."""
    if size == 1:
        return None
    rank = accelerator.process_index
    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, accelerator.num_processes, size)]
    return SequenceParallel(groups[rank // size], rank % size, size)


def shard_loader(accelerator: Accelerator, loader: torch.utils.data.DataLoader,
                 sp: SequenceParallel | None) -> torch.utils.data.DataLoader:
    """The loader sharded over data-parallel ranks only, with accelerate's own settings: the processes of one SP
    group draw the same batches (each then holds a share of their sequences). Marked prepared, so that
    ``accelerator.prepare`` takes it as it is and its checkpoints save it."""
    if sp is None:
        return loader
    prepared = prepare_data_loader(
        loader, accelerator.device, num_processes=accelerator.num_processes // sp.size,
        process_index=accelerator.process_index // sp.size, split_batches=accelerator.split_batches,
        put_on_device=accelerator.device_placement, rng_types=accelerator.rng_types.copy(),
        dispatch_batches=accelerator.dispatch_batches, even_batches=accelerator.even_batches,
        use_seedable_sampler=accelerator.use_seedable_sampler, data_seed=accelerator.dataloader_config.data_seed,
        non_blocking=accelerator.non_blocking, use_stateful_dataloader=accelerator.use_stateful_dataloader,
    )
    prepared._is_accelerate_prepared = True
    plugin = accelerator.state.deepspeed_plugin  # DeepSpeed's "auto" micro-batch is read off the loader's batch_size,
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):  # which a sharded loader leaves None
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = loader.batch_size
    return prepared


def make_collator(data: DictConfig, pad_token_id: int, longest: int | None = None) -> SFTCollator:
    """The training collator, the one place packing is decided: ``data.collator``, or with ``data.packing`` a
    :class:`PackingCollator` of ``data.pack`` and the collator's ``pad_to_multiple_of`` (evaluation never packs).

    ``longest``, the most tokens the dataset's samples can have, is refused above ``data.pack.max_tokens``
    here, before any batch is drawn, rather than when the first sample that long comes.
    """
    if not data.packing:
        return instantiate(data.collator, pad_token_id=pad_token_id)
    max_tokens = data.pack.max_tokens
    if longest is not None and max_tokens is not None and longest > max_tokens:
        raise SettingsError(f"data.pack.max_tokens={max_tokens}: expected >= {longest}, the most tokens a sample can "
                            f"have (data.max_txt_len={data.max_txt_len} text tokens and the most visual tokens)")
    return PackingCollator(pad_token_id, max_tokens, data.pack.strategy, data.collator.pad_to_multiple_of)


def micro_batches(loader, accelerator: Accelerator, state: TrainState,
                  report: DataReport) -> Iterator[dict[str, Any]]:
    """Endless stream of micro-batches across epochs, from the saved data position on.

    The epoch is set on the prepared loader, not the dataset: accelerate's loader calls the dataset's
    ``set_epoch`` with its own pass counter when each pass starts (``skip_first_batches`` copies that
    counter), so a counter left at 0 by a resumed run would replay epoch 0's order and frame draws.
    Each batch's samples, truncations and skips are counted, and reported per epoch.
    """
    while True:
        loader.set_epoch(state.epoch)
        start = state.batch_in_epoch
        batches = accelerator.skip_first_batches(loader, start) if start else loader
        for batch in batches:
            state.batch_in_epoch += 1
            report.update(batch)
            yield batch
        report.end_epoch(state.epoch)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def cast_trainable_to_bf16(model: nn.Module) -> None:
    """The ZeRO bf16 cast: DeepSpeed flattens the trainable parameters of one dtype only, and under
    ZeRO-3 the base weights are built in bf16 already while peft's new adapters are fp32 (its fp32
    master copy of them stays in the optimizer)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)


def compile_layers(model: nn.Module) -> None:
    """Regional compilation: each LLM decoder layer compiled in place (one graph serves all layers).

    In place (``Module.compile``), so parameter names, checkpoints and exports are unchanged.
    Dynamo marks the sequence length dynamic after its first recompile; with the collator's
    ``pad_to_multiple_of`` buckets there are few shapes anyway (``compiled_graphs`` in metrics).
    """
    for layer in model.language_model.layers:
        layer.compile()


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (grows on every recompile)."""
    return int(dynamo_counters["stats"]["unique_graphs"])


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` rows after ``step``: a resumed run logs those steps again.

    Lines cut by an interrupted write (a kill, a full disk) can only be the last ones: they are dropped and
    counted in one line. A line that does not parse with good rows after it is refused, naming it.
    """
    if not path.exists():
        return
    rows, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            torn.append(number)
            continue
        if row is None:
            continue
        if torn:
            raise CheckpointError(f"{path}:{torn[0]}: not a JSON row, with rows after it (not a cut last line); "
                                  "repair or delete the file")
        if row["step"] <= step:
            rows.append(line)
    if torn:
        log.warning("%s: dropped %d torn last line(s) (a write cut short)", path, len(torn))
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp):
        tmp.write_text("".join(row + "\n" for row in rows))
    tmp.replace(path)


@dataclass
class Run:
    """What the steps of one training run share; built by :func:`setup`."""

    cfg: DictConfig
    run_dir: Path
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    state: TrainState
    report: DataReport
    stream: Iterator[dict[str, Any]]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train per ``cfg``; returns the final state (losses, data counts) and the export's path.

    The recipe: set up (checks, run dir, model, data, optimizer, resume), then optimizer
    steps with a checkpoint every ``trainer.save_every`` and at the end, then the export.
    """
    run = setup(cfg)
    settings = OmegaConf.to_yaml(cfg, resolve=True)
    bar = tqdm(total=run.total_steps, initial=run.state.step, disable=not run.accelerator.is_main_process,
               desc="train")
    while run.state.step < run.total_steps:
        row = step(run)
        log_step(run, row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if run.state.step % cfg.trainer.save_every == 0 or run.state.step == run.total_steps:
            run.state.data = run.report.state_dict()
            save_checkpoint(run.accelerator, run.model, run.run_dir, run.state, cfg.trainer.keep_last, settings)
    bar.close()
    return finish(run)


def setup(cfg: DictConfig) -> Run:
    """Everything before the first step, cheapest checks first: nothing loads before the settings and
    the run dir are known to be right, and a resumed run continues its state and its records."""
    t = cfg.trainer
    check_train_config(cfg)
    fix_numerics(cfg.threads, cfg.deterministic)
    run_dir = Path(cfg.run_dir)
    accelerator = make_accelerator(cfg)
    claim_run_dir(accelerator, run_dir)  # one process per run_dir: locked before anything there is read or written
    resume_from = check_run_dir(run_dir, cfg.resume, cfg.get("overwrite", False))
    changes, position = {}, 0
    if resume_from is not None:  # changed settings are refused before anything loads
        changes, position = check_resume(resume_from, OmegaConf.to_container(cfg, resolve=True),
                                         accelerator.num_processes // t.sp_size,
                                         list(cfg.get("resume_allow_changes") or []))
    accelerator.wait_for_everyone()  # every rank has looked before the main process clears anything
    set_seed(cfg.seed, device_specific=False)
    if accelerator.is_main_process:
        if cfg.get("overwrite", False):
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None or not (run_dir / CONFIG_FILE).exists():  # the run's first settings, kept
            (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / "meta.json").write_text(json.dumps(run_meta(), indent=1))

    model = model_from_config(cfg)
    set_seed(cfg.seed, device_specific=False)  # LoRA's init must not depend on how the model was loaded
    apply_tuning(model, **cfg.tuning)
    if t.deepspeed and t.mixed_precision == "bf16":
        cast_trainable_to_bf16(model)
    if t.gradient_checkpointing:
        enable_activation_checkpointing(model.hf)
    model.offload_checkpoints = t.offload_checkpoints
    sp = sequence_parallel(accelerator, t.sp_size)
    model.shard_sequence(sp)
    if t.compile:
        compile_layers(model)
    log.info("parameters: %s", trainable_summary(model))

    try:
        dataset = instantiate(cfg.data.dataset, tokenizer=model.tokenizer, image_processor=model.frame_processor,
                              num_visual_tokens=model.tokens_per_video)
    except InstantiationException as e:  # Hydra wraps the dataset's own error, in its repr: bad data is one line
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.data.batch_size, shuffle=False, drop_last=True, num_workers=cfg.data.num_workers,
        collate_fn=make_collator(cfg.data, model.tokenizer.pad_token_id, dataset.max_length()),
        generator=torch.Generator().manual_seed(cfg.seed),  # iterators must not draw from the global RNG
    )
    data_ranks = accelerator.num_processes // t.sp_size  # each SP group draws one data-parallel share of the batches
    steps_per_epoch = len(loader) // (t.grad_accum * data_ranks)
    loader = shard_loader(accelerator, loader, sp)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(param_groups(model, t.lr, t.projector_lr, t.weight_decay), lr=t.lr,
                                  betas=tuple(t.betas))
    scheduler = cosine_with_warmup(optimizer, total_steps, math.ceil(t.warmup_ratio * total_steps), t.min_lr_ratio)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.init_trackers(cfg.logging.project, config=OmegaConf.to_container(cfg, resolve=True),
                              init_kwargs={"wandb": {"mode": cfg.logging.wandb.mode, "dir": str(run_dir)}})

    state = TrainState(world_size=data_ranks)
    # an SP group's processes count the same batches: its first process's counts stand for the group
    report = DataReport(dataset.load_skips, gather=lambda counts: gather_object([counts])[::t.sp_size])
    if resume_from is not None:
        state = resumed(accelerator, resume_from, run_dir, report, changes, position, data_ranks)
    if accelerator.is_main_process:
        keep_metrics_until(run_dir / METRICS, state.step)
    return Run(cfg, run_dir, accelerator, model, optimizer, scheduler, total_steps, state, report,
               micro_batches(loader, accelerator, state, report))


def resumed(accelerator: Accelerator, path: Path, run_dir: Path, report: DataReport, changes: dict[str, list[Any]],
            position: int, data_ranks: int) -> TrainState:
    """The state of checkpoint ``path``, continued at ``position`` (micro-batch in its epoch, in this run's batch
    size and ``data_ranks`` data-parallel ranks) with ``changes`` (the settings resume_allow_changes let change)
    recorded."""
    state = load_checkpoint(accelerator, path, run_dir)
    report.load_state_dict(state.data, main=accelerator.is_main_process)
    state.batch_in_epoch, state.world_size = position, data_ranks
    if changes:
        state.setting_changes.append({"step": state.step, "changes": changes})
        log.warning("resuming with changed settings (resume_allow_changes): %s",
                    "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()))
    log.info("resumed from %s at step %d", path, state.step)
    return state


def step(run: Run) -> dict[str, Any]:
    """One optimizer step over ``trainer.grad_accum`` micro-batches; returns its metrics row.

    A NaN/inf loss, or a NaN/inf gradient norm behind a finite loss, stops the run before the
    optimizer moves a weight (:class:`NonFiniteError`): the last checkpoint stays the last good one.
    """
    t, accelerator, model = run.cfg.trainer, run.accelerator, run.model
    checkpoints = run.run_dir / "checkpoints"
    tic = time.perf_counter()
    window = [next(run.stream) for _ in range(t.grad_accum)]
    # Sums over processes count each SP group's batches t.sp_size times: divided back.
    n_items = accelerator.reduce(sum((b["labels"][:, 1:] != -100).sum() for b in window).to(accelerator.device)) \
        // t.sp_size
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in window:
        with accelerator.accumulate(model):
            loss = model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, num_items_in_batch=n_items).loss
            if not bool(accelerator.gather(torch.isfinite(loss.detach())[None]).all()):
                raise NonFiniteError(
                    f"non-finite loss at step {run.state.step + 1} (sources {batch['sources']}); stopping. "
                    f"The last good checkpoint is untouched under {checkpoints}"
                )
            loss_sum += loss.detach()
            # The loss is normalised by the whole window's label tokens on all ranks; accelerate
            # divides by grad_accum and DDP averages over ranks, so both are multiplied back. Under sequence
            # parallelism each process's gradient is its share's part: DDP's sum over the group adds them up.
            accelerator.backward(loss * t.grad_accum * accelerator.num_processes)
    # The global norm over all ranks' synced gradients; under DeepSpeed the engine has already
    # skipped a step whose gradients overflowed (bf16/fp16 check_grad_overflow) and reports inf.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        raise NonFiniteError(
            f"non-finite gradient norm ({float(grad_norm)}) at step {run.state.step + 1} with a finite loss "
            f"{accelerator.reduce(loss_sum, 'sum').item() / t.sp_size:.4g}; stopping before the optimizer step. "
            f"The last good checkpoint is untouched under {checkpoints}"
        )
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
    run.state.step += 1
    step_loss = accelerator.reduce(loss_sum, "sum").item() / t.sp_size  # every SP process reports its group's loss
    run.state.losses.append(step_loss)
    elapsed = time.perf_counter() - tic
    # Real tokens and the slots they were padded (or packed) into: their ratio is the batches' fill.
    tokens, slots = accelerator.reduce(torch.tensor(
        [sum(int(b["attention_mask"].sum()) for b in window), sum(b["attention_mask"].numel() for b in window)],
        device=accelerator.device)).tolist()
    tokens, slots = tokens / t.sp_size, slots / t.sp_size
    samples = sum(b["num_samples"] for b in window) * accelerator.num_processes // t.sp_size
    return {"step": run.state.step, "loss": step_loss, "lr": run.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed, "pad_fraction": 1 - tokens / slots,
            "peak_mem_gb": peak_memory_gb(),
            "compiled_graphs": compiled_graphs()}


def log_step(run: Run, row: dict[str, Any]) -> None:
    """A step's metrics to the trackers (wandb when on) and one line of ``metrics.jsonl``."""
    run.accelerator.log(row, step=row["step"])
    if run.accelerator.is_main_process:
        with writing(run.run_dir / METRICS), (run.run_dir / METRICS).open("a") as f:
            f.write(json.dumps(row) + "\n")


def finish(run: Run) -> dict[str, Any]:
    """The data report and, with ``export.enabled``, the model exported to ``run_dir/export``."""
    cfg = run.cfg
    run.state.data = run.report.state_dict()
    totals, media = run.report.totals(), run.report.media_totals()
    log.info("data: %s, %s", totals, media)
    exported = None
    if cfg.export.enabled:
        def build_fresh():
            fresh = model_from_config(cfg)
            recorded = frame_sampling(cfg)  # a Qwen-VL export records its frame budget instead of a frame count
            fresh.frame_sampling = recorded if fresh.preprocessing is None else {"system": recorded["system"]}
            return fresh, apply_tuning(fresh, **cfg.tuning)

        exported = export_model(run.accelerator, run.model, build_fresh, run.run_dir / "export",
                                lora=cfg.tuning.llm == "lora", merge_lora=cfg.export.merge_lora)
        if exported is not None:
            record = {"settings": OmegaConf.to_container(cfg, resolve=True),
                      "setting_changes": run.state.setting_changes}
            (exported / TRAINING_RECORD).write_text(json.dumps(record, indent=1))
    # The DDP wrapper's gloo reducer must go while its process group lives: freed after end_training destroys
    # the group (accelerate 1.16), its destructor deadlocks and the run never exits.
    run.model, run.optimizer = run.accelerator.free_memory(run.model, run.optimizer)
    run.accelerator.end_training()
    return {**asdict(run.state), "data": totals, "media": media,
            "export": str(exported) if exported else None, "run_dir": str(run.run_dir)}


def frame_sampling(cfg: DictConfig) -> dict[str, Any]:
    """How the run showed videos to the model, recorded in its export (the chat app's default frame count), and
    the system text its prompts began with (SFTDataset's: ``data.system``, null meaning the template's own)."""
    sampling = "random" if cfg.data.dataset.get("train", True) else "middle"  # SFTDataset's train switch
    system = get_template(cfg.data.template).system if cfg.data.system is None else cfg.data.system
    return {"num_frames": cfg.data.num_frames, "image_frames": cfg.data.get("image_frames"), "sampling": sampling,
            "system": system}
