"""Qwen2.5-VL (``qwen2_5_vl``): a windowed-attention ViT at dynamic resolution, two frames per temporal patch, the
2x2 patch merger, and M-RoPE whose temporal axis is absolute time (``second_per_grid_ts * tokens_per_second``
per temporal patch, from ``get_rope_index``)."""

from __future__ import annotations

from typing import Any

from transformers import (
    Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
)

from tc_llava.model.families.qwen_vl import QwenVL
from tc_llava.model.families.qwen_vl_inputs import CHAT_TEMPLATES


class Qwen2_5_VL(QwenVL):
    model_type = "qwen2_5_vl"
    template = "qwen2_vl"
    chat_template = CHAT_TEMPLATES["qwen2_5_vl"]
    hf_class = Qwen2_5_VLForConditionalGeneration
    config_class = Qwen2_5_VLConfig

    def tiny_vision_config(self, vision: dict[str, Any], layers: int) -> dict[str, Any]:
        # one windowed block and one full-attention block, as the real tower alternates them
        return dict(depth=layers, hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                    num_heads=vision["num_attention_heads"], patch_size=vision["patch_size"], spatial_merge_size=2,
                    temporal_patch_size=2, window_size=4 * vision["patch_size"],
                    fullatt_block_indexes=[layers - 1], tokens_per_second=2)
