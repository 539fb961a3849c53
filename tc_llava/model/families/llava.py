"""LLaVA-1.5 (``llava``): the base's path as it is."""

from __future__ import annotations

from transformers import LlavaConfig, LlavaForConditionalGeneration

from tc_llava.model.families.base import Family


class Llava(Family):
    model_type = "llava"
    hf_class = LlavaForConditionalGeneration
    config_class = LlavaConfig
