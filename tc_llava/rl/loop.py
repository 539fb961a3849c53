"""The RL loop, read top to bottom: :func:`train` runs :func:`setup`, then :func:`step` until ``trainer.max_steps``
(checkpointing as it goes), then :func:`finish`, the SFT app's recipe (:mod:`tc_llava.train.loop`) with its run
directories, checkpoints, resume checks, NaN guard and export.

A step: take ``prompts.batch_size`` prompts -> G sampled completions each (and, with T-GRPO, completions on
shuffled frames) -> rewards -> group advantages -> ``algorithm.num_iterations`` optimiser steps over the
rollout batch with importance ratios (:func:`tc_llava.rl.grpo.policy_loss`) -> one ``metrics.jsonl`` row and
one ``rollouts.jsonl`` row per prompt. Which prompts a step takes and every sampling seed are functions of
``seed`` and the step, so a resumed run repeats the rollouts of an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from tc_llava.data.inputs import ClipEncoder
from tc_llava.data.templates import stop_token_ids
from tc_llava.model.build import model_from_config
from tc_llava.model.hf_compat import enable_activation_checkpointing
from tc_llava.provenance import run_meta
from tc_llava.rl.grpo import GRPOSettings, group_advantages, policy_loss, temporal_bonus
from tc_llava.rl.prompts import Prompt, PromptInputs, load_prompts, step_prompts
from tc_llava.rl.rewards import REWARDS, score
from tc_llava.rl.rollout import Completions, frame_orders, reference, repeat_rows, sample, take_rows, token_logps
from tc_llava.rl.settings import check_rl_config
from tc_llava.runtime import fix_numerics
from tc_llava.train.checkpoint import (
    CONFIG_FILE, STATE_FILE, CheckpointError, NonFiniteError, TrainState, changed_settings, check_run_dir,
    claim_run_dir, clear_run_dir, export_model, load_checkpoint, save_checkpoint, writing,
)
from tc_llava.train.loop import (
    METRICS, TRAIN_ERRORS, cast_trainable_to_bf16, keep_metrics_until, make_accelerator, peak_memory_gb,
)
from tc_llava.train.optim import cosine_with_warmup, param_groups
from tc_llava.train.tuning import apply_tuning, trainable_summary

log = logging.getLogger(__name__)

RL_ERRORS = TRAIN_ERRORS
ROLLOUTS = "rollouts.jsonl"  # one row per prompt and step, in run_dir


def derived_seed(seed: int, *parts: object) -> int:
    """A 60-bit seed from the run's seed and ``parts`` (step, rank, what it seeds): recorded, and the same on resume."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).hexdigest()
    return int(digest[:15], 16)


@dataclass
class Run:
    """What the steps of one RL run share; built by :func:`setup`."""

    cfg: DictConfig
    run_dir: Path
    accelerator: Accelerator
    model: nn.Module  # accelerate-prepared
    policy: nn.Module  # the TCLlava inside it (generation, tokenizer)
    adapters: Any  # peft's handle with LoRA (the reference: adapters disabled), else None
    ref_model: nn.Module | None  # full fine-tuning with beta > 0: a frozen copy of the start
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    algo: GRPOSettings
    weights: dict[str, float]
    prompts: list[Prompt]
    inputs: PromptInputs
    stops: list[int]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the RL stage per ``cfg``; returns its state (per-step losses) and the export's path."""
    run = setup(cfg)
    settings = OmegaConf.to_yaml(cfg, resolve=True)
    total = cfg.trainer.max_steps
    bar = tqdm(total=total, initial=run.state.step, disable=not run.accelerator.is_main_process, desc="rl")
    while run.state.step < total:
        row, rollouts = step(run)
        log_step(run, row, rollouts)
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.3f}", loss=f"{row['loss']:.4f}")
        bar.update(1)
        if run.state.step % cfg.trainer.save_every == 0 or run.state.step == total:
            save_checkpoint(run.accelerator, run.model, run.run_dir, run.state, cfg.trainer.keep_last, settings)
    bar.close()
    return finish(run)


