"""The RL app's settings, checked in full before any model loads, and the run directory's name.

An unknown reward, ``G < 2``, a prompt set that is not there or a trainer number out of range is
one line naming the key, raised before the policy (possibly a 7B) is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tc_llava.model.families import family_of
from tc_llava.rl.grpo import GRPOSettings
from tc_llava.rl.prompts import check_prompts
from tc_llava.rl.rewards import check_weights
from tc_llava.train.settings import SettingsError, check_rules, check_run_settings, check_trainer, run_name


def algorithm_label(algorithm: DictConfig) -> str:
    """``grpo``, ``dapo``, ``dr_grpo``; ``t_`` before it with the temporal contrast (``t_grpo``)."""
    prefix = "t_" if algorithm.get("temporal_contrast") else ""
    return f"{prefix}{algorithm.get('loss_type')}"


def rl_run_name(algorithm: DictConfig, rope: DictConfig | None, mask: DictConfig | None,
                projector: DictConfig | None) -> str:
    """Resolver ``${rl_run_name:algorithm,rope,mask,projector}``: ``t_grpo-saved-saved`` (the checkpoint's rules),
    ``grpo-tad-frame_block_causal``; the runs of a sweep over algorithms and rules never share a directory."""
    return f"{algorithm_label(algorithm)}-{run_name(rope, mask, projector)}"


OmegaConf.register_new_resolver("rl_run_name", rl_run_name, replace=True)


def grpo_settings(cfg: DictConfig) -> GRPOSettings:
    """``cfg.algorithm`` as :class:`GRPOSettings`; an unknown key or a bad value is a :class:`SettingsError`."""
    fields = OmegaConf.to_container(cfg.algorithm, resolve=True)
    unknown = sorted(set(fields) - set(GRPOSettings.__dataclass_fields__))
    if unknown:
        raise SettingsError(f"algorithm: unknown key(s) {unknown}; known: {sorted(GRPOSettings.__dataclass_fields__)}")
    try:
        return GRPOSettings(**fields)
    except ValueError as e:
        raise SettingsError(str(e)) from None


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise SettingsError(f"{key}={value!r}: expected {expected}")


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_policy_frames(model: DictConfig, prompts: DictConfig) -> None:
    """A Qwen-VL policy's frame budget chooses its frames (as the evaluator takes them): ``prompts.num_frames``
    must then be null (the family read from the checkpoint's ``config.json`` or the tiny model's ``arch``)."""
    checkpoint = model.get("checkpoint")
    if checkpoint is not None:
        model_type = json.loads((Path(checkpoint) / "config.json").read_text()).get("model_type")
    else:
        model_type = model.tiny.get("arch", "llava")
    if family_of(model_type, "model").multimodal_rope and prompts.num_frames is not None:
        raise SettingsError(f"prompts.num_frames={prompts.num_frames}: a {model_type} policy takes the frames its "
                            "frame budget chooses (model.frame_budget); set prompts.num_frames=null")


def check_rl_config(cfg: DictConfig, world_size: int = 1) -> tuple[GRPOSettings, dict[str, float]]:
    """Every setting of the app (the algorithm, the reward weights, the prompt set, the trainer, the model and
    the rules); returns the algorithm and the weights. Call before any model loads."""
    check_run_settings(cfg)
    settings = grpo_settings(cfg)
    try:
        weights = check_weights(OmegaConf.to_container(cfg.rewards, resolve=True))
        check_policy_frames(cfg.model, cfg.prompts)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    check_trainer(cfg.trainer)
    _require(cfg.trainer.max_steps is not None, "trainer.max_steps", None,
             "an integer >= 1 (steps are rollout batches)")
    p = cfg.prompts
    _require(_is_int(p.batch_size, 1) and p.batch_size % world_size == 0, "prompts.batch_size", p.batch_size,
             f"an integer >= 1 that divides among the {world_size} process(es)")
    _require(p.num_frames is None or _is_int(p.num_frames, 1), "prompts.num_frames", p.num_frames,
             "null (the export's) or an integer >= 1")
    _require(cfg.trainer.grad_accum <= p.batch_size * settings.num_generations // world_size, "trainer.grad_accum",
             cfg.trainer.grad_accum, f"at most the {p.batch_size * settings.num_generations // world_size} completions "
             "of a process's rollout batch (each optimiser step's batch splits into grad_accum parts)")
    try:
        check_prompts(p)
    except (ValueError, FileNotFoundError) as e:
        raise SettingsError(f"prompts: {e}") from None
    check_rules(cfg)
    return settings, weights
