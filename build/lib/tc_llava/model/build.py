"""Build a TC-LLaVA model from Hydra config nodes: a checkpoint path, or the tiny default."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from tc_llava.model.masks import MaskRule
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.rope import RopeRule
from tc_llava.model.tc_llava import TCLlava
from tc_llava.model.tiny import tiny_checkpoint


def build_model(
    checkpoint: str | None = None,
    tiny: dict[str, Any] | None = None,
    rope: RopeRule | None = None,
    mask: MaskRule | None = None,
    projector: Callable[..., VideoPooling] | None = None,
    pllava_pooling_shape: list[int] | None = None,
    attn_implementation: str = "auto",
    dtype: str = "float32",
    cache_dir: str | None = None,
    template: str | None = None,
) -> TCLlava:
    """Load ``checkpoint`` (a llava-hf directory), or build/cache the tiny random model from ``tiny``.

    ``rope``, ``mask``, ``projector`` (a ``projector`` group's factory, completed with the
    model's ``pllava_pooling_shape``) or ``template`` (the chat template) left as None come
    from the checkpoint's saved TC-LLaVA settings (vanilla / causal / mlp / none for a plain
    llava-hf checkpoint).
    """
    pooling = None if projector is None else projector(model_pooling_shape=pllava_pooling_shape)
    path = checkpoint if checkpoint else tiny_checkpoint(cache_dir, **dict(tiny or {}))
    return TCLlava.from_pretrained(
        path, rope=rope, mask=mask, pooling=pooling,
        attn_implementation=attn_implementation, dtype=getattr(torch, dtype), template=template,
    )


def model_from_config(cfg: DictConfig) -> TCLlava:
    """The model of ``cfg.model`` with the ``rope``/``mask``/``projector`` groups (null: from the checkpoint).

    The rule groups are handed over as config nodes: Hydra instantiates them recursively
    (an already-built object passed to ``instantiate`` would be turned back into a config).
    """
    return instantiate(cfg.model, rope=cfg.get("rope"), mask=cfg.get("mask"), projector=cfg.get("projector"))