def check_resume(path: Path, settings: Mapping[str, Any], world_size: int, allowed: Sequence[str]) -> None:
    """Refuse a resume whose settings (or process count) changed since checkpoint ``path``, unless ``allowed``
    (``resume_allow_changes``) names them; before any model loads."""
    saved = OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE), resolve=True)
    changes = changed_settings(saved, settings)
    if json.loads((path / STATE_FILE).read_text())["world_size"] != world_size:
        changes["world_size"] = ["another", world_size]
    refused = [k for k in changes if not any(k == a or k.startswith(a + ".") for a in allowed)]
    if refused:
        listed = "; ".join(f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in refused)
        raise CheckpointError(f"resume from {path}: settings changed since this checkpoint ({listed}); resume with "
                              f"the same settings, or pass resume_allow_changes=[{','.join(refused)}]")


def setup(cfg: DictConfig) -> Run:
    """Everything before the first step, cheapest checks first (the SFT app's order)."""
    algo, weights = check_rl_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    accelerator = make_accelerator(cfg)
    fix_numerics(cfg.threads, cfg.deterministic)
    run_dir = Path(cfg.run_dir)
    claim_run_dir(accelerator, run_dir)
    resume_from = check_run_dir(run_dir, cfg.resume, cfg.get("overwrite", False))
    if resume_from is not None:
        check_resume(resume_from, OmegaConf.to_container(cfg, resolve=True), accelerator.num_processes,
                     list(cfg.get("resume_allow_changes") or []))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cfg.get("overwrite", False):
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None or not (run_dir / CONFIG_FILE).exists():
            (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / "meta.json").write_text(json.dumps(run_meta(), indent=1))

    t = cfg.trainer
    policy = model_from_config(cfg)
    set_seed(cfg.seed, device_specific=False)  # LoRA's init must not depend on how the model was loaded
    ref_model = None
    if cfg.tuning.llm != "lora" and algo.beta:  # full fine-tuning: the reference is a frozen copy of the start
        ref_model = copy.deepcopy(policy).requires_grad_(False).eval()
    adapters = apply_tuning(policy, **cfg.tuning)
    if t.deepspeed and t.mixed_precision == "bf16":
        cast_trainable_to_bf16(policy)
    if t.gradient_checkpointing:
        enable_activation_checkpointing(policy.hf)
    log.info("parameters: %s", trainable_summary(policy))
    prompts = load_prompts(cfg.prompts, policy.tokenizer)
    recorded = (policy.frame_sampling or {}).get("num_frames")
    num_frames = cfg.prompts.num_frames or recorded or 8
    inputs = PromptInputs(cfg.prompts, policy, num_frames)

    optimizer = torch.optim.AdamW(param_groups(policy, t.lr, t.projector_lr, t.weight_decay), lr=t.lr,
                                  betas=tuple(t.betas))
    optimizer_steps = t.max_steps * algo.num_iterations
    scheduler = cosine_with_warmup(optimizer, optimizer_steps, math.ceil(t.warmup_ratio * optimizer_steps),
                                   t.min_lr_ratio)
    if accelerator.state.deepspeed_plugin is not None:  # no loader for DeepSpeed to read its micro-batch from
        rows = cfg.prompts.batch_size // accelerator.num_processes * algo.num_generations
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
            math.ceil(rows / t.grad_accum)
    model, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    if ref_model is not None:
        ref_model.to(accelerator.device)
    accelerator.init_trackers(cfg.logging.project, config=OmegaConf.to_container(cfg, resolve=True),
                              init_kwargs={"wandb": {"mode": cfg.logging.wandb.mode, "dir": str(run_dir)}})
    state = TrainState(world_size=accelerator.num_processes)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, run_dir)
        state.world_size = accelerator.num_processes
        log.info("resumed from %s at step %d", resume_from, state.step)
    if accelerator.is_main_process:
        for name in (METRICS, ROLLOUTS):
            keep_metrics_until(run_dir / name, state.step)
    stops = stop_token_ids(policy.tokenizer, cfg.prompts.template)
    return Run(cfg, run_dir, accelerator, model, accelerator.unwrap_model(model), adapters, ref_model, optimizer,
               scheduler, state, algo, weights, prompts, inputs, stops)


def part_of(completions: Completions, rows: Tensor) -> Completions:
    return Completions(completions.ids[rows], completions.mask[rows], [completions.texts[i] for i in rows.tolist()])


def accuracy_of(per_function: Mapping[str, Sequence[float | None]], size: int) -> list[float]:
    """Each completion's accuracy: the unweighted sum of the answer checks that apply to it (not ``format``)."""
    checks = [name for name in per_function if REWARDS[name].answer_type is not None]
    return [sum(per_function[name][i] or 0.0 for name in checks) for i in range(size)]


