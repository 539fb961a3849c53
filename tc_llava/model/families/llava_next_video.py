"""LLaVA-NeXT-Video (``llava_next_video``): ``<video>`` placeholder, the spatial pooler before the projector
(stride 2: 24x24 -> 12x12), its video processor (short side resized, centre crop, CLIP mean/std)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration, PreTrainedConfig

from tc_llava.model.families.llava_next import LlavaNext
from tc_llava.model.processors import VideoPreprocessor, require_torchvision


class LlavaNextVideo(LlavaNext):
    model_type = "llava_next_video"
    hf_class = LlavaNextVideoForConditionalGeneration
    config_class = LlavaNextVideoConfig
    placeholder = "video_token_id"
    video_processor_type = "LlavaNextVideoVideoProcessor"
    pools_patch_grid = True
    template = "next_video"

    def frame_grid(self, config: PreTrainedConfig) -> tuple[int, int]:
        h, w = super().frame_grid(config)  # kernel = stride pooling, as LlavaNextVideoPooler builds it
        return h // config.spatial_pool_stride, w // config.spatial_pool_stride

    def frame_features(self, hf_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        model = hf_model.model
        return model.multi_modal_projector(model.vision_resampler(self.tower_features(hf_model, pixel_values)))

    def processors(self, config: PreTrainedConfig) -> tuple[Any, VideoPreprocessor | None]:
        require_torchvision("LlavaNextImageProcessor")
        from transformers import LlavaNextImageProcessor

        size = config.vision_config.image_size
        edge, crop = {"shortest_edge": size}, {"height": size, "width": size}
        image = LlavaNextImageProcessor(size=edge, crop_size=crop,
                                        image_grid_pinpoints=getattr(config, "image_grid_pinpoints", None))
        return image, self.video_processor({"size": edge, "crop_size": crop})  # centre crop, CLIP mean/std: defaults

    def tiny_config_kwargs(self, tokens: dict[str, int], grid_pinpoints: list[list[int]]) -> dict[str, Any]:
        return dict(image_token_index=tokens["image"], video_token_index=tokens["video"], vision_feature_layer=-2,
                    vision_feature_select_strategy="default", image_grid_pinpoints=grid_pinpoints,
                    spatial_pool_stride=2, pad_token_id=tokens["pad"])
