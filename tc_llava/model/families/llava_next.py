"""LLaVA-NeXT (``llava_next``): LLaVA-1.5's path on every frame at the base resolution (no any-res tiles
for video frames); its config has the any-res grid."""

from __future__ import annotations

from typing import Any

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from tc_llava.model.families.llava import Llava


class LlavaNext(Llava):
    model_type = "llava_next"
    hf_class = LlavaNextForConditionalGeneration
    config_class = LlavaNextConfig

    def tiny_config_kwargs(self, tokens: dict[str, int], grid_pinpoints: list[list[int]]) -> dict[str, Any]:
        return {**super().tiny_config_kwargs(tokens, grid_pinpoints), "image_grid_pinpoints": grid_pinpoints}