def on_device(run: Run, batch: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt batch on the process's device, frames in the policy's dtype, ``num_frames`` on the host."""
    dtype, device = next(run.policy.parameters()).dtype, run.accelerator.device
    return {key: value if key == "num_frames" else value.to(device, dtype if key.startswith("pixel_values") else None)
            for key, value in batch.items()}


def rollout(run: Run, batch: dict[str, Any], prompts: Sequence[Prompt], decoded: Sequence[Any]) -> dict[str, Any]:
    """Sample, score and (T-GRPO) contrast one process's rollout batch (``decoded``: the prompts' frames, which the
    shuffled group re-encodes in its orders); returns the completions, the rewards and what the records and
    metrics need."""
    cfg, algo, policy, rank = run.cfg, run.algo, run.policy, run.accelerator.process_index
    first = rank * len(prompts)  # the step's prompts are numbered over all processes: seeds ignore the process count

    def seeds(what: str, many: int) -> list[int]:  # one per completion: (step, prompt's place in the step, g)
        return [derived_seed(cfg.seed, run.state.step, first + j, what, g) for j in range(len(prompts))
                for g in range(many)]

    group = repeat_rows(batch, algo.num_generations)
    sampling = dict(max_new_tokens=algo.max_completion_length, temperature=algo.temperature, top_p=algo.top_p,
                    stops=run.stops, pad_token_id=policy.tokenizer.pad_token_id)
    ordered_seeds = seeds("ordered", algo.num_generations)
    completions = sample(policy, group, seeds=ordered_seeds, **sampling)
    solutions = [p.solution for p in prompts for _ in range(algo.num_generations)]
    types = [p.answer_type for p in prompts for _ in range(algo.num_generations)]
    prefix = cfg.prompts.prompt.pred_prefix  # the priming the evaluator puts back before its answer check
    scored = score([prefix + text for text in completions.texts], solutions, types, run.weights)
    accuracy = accuracy_of(scored.per_function, len(solutions))
    total = torch.tensor(scored.total, dtype=torch.float64)
    out = {"group": group, "completions": completions, "scored": scored, "accuracy": accuracy,
           "seeds": ordered_seeds}
    if algo.temporal_contrast:
        shuffle_seeds = seeds("frame_order", 1)
        orders = frame_orders(batch["num_frames"].tolist(), shuffle_seeds)
        shuffled = on_device(run, run.inputs.encode(prompts, decoded, orders))
        shuffled_seeds = seeds("shuffled", algo.num_shuffled)
        other = sample(policy, repeat_rows(shuffled, algo.num_shuffled), seeds=shuffled_seeds, **sampling)
        many = algo.num_shuffled
        other_scored = score([prefix + text for text in other.texts],
                             [p.solution for p in prompts for _ in range(many)],
                             [p.answer_type for p in prompts for _ in range(many)], run.weights)
        other_accuracy = accuracy_of(other_scored.per_function, len(prompts) * many)
        bonus = temporal_bonus(torch.tensor(accuracy, dtype=torch.float64).view(len(prompts), -1),
                               torch.tensor(other_accuracy, dtype=torch.float64).view(len(prompts), -1),
                               algo.temporal_alpha, algo.temporal_mu, algo.temporal_threshold).flatten()
        total = total + bonus
        out.update(shuffled={"seeds": shuffled_seeds, "frame_seeds": shuffle_seeds, "orders": orders,
                             "texts": other.texts, "accuracy": other_accuracy}, bonus=bonus.tolist())
    out["rewards"] = total
    return out


def logps_of(run: Run, net: nn.Module, inputs: Mapping[str, Any], part: Completions) -> Tensor:
    """The completion tokens' log-probabilities under ``net`` by the training forward (:func:`token_logps`)."""
    return token_logps(net, inputs, part, run.algo.temperature, run.policy.placeholder_token_id)


