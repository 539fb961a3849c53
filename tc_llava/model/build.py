"""Build a TC-LLaVA model from Hydra config nodes: a checkpoint path, or the tiny default."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tc_llava.model.attention import check_device, check_sequence_parallel, resolve_attention
from tc_llava.model.masks import MaskRule
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.rope import RopeRule
from tc_llava.model.settings import FLOAT_DTYPES
from tc_llava.model.tc_llava import TCLlava
from tc_llava.model.tiling import Tiling
from tc_llava.model.tiny import build_config, tiny_checkpoint


class ModelSettingsError(ValueError):
    """A ``model.*`` setting that cannot work, found before anything loads."""


def check_model_settings(model: DictConfig) -> None:
    """``model.checkpoint``, ``model.dtype`` and the attention backend, checked before anything loads.

    A ``???`` checkpoint merged over the base's value, or ``model.checkpoint=`` from an unset shell
    variable, would otherwise build the tiny random model and let training or evaluation exit 0.
    """
    if OmegaConf.is_missing(model, "checkpoint"):
        raise ModelSettingsError("model.checkpoint is not set: give the llava-hf directory to load, "
                                 "e.g. model=pretrained model.checkpoint=outputs/train/demo/export")
    checkpoint = model.get("checkpoint")
    if checkpoint is None and model.get("tiny") is None:
        raise ModelSettingsError("model.checkpoint=null names no model (only model=tiny* builds one): "
                                 "give the llava-hf directory to load")
    if checkpoint is not None:
        if not isinstance(checkpoint, str) or not checkpoint.strip():
            raise ModelSettingsError(f"model.checkpoint={checkpoint!r} is empty (an unset shell variable?): "
                                     "give the llava-hf directory to load")
        if not (Path(checkpoint) / "config.json").is_file():
            problem = "has no config.json" if Path(checkpoint).is_dir() else "not found"
            raise ModelSettingsError(f"model.checkpoint={checkpoint}: {problem}; expected a llava-hf "
                                     "checkpoint directory (an export: <run_dir>/export)")
    dtype = model.get("dtype")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ModelSettingsError(f"model.dtype={dtype!r}: expected null (the checkpoint's) or one of {FLOAT_DTYPES}")
    allow = model.get("allow_missing_weights", False)
    if not isinstance(allow, bool):
        raise ModelSettingsError(f"model.allow_missing_weights={allow!r}: expected true or false")
    if not torch.cuda.is_available():
        try:
            check_device(model.get("attn_implementation", "auto"), "cpu")
        except ValueError as e:
            raise ModelSettingsError(str(e)) from None


def llm_heads(model: DictConfig) -> int:
    """The attention heads of the LLM ``model`` configures, read before it loads: the checkpoint's ``config.json``
    (its ``text_config``, else its own), or the tiny model's ``num_heads``."""
    if model.get("checkpoint") is None:
        return int(dict(model.tiny).get("num_heads", inspect.signature(build_config).parameters["num_heads"].default))
    config = json.loads((Path(model.checkpoint) / "config.json").read_text())
    return int(config.get("text_config", config)["num_attention_heads"])


def check_sequence_parallel_settings(model: DictConfig, size: int) -> None:
    """``trainer.sp_size=size`` against the model's heads and attention backend, before anything loads (after
    :func:`check_model_settings`, which made sure the checkpoint's config is there)."""
    try:
        check_sequence_parallel(resolve_attention(model.get("attn_implementation", "auto")), llm_heads(model), size)
    except ValueError as e:
        raise ModelSettingsError(str(e)) from None


def build_model(
    checkpoint: str | None = None,
    tiny: dict[str, Any] | None = None,
    rope: RopeRule | None = None,
    mask: MaskRule | None = None,
    projector: Callable[..., VideoPooling] | None = None,
    pllava_pooling_shape: list[int] | None = None,
    attn_implementation: str = "auto",
    dtype: str | None = None,
    cache_dir: str | None = None,
    template: str | None = None,
    allow_missing_weights: bool = False,
    frame_budget: dict[str, Any] | None = None,
    tiling: dict[str, Any] | None = None,
) -> TCLlava:
    """Load ``checkpoint`` (a llava-hf directory), or build/cache the tiny random model from ``tiny``.

    ``dtype`` None is the checkpoint's (:func:`tc_llava.model.settings.checkpoint_dtype`);
    ``allow_missing_weights`` loads a checkpoint that lacks weights or holds unexpected ones.

    ``rope``, ``mask``, ``projector`` (a ``projector`` group's factory, completed with the
    model's ``pllava_pooling_shape``) or ``template`` (the chat template) left as None come
    from the checkpoint's saved TC-LLaVA settings (vanilla / causal / mlp / none for a plain
    llava-hf checkpoint). ``frame_budget`` is a Qwen-VL family's (None: the checkpoint's). ``tiling`` holds
    the fields of :class:`~tc_llava.model.tiling.Tiling` (long sequences; None: its defaults).
    """
    if (checkpoint is None and tiny is None) or (checkpoint is not None and not str(checkpoint).strip()):
        raise ModelSettingsError(f"model.checkpoint={checkpoint!r} names no model: give the llava-hf directory to load")
    pooling = None if projector is None else projector(model_pooling_shape=pllava_pooling_shape)
    tiles = Tiling(**dict(tiling or {}))  # before the model loads: a bad tile size is one line, at once
    path = checkpoint if checkpoint is not None else tiny_checkpoint(cache_dir, **dict(tiny))
    return TCLlava.from_pretrained(
        path, rope=rope, mask=mask, pooling=pooling, attn_implementation=attn_implementation, dtype=dtype,
        template=template, allow_missing_weights=allow_missing_weights,
        frame_budget=None if frame_budget is None else dict(frame_budget), tiling=tiles,
    )


def model_from_config(cfg: DictConfig) -> TCLlava:
    """The model of ``cfg.model`` with the ``rope``/``mask``/``projector`` groups (null: from the checkpoint).

    The rule groups are handed over as config nodes: Hydra instantiates them recursively
    (an already-built object passed to ``instantiate`` would be turned back into a config).
    """
    return instantiate(cfg.model, rope=cfg.get("rope"), mask=cfg.get("mask"), projector=cfg.get("projector"))
