r"""The model families TC-LLaVA runs on, one module each, registered by HF's ``model_type``.

Every family is HF's own class, used as it is; its module states how it differs from the
base (:mod:`tc_llava.model.families.base`, LLaVA-1.5's path):

| model_type | placeholder | per frame | after the video |
|---|---|---|---|
| ``llava``, ``llava_next`` | ``<image>`` | tower layer -> MLP projector (the base resolution, no any-res tiles) | nothing |
| ``llava_next_video`` | ``<video>`` | tower layer -> spatial pooler (stride 2: 24x24 -> 12x12) -> projector | nothing |
| ``llava_onevision`` | ``<video>`` | SigLIP last layer -> projector -> 2x2 bilinear pooling (27x27 -> 14x14) | one ``image_newline`` |
| ``qwen2_5_vl`` | ``<\|video_pad\|>`` per token | dynamic-resolution ViT, two frames per temporal patch, 2x2 merger | ``<\|vision_end\|>`` (text) |
| ``qwen3_vl`` | ``<t seconds>`` + ``<\|video_pad\|>`` run per temporal patch | as Qwen2.5-VL, plus deepstack | as Qwen2.5-VL |

The Qwen-VL families keep their own M-RoPE positions (:mod:`tc_llava.model.families.qwen_vl`).

Callers ask the family (:func:`family_of`) and never branch on ``model_type`` themselves.
A new family is one module with a :class:`Family` subclass and one line below registering it.
"""

from __future__ import annotations

from tc_llava.model.families.base import Family, has_class_token
from tc_llava.model.families.llava import Llava
from tc_llava.model.families.llava_next import LlavaNext
from tc_llava.model.families.llava_next_video import LlavaNextVideo
from tc_llava.model.families.llava_onevision import LlavaOnevision
from tc_llava.model.families.qwen2_5_vl import Qwen2_5_VL
from tc_llava.model.families.qwen3_vl import Qwen3VL

__all__ = ["FAMILIES", "Family", "family_of", "has_class_token", "register"]

FAMILIES: dict[str, Family] = {}


def register(family: type[Family]) -> type[Family]:
    """Make ``family`` the one that ``family_of(family.model_type)`` returns."""
    if family.model_type in FAMILIES:
        raise ValueError(f"model_type {family.model_type!r} is already registered by {FAMILIES[family.model_type]!r}")
    FAMILIES[family.model_type] = family()
    return family


for _family in (Llava, LlavaNext, LlavaNextVideo, LlavaOnevision, Qwen2_5_VL, Qwen3VL):
    register(_family)


def family_of(model_type: str | None, where: str = "model_type") -> Family:
    """The registered family of ``model_type``; ``where`` names the field in the error."""
    if model_type not in FAMILIES:
        raise ValueError(f"{where} {model_type!r} is not one of {tuple(FAMILIES)}")
    return FAMILIES[model_type]
