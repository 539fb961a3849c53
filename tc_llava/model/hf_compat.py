"""What differs across the supported transformers releases (5.17 to the newest 5.x), decided in one place.

transformers 5.24 renamed the KV cache ``past_key_values`` to ``cache`` in model calls, in
the mask builders and in every ``ModelOutput``. Newer releases still take the old name, with
a deprecation warning; older ones do not know the new name, and a model's ``**kwargs``
would swallow ``cache=`` without a word (decoding would then recompute nothing and attend
to nothing cached). So every call site passes the name this release uses.

5.23 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the
old name warns until v6).

5.25's ``Qwen3VLProcessor`` replaces a video's whole ``<|vision_start|><|video_pad|><|vision_end|>`` by its
per-temporal-patch spans; earlier releases keep that outer pair around them
(:func:`qwen3_vl_drops_video_wrapper`). Prompts follow the installed release, as its model was called.

``AutoImageProcessor`` picks the torchvision backend (HF's processors as llava-hf checkpoints
name them) when torchvision is installed, as the lock installs it. Where it is absent (a
machine that only benchmarks models), ``transformers.AutoImageProcessor`` is a placeholder in
5.17, so it is imported from its own module, which works in every release.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

from transformers.integrations import deepspeed as hf_deepspeed
from transformers.masking_utils import create_causal_mask
from transformers.models.auto.image_processing_auto import AutoImageProcessor

__all__ = ["AutoImageProcessor", "CACHE_ARG", "cache_kwargs", "declare_special_token", "enable_activation_checkpointing",
           "output_cache", "qwen3_vl_drops_video_wrapper", "whole_models"]

CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the KV-cache keyword of the installed transformers."""
    return {CACHE_ARG: cache}


def output_cache(output: Any) -> Any:
    """The KV cache a transformers model returned, read under the installed release's name."""
    return getattr(output, CACHE_ARG)


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation (gradient) checkpointing of a transformers model's layers."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def qwen3_vl_drops_video_wrapper() -> bool:
    """Whether the installed ``Qwen3VLProcessor`` replaces the chat template's ``<|vision_start|><|video_pad|>
    <|vision_end|>`` as a whole (5.25 on), rather than only the ``<|video_pad|>`` inside it."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    return "get_text_with_replacements" in vars(Qwen3VLProcessor)


def declare_special_token(tokenizer: Any, name: str, token: str) -> None:
    """Declare ``token`` (already in the vocabulary) as the tokenizer's ``name`` (e.g. ``video_token``), as
    a checkpoint's ``extra_special_tokens`` would: readable as ``tokenizer.video_token`` and saved with it.

    transformers has no public call for a model-specific special token; this one exists from 5.17 on.
    """
    tokenizer._set_model_specific_special_tokens({name: token})


@contextlib.contextmanager
def whole_models() -> Iterator[None]:
    """Build models whole inside a ZeRO-3 run: there transformers builds every model partitioned across ranks
    (a collective call), which a model one process builds alone (an export copy, a tiny checkpoint) must not be."""
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
