"""The llava-hf architectures TC-LLaVA runs on, and each one's own video path.

Every family is HF's own class, used as it is; what differs is how a frame becomes visual
tokens and which placeholder the prompt holds:

| model_type | placeholder | per frame | after the video |
|---|---|---|---|
| ``llava``, ``llava_next`` | ``<image>`` | tower layer -> MLP projector (the base resolution, no any-res tiles) | nothing |
| ``llava_next_video`` | ``<video>`` | tower layer -> spatial pooler (stride 2: 24x24 -> 12x12) -> projector | nothing |
| ``llava_onevision`` | ``<video>`` | SigLIP last layer -> projector -> 2x2 bilinear pooling (27x27 -> 14x14) | one ``image_newline`` |

These are the steps of HF's ``get_video_features`` run on the model's own modules
(``vision_resampler``, ``multi_modal_projector``, ``apply_pooling``, ``image_newline``), so
``rope=vanilla mask=causal`` gives HF's logits. OneVision's newline is one embedding after
the whole video, filling the last ``<video>`` placeholder: the layout counts it as **text**
(frame id -1): it follows every frame, so it takes one temporal step, attends causally
(it sees the whole video anyway) and is never seen by a frame, under every rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """What one ``model_type`` puts in the prompt for a video and how its frames are preprocessed."""

    model_type: str
    placeholder: str  # the config attribute of the prompt's placeholder token id
    video_processor_type: str | None  # HF video processor whose config preprocesses frames (None: the image processor)
    newline: bool = False  # one image_newline embedding after the video

    @property
    def placeholder_kind(self) -> str:
        return self.placeholder.removesuffix("_token_id")


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llava", "image_token_id", None),
    Family("llava_next", "image_token_id", None),
    Family("llava_next_video", "video_token_id", "LlavaNextVideoVideoProcessor"),
    Family("llava_onevision", "video_token_id", "LlavaOnevisionVideoProcessor", newline=True),
)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(model_type: str | None, where: str = "model_type") -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"{where} {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    return FAMILIES[model_type]


def has_class_token(vision_tower: nn.Module) -> bool:
    """CLIP towers prepend a CLS token to the patches; SigLIP towers do not."""
    embeddings = getattr(getattr(vision_tower, "vision_model", vision_tower), "embeddings", None)
    return hasattr(embeddings, "class_embedding")


def frame_grid(config: Any) -> tuple[int, int]:
    """(H, W) of one frame's visual tokens after the family's own spatial stage."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if config.model_type == "llava_next_video":  # kernel = stride pooling, as LlavaNextVideoPooler builds it
        side = side // config.spatial_pool_stride
    elif config.model_type == "llava_onevision":  # apply_pooling: bilinear to ceil(side / 2)
        side = math.ceil(side / 2)
    return side, side


def frame_features(hf_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` frames -> ``[N, tokens per frame, D]``: HF's video path, frame by frame."""
    model, config = hf_model.model, hf_model.config
    tower = model.vision_tower
    hidden = tower(pixel_values.to(tower.dtype), output_hidden_states=True).hidden_states
    layer = config.vision_feature_layer
    feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], -1)
    if config.vision_feature_select_strategy == "default":  # HF's rule: drop the first token (CLIP's CLS)
        feats = feats[:, 1:]
    if config.model_type == "llava_next_video":
        feats = model.vision_resampler(feats)
    feats = model.multi_modal_projector(feats)
    if config.model_type == "llava_onevision":
        feats = model.apply_pooling(feats)
    return feats