def step(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One rollout batch and its ``num_iterations`` optimiser steps; returns the metrics row and the rollout records."""
    cfg, algo, accelerator, model = run.cfg, run.algo, run.accelerator, run.model
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    tic = time.perf_counter()
    per_rank = cfg.prompts.batch_size // world
    picked = step_prompts(run.state.step, cfg.prompts.batch_size, len(run.prompts), cfg.seed)
    prompts = [run.prompts[i] for i in picked[rank * per_rank:(rank + 1) * per_rank]]
    dtype = next(run.policy.parameters()).dtype
    decoded = run.inputs.decode(prompts)
    batch = on_device(run, run.inputs.encode(prompts, decoded))
    out = rollout(run, batch, prompts, decoded)
    group, completions = out["group"], out["completions"]
    rewards = accelerator.gather(out["rewards"].to(device))  # every process's, in rank order
    advantages = group_advantages(rewards, algo.num_generations, algo.scale_rewards)
    local = advantages.view(world, -1)[rank].to(torch.promote_types(dtype, torch.float32))
    parts = torch.tensor_split(torch.arange(len(completions.texts)), cfg.trainer.grad_accum)  # micro-batches

    def no_grad_logps(net: nn.Module) -> Tensor:  # part by part, as the training forward will see them
        with torch.no_grad():
            return torch.cat([logps_of(run, net, take_rows(group, rows), part_of(completions, rows)) for rows in parts])

    model.eval()
    old = no_grad_logps(model) if algo.num_iterations > 1 else None
    ref = None
    if algo.beta:
        with reference(run.adapters if run.ref_model is None else None):
            ref = no_grad_logps(run.ref_model if run.ref_model is not None else model)
    rollout_s = time.perf_counter() - tic
    tic = time.perf_counter()
    losses, norms, stats = optimise(run, group, completions, parts, local, old, ref)
    run.state.step += 1
    run.state.losses.append(sum(losses) / len(losses))
    train_s = time.perf_counter() - tic
    return metrics_row(run, out, rewards, losses, norms, stats, rollout_s, train_s), records(run, prompts, out)


def optimise(run: Run, group: Mapping[str, Any], completions: Completions, parts: Sequence[Tensor], advantages: Tensor,
             old: Tensor | None, ref: Tensor | None) -> tuple[list[float], list[float | None], list[dict[str, float]]]:
    """``num_iterations`` optimiser steps over the rollout batch, each over ``parts`` (``trainer.grad_accum``
    micro-batches); returns each step's loss and gradient norm and each micro-batch's statistics.

    A NaN/inf loss or gradient norm stops the run before the optimiser moves a weight (:class:`NonFiniteError`)."""
    cfg, algo, accelerator, model = run.cfg, run.algo, run.accelerator, run.model
    world, device = accelerator.num_processes, accelerator.device
    where = f"The last good checkpoint is untouched under {run.run_dir / 'checkpoints'}"
    model.train()
    n_items = accelerator.reduce(completions.mask.sum().to(device), "sum")
    size = len(completions.texts)
    losses, norms, stats = [], [], []
    for iteration in range(algo.num_iterations):
        loss_sum = torch.zeros((), device=device)
        for rows in parts:
            with accelerator.accumulate(model):
                part = part_of(completions, rows)
                result = policy_loss(
                    logps_of(run, model, take_rows(group, rows), part), advantages[rows.to(device)], part.mask,
                    loss_type=algo.loss_type, old_logps=None if old is None else old[rows], epsilon=algo.epsilon,
                    epsilon_high=algo.epsilon_high, beta=algo.beta, ref_logps=None if ref is None else ref[rows],
                    max_completion_length=algo.max_completion_length, num_items=n_items)
                # grpo / dr_grpo are means over this part's sequences: weighted by its share of all processes'
                # sequences; dapo is normalised by all processes' tokens already. DDP averages over processes and
                # accelerate divides by grad_accum: both are multiplied back.
                share = len(rows) / (size * world) if algo.loss_type != "dapo" else 1.0
                loss = result.loss * share * world
                if not bool(accelerator.gather(torch.isfinite(loss.detach())[None]).all()):
                    raise NonFiniteError(f"non-finite loss at step {run.state.step + 1} (iteration {iteration + 1}); "
                                         f"stopping. {where}")
                accelerator.backward(loss * cfg.trainer.grad_accum)
                loss_sum += loss.detach() / world
                stats.append({k: float(v) for k, v in result.stats.items()})
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.trainer.max_grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise NonFiniteError(f"non-finite gradient norm ({float(grad_norm)}) at step {run.state.step + 1} "
                                 f"(iteration {iteration + 1}); stopping before the optimiser step. {where}")
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
        losses.append(accelerator.reduce(loss_sum, "sum").item())
        norms.append(None if grad_norm is None else float(grad_norm))
    return losses, norms, stats


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def metrics_row(run: Run, out: Mapping[str, Any], rewards: Tensor, losses: list[float], norms: list[float | None],
                stats: list[dict[str, float]], rollout_s: float, train_s: float) -> dict[str, Any]:
    """The step's ``metrics.jsonl`` row, over all processes: rewards (total and per function, over the completions
    each applies to), accuracy, malformed answers, KL, clip fractions, response length, seconds."""
    scored = out["scored"]
    gathered = gather_object([{"per_function": scored.per_function, "malformed": scored.malformed,
                               "accuracy": out["accuracy"], "shuffled": out.get("shuffled", {}).get("accuracy"),
                               "bonus": out.get("bonus")}])
    row: dict[str, Any] = {"step": run.state.step, "loss": losses[-1], "losses": losses,
                           "lr": run.scheduler.get_last_lr()[0], "grad_norm": norms[-1],
                           "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                           "accuracy": _mean([a for g in gathered for a in g["accuracy"]])}
    for name in run.weights:
        values = [v for g in gathered for v in g["per_function"][name] if v is not None]
        row[f"rewards/{name}"] = _mean(values)
        row[f"malformed/{name}"] = sum(g["malformed"][name] for g in gathered)
    keys = stats[0].keys()
    row.update({key: _mean([s[key] for s in stats]) for key in keys})
    if run.algo.temporal_contrast:
        row["shuffled_accuracy"] = _mean([a for g in gathered for a in g["shuffled"]])
        row["temporal_bonus"] = _mean([b for g in gathered for b in g["bonus"]])
    row.update(rollout_s=rollout_s, train_s=train_s, peak_mem_gb=peak_memory_gb())
    return row


def records(run: Run, prompts: Sequence[Prompt], out: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``rollouts.jsonl`` row per prompt of this process: its completions, rewards and each completion's sampling
    seed (and T-GRPO's frame order and the seed it was drawn from)."""
    g, texts, total = run.algo.num_generations, out["completions"].texts, out["rewards"].tolist()
    rows = []
    for j, prompt in enumerate(prompts):
        cut = slice(j * g, (j + 1) * g)
        row = {"step": run.state.step, "prompt": prompt.id, "solution": prompt.solution,
               "answer_type": prompt.answer_type, "seeds": out["seeds"][cut], "completions": texts[cut],
               "rewards": total[cut], "accuracy": out["accuracy"][cut]}
        if "shuffled" in out:
            s, many = out["shuffled"], run.algo.num_shuffled
            own = slice(j * many, (j + 1) * many)
            row["shuffled"] = {"frame_order": s["orders"][j], "frame_seed": s["frame_seeds"][j],
                               "seeds": s["seeds"][own], "completions": s["texts"][own], "accuracy": s["accuracy"][own]}
            row["bonus"] = out["bonus"][cut]
        rows.append(row)
    return rows


