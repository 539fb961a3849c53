"""Qwen3-VL (``qwen3_vl``): Qwen2.5-VL's dynamic-resolution path with interleaved M-RoPE, timestamps written as
text before every temporal patch (so each temporal patch is its own vision span, and the temporal axis counts
patches, not seconds), and deepstack: features of some tower layers added to the first LLM layers' hidden
states at the visual positions."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from tc_llava.model.families.qwen_vl import QwenVisual, QwenVL
from tc_llava.model.families.qwen_vl_inputs import CHAT_TEMPLATES


class Qwen3VL(QwenVL):
    model_type = "qwen3_vl"
    template = "qwen3_vl"
    chat_template = CHAT_TEMPLATES["qwen3_vl"]
    hf_class = Qwen3VLForConditionalGeneration
    config_class = Qwen3VLConfig

    def embed_visual(self, hf_model: nn.Module, input_ids: torch.Tensor, embeds: torch.Tensor,
                     visual: QwenVisual, chunk_frames: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """As HF's ``Qwen3VLModel.forward``: images' and videos' deepstack features joined in the order of the
        visual positions, handed to the LLM with those positions (the tower in chunks: :meth:`features`)."""
        config = hf_model.config
        visual_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        parts = []
        for pixels, grid, token_id, video in ((visual.pixel_values, visual.image_grid_thw, config.image_token_id, False),
                                              (visual.pixel_values_videos, visual.video_grid_thw,
                                               config.video_token_id, True)):
            if pixels is None:
                continue
            pooled, deep = self.features(hf_model, pixels, grid, video, chunk_frames)
            mask = input_ids == token_id
            embeds = embeds.masked_scatter(mask[..., None], torch.cat(pooled).to(embeds.dtype))
            visual_mask |= mask
            parts.append((mask, deep))
        if not parts:
            return embeds, {}
        stacked = []
        for layer in range(len(parts[0][1])):
            joint = embeds.new_zeros(int(visual_mask.sum()), embeds.shape[-1])
            for mask, features in parts:
                joint[mask[visual_mask]] = features[layer].to(joint.dtype)
            stacked.append(joint)
        return embeds, {"visual_pos_masks": visual_mask, "deepstack_visual_embeds": stacked}

    def tiny_vision_config(self, vision: dict[str, Any], layers: int) -> dict[str, Any]:
        return dict(depth=layers, hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                    num_heads=vision["num_attention_heads"], patch_size=vision["patch_size"], spatial_merge_size=2,
                    temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])

    def tiny_text_config(self, text: PreTrainedConfig) -> dict[str, Any]:
        fields = super().tiny_text_config(text)
        fields["rope_parameters"] = {**fields["rope_parameters"], "mrope_interleaved": True}
        return {**fields, "head_dim": text.hidden_size // text.num_attention_heads}
