"""A family's processors are HF's own, on their torchvision backend; this module loads and calls the video one.

The llava-hf video families preprocess frames with the video processor their checkpoints
ship (``video_preprocessor_config.json``: ``LlavaOnevisionVideoProcessor``,
``LlavaNextVideoVideoProcessor``). It is built from the class the file names among those
transformers registers (never ``auto_map``, never remote code) and called as HF's own
``...Processor`` calls it, one video at a time, with ``do_sample_frames=False``: frame
*sampling* stays ours (:mod:`tc_llava.data.video`). :class:`VideoPreprocessor` only lets the
data pipeline call it as it calls an image processor (``images=frames`` -> ``pixel_values``).

HF's processors run on torchvision; nothing else in the package does, so it is required
where a processor is built (:func:`require_torchvision`), not when the package is imported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import BatchFeature
from transformers.models.auto.video_processing_auto import video_processor_class_from_name
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import BaseVideoProcessor

VIDEO_PREPROCESSOR_FILE = "video_preprocessor_config.json"


def require_torchvision(what: str) -> None:
    """Refuse to build ``what`` (an HF processor) without torchvision, its backend."""
    if not is_torchvision_available():
        raise ImportError(f"{what} needs torchvision (the backend of HF's image and video processors): "
                          "install the lock's torch/torchvision pair (bash scripts/setup.sh)")


def video_processor_class(name: str | None, where: str) -> type:
    """The video processor class transformers registers under ``name``; ``where`` names the source in the error."""
    require_torchvision(f"{where}: video processor {name!r}")
    cls = video_processor_class_from_name(name) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, BaseVideoProcessor)):  # the lookup ends in any transformers name
        raise ValueError(f"{where}: video_processor_type {name!r} is not a video processor transformers registers")
    return cls


class VideoPreprocessor:
    """Frames -> ``pixel_values [T, C, H, W]``: the family's HF video processor on one video.

    Called like an HF image processor (``processor(images=frames, return_tensors="pt")
    ["pixel_values"]``), so the data pipeline and the evaluator take it where they take one.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    @property
    def processor_type(self) -> str:
        return type(self.processor).__name__

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VideoPreprocessor":
        """Load ``path``'s video processor by the class its config names (``video_processor_type``, or a
        legacy config's ``image_processor_type`` with ``ImageProcessor`` -> ``VideoProcessor``, as HF reads it)."""
        file = Path(path) / VIDEO_PREPROCESSOR_FILE
        try:
            config = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: cannot read the video processor config ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{file}: must hold a JSON object (a video processor config), got {type(config).__name__}")
        name = config.get("video_processor_type")
        if name is None and isinstance(config.get("image_processor_type"), str):
            name = config["image_processor_type"].replace("ImageProcessor", "VideoProcessor")
        return cls(video_processor_class(name, str(file)).from_pretrained(path))

    def save_pretrained(self, path: str | Path) -> None:
        self.processor.save_pretrained(path)

    def __call__(self, images: Sequence[Any], return_tensors: str = "pt") -> BatchFeature:
        """``images``: one video's frames (``[H, W, C]`` arrays or PIL images), stacked into the ``[T, H, W, C]``
        video HF's decoders give its processor."""
        video = np.stack([np.asarray(frame) for frame in images])
        out = self.processor(videos=[video], do_sample_frames=False, return_tensors=return_tensors)
        return BatchFeature({"pixel_values": out["pixel_values_videos"][0]})

    def output_size(self) -> tuple[int, int]:
        """(H, W) of the frames it produces (from one blank frame: the processor's settings fix the size)."""
        return tuple(self(images=[np.zeros((8, 8, 3), np.uint8)])["pixel_values"].shape[-2:])