def log_step(run: Run, row: dict[str, Any], rollouts: list[dict[str, Any]]) -> None:
    """The step's row to the trackers and ``metrics.jsonl``; every process's prompts to ``rollouts.jsonl``."""
    run.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])
    everyone = [r for part in gather_object([rollouts]) for r in part]
    if run.accelerator.is_main_process:
        for name, lines in ((METRICS, [row]), (ROLLOUTS, everyone)):
            with writing(run.run_dir / name), (run.run_dir / name).open("a") as f:
                f.write("".join(json.dumps(line) + "\n" for line in lines))


def finish(run: Run) -> dict[str, Any]:
    """With ``export.enabled``, the policy exported to ``run_dir/export`` as the SFT app exports (eval, chat and
    the lmms-eval plugin load it alike)."""
    cfg = run.cfg
    exported = None
    if cfg.export.enabled:
        def build_fresh():
            fresh = model_from_config(cfg)
            if not isinstance(fresh.frame_processor, ClipEncoder):  # a Qwen-VL export records its frame budget
                fresh.frame_sampling = {**(run.policy.frame_sampling or {}), "num_frames": run.inputs.num_frames,
                                        "sampling": "middle"}
            return fresh, apply_tuning(fresh, **cfg.tuning)

        exported = export_model(run.accelerator, run.model, build_fresh, run.run_dir / "export",
                                lora=cfg.tuning.llm == "lora", merge_lora=cfg.export.merge_lora)
        if exported is not None:
            record = {"settings": OmegaConf.to_container(cfg, resolve=True), "stage": "rl"}
            (exported / "training.json").write_text(json.dumps(record, indent=1))
    run.model, run.optimizer = run.accelerator.free_memory(run.model, run.optimizer)
    run.accelerator.end_training()
    return {**asdict(run.state), "export": str(exported) if exported else None, "run_dir": str(run.run_dir)}
