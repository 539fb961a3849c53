"""TC-LLaVA: an image LLaVA turned video model by how its LLM attends (temporal-aware dual RoPE,
frame-wise block causal mask) and an optional PLLaVA pooling projector.

The public API, imported on first use (``import tc_llava`` alone loads neither torch nor
transformers)::

    from tc_llava import TCLlava, TADRoPE, FrameBlockCausalMask, VideoPooling
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TCLlava": "tc_llava.model.tc_llava",
    "VanillaRoPE": "tc_llava.model.rope",
    "TADRoPE": "tc_llava.model.rope",
    "MRoPE": "tc_llava.model.rope",
    "VideoRoPE": "tc_llava.model.rope",
    "ROPE_RULES": "tc_llava.model.rope",
    "CausalMask": "tc_llava.model.masks",
    "FrameBlockCausalMask": "tc_llava.model.masks",
    "BidirectionalVisualMask": "tc_llava.model.masks",
    "MASK_RULES": "tc_llava.model.masks",
    "VideoPooling": "tc_llava.model.pooling",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tc_llava' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
