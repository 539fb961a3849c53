"""The contract a model family implements; the base is LLaVA-1.5's video path.

A family is HF's own ``...ForConditionalGeneration`` class used as it is. What it adds is what
TC-LLaVA needs to know about it, and nothing else in the package branches on ``model_type``:

- **the prompt**: the config attribute of its placeholder token id (``<image>`` or ``<video>``) and
  how many placeholders a video takes (:meth:`Family.tokens_per_video`);
- **the video path**: each frame's token grid (:meth:`Family.frame_grid`) and how frames become
  visual tokens (:meth:`Family.frame_features`, the steps of HF's ``get_video_features`` on the
  model's own modules), plus what follows the video (:meth:`Family.after_video`);
- **its files**: the image and video processor configs its checkpoints ship
  (:meth:`Family.processors`), the tiny random config the tests and the demo build
  (:meth:`Family.tiny_config`) and the chat template its checkpoints are prompted with.

A family module subclasses :class:`Family` (or a sibling) and overrides only where it differs,
as transformers' ``modular_*.py`` files do.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import CLIPVisionConfig, PreTrainedConfig, PreTrainedModel

from tc_llava.model.processors import VideoPreprocessor, require_torchvision, video_processor_class


def clip_image_processor(size: int) -> Any:
    """HF's ``CLIPImageProcessor`` (resize the short side, centre crop, CLIP mean/std) at a tower's resolution."""
    require_torchvision("CLIPImageProcessor")
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def has_class_token(vision_tower: nn.Module) -> bool:
    """CLIP towers prepend a CLS token to the patches; SigLIP towers do not."""
    embeddings = getattr(getattr(vision_tower, "vision_model", vision_tower), "embeddings", None)
    return hasattr(embeddings, "class_embedding")


class Family:
    """What every llava-hf family starts from: LLaVA-1.5's path (a CLIP tower's selected layer -> MLP
    projector, ``<image>`` placeholder, nothing after the video, CLIP preprocessing).

    A family module subclasses it, sets ``model_type``, ``hf_class`` and ``config_class``, and overrides
    only where it differs; :func:`tc_llava.model.families.register` makes it known by its ``model_type``.
    """

    model_type: ClassVar[str]  # HF's config.model_type, the registry's key
    hf_class: ClassVar[type[PreTrainedModel]]  # HF's own model class, used as it is
    config_class: ClassVar[type[PreTrainedConfig]]
    placeholder: ClassVar[str] = "image_token_id"  # the config attribute of the prompt's placeholder token id
    video_processor_type: ClassVar[str | None] = None  # HF video processor of its frames (None: the image processor)
    pools_patch_grid: ClassVar[bool] = False  # its video path pools the patch grid (a CLS token cannot ride along)
    template: ClassVar[str] = "vicuna_v1"  # the chat template (data.templates) its checkpoints are prompted with
    tokens_after_video: ClassVar[int] = 0  # rows of after_video()
    multimodal_rope: ClassVar[bool] = False  # the LLM rotates by its own [3, B, L] position_ids (Qwen-VL's M-RoPE)
    tiny_tokens: ClassVar[dict[str, str]] = {}  # the tiny tokenizer's own special tokens by role (image, video, ...)
    chat_template: ClassVar[str | None] = None  # the Jinja chat template its checkpoints' tokenizers carry

    @property
    def placeholder_kind(self) -> str:
        """``image`` or ``video``: what the prompt's placeholder is called."""
        return self.placeholder.removesuffix("_token_id")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_type!r})"

    # ----------------------------------------------------------------- video path
    def frame_grid(self, config: PreTrainedConfig) -> tuple[int, int]:
        """(H, W) of one frame's visual tokens after the family's own spatial stage: the tower's patch grid."""
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def tower_features(self, hf_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` frames -> the tower's selected layer(s), CLS dropped where the config says so."""
        config, tower = hf_model.config, hf_model.model.vision_tower
        hidden = tower(pixel_values.to(tower.dtype), output_hidden_states=True).hidden_states
        layer = config.vision_feature_layer
        feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], -1)
        if config.vision_feature_select_strategy == "default":  # HF's rule: drop the first token (CLIP's CLS)
            feats = feats[:, 1:]
        return feats

    def frame_features(self, hf_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` frames -> ``[N, tokens per frame, D]``: HF's video path, frame by frame."""
        return hf_model.model.multi_modal_projector(self.tower_features(hf_model, pixel_values))

    def keeps_cls(self, hf_model: nn.Module) -> bool:
        """Whether each frame's tokens keep the tower's CLS token (``full`` strategy on a CLIP tower); refused
        where the family pools the patch grid."""
        full = hf_model.config.vision_feature_select_strategy == "full"
        keeps = full and has_class_token(hf_model.model.vision_tower)
        if keeps and self.pools_patch_grid:
            raise ValueError(f"vision_feature_select_strategy='full' keeps the CLS token, which "
                             f"{self.model_type}'s spatial pooling of the patch grid cannot take")
        return keeps

    def after_video(self, hf_model: nn.Module) -> torch.Tensor | None:
        """``[K, D]`` embeddings that follow every video's frames in its placeholder run (None: nothing).

        They are text in the layout (frame id -1): they follow every frame, so they take one
        temporal step, attend causally and are never seen by a frame, under every rule."""
        return None

    def tokens_per_video(self, frames: int, grid: tuple[int, int], cls_token: bool) -> int:
        """Placeholders a video takes: ``frames`` (after any temporal pooling) of ``grid`` tokens (+ CLS), then
        what follows the video."""
        return frames * (grid[0] * grid[1] + int(cls_token)) + self.tokens_after_video

    # ----------------------------------------------------------------- files
    def processors(self, config: PreTrainedConfig) -> tuple[Any, VideoPreprocessor | None]:
        """HF's image processor and (video families) video processor that a checkpoint of ``config`` ships, as
        llava-hf checkpoints name them (torchvision backend): here CLIP preprocessing at the tower's resolution."""
        return clip_image_processor(config.vision_config.image_size), None

    def video_processor(self, frames: dict[str, Any]) -> VideoPreprocessor:
        """This family's HF video processor: its class's defaults (bicubic, 1/255, no frame sampling) with
        ``frames`` (size, crop, mean/std)."""
        cls = video_processor_class(self.video_processor_type, f"{self.model_type} family")
        return VideoPreprocessor(cls(**frames))

    def tiny_vision_config(self, vision: dict[str, Any], layers: int) -> PreTrainedConfig:
        """The tiny tower: CLIP read at layer -2, so ``layers`` useful ones plus the unread last."""
        return CLIPVisionConfig(**vision, num_hidden_layers=layers + 1, projection_dim=vision["hidden_size"])

    def tiny_config(self, vision: PreTrainedConfig, text: PreTrainedConfig, tokens: dict[str, int],
                    grid_pinpoints: list[list[int]]) -> PreTrainedConfig:
        """The HF config of a tiny model of this family (``tokens``: the tokenizer's ``image``, ``video`` and
        ``pad`` ids; ``grid_pinpoints``: the any-res grid, for the families that have one)."""
        return self.config_class(vision_config=vision, text_config=text,
                                 **self.tiny_config_kwargs(tokens, grid_pinpoints))

    def tiny_config_kwargs(self, tokens: dict[str, int], grid_pinpoints: list[list[int]]) -> dict[str, Any]:
        """The family's own fields of :meth:`tiny_config`: as the llava-hf checkpoints set them."""
        return dict(image_token_id=tokens["image"], vision_feature_layer=-2, vision_feature_select_strategy="default",
                    pad_token_id=tokens["pad"])
