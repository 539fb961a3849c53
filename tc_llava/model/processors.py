"""A family's video preprocessing, kept as HF's ``video_preprocessor_config.json`` and applied without torchvision.

transformers' video processors (``AutoVideoProcessor``, e.g. ``LlavaOnevisionVideoProcessor``)
need torchvision, which our installs lack (PyPI's build does not load beside the CPU torch).
Their preprocessing is resize, optional centre crop, rescale and normalise; the same steps
with the same settings run here through transformers' PIL image backend, one frame at a
time. The file is read and written as it is, so an export carries the checkpoint's video
processor config unchanged (``AutoVideoProcessor`` loads it where torchvision exists) and a
reloaded export preprocesses frames identically. Frame *sampling* stays ours
(:mod:`tc_llava.data.video`): the processor's own ``do_sample_frames`` is never used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

try:  # transformers >= 5 names the PIL-backed processor explicitly; torchvision is optional.
    from transformers import CLIPImageProcessorPil as _PilProcessor
except ImportError:  # pragma: no cover - older 5.x
    from transformers import CLIPImageProcessor as _PilProcessor

VIDEO_PREPROCESSOR_FILE = "video_preprocessor_config.json"
# The per-frame steps of transformers' BaseVideoProcessor._preprocess and their settings.
FRAME_STEPS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
               "do_normalize", "image_mean", "image_std", "do_convert_rgb", "default_to_square")


class VideoPreprocessor:
    """Frames -> ``pixel_values [T, C, H, W]`` as the family's video processor computes them.

    Called like an HF image processor (``processor(images=frames, return_tensors="pt")
    ["pixel_values"]``), so the data pipeline and the evaluator take it where they take one.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        steps = {key: self.config[key] for key in FRAME_STEPS if self.config.get(key) is not None}
        self._frames = _PilProcessor(**{"do_center_crop": False, **steps})

    @property
    def processor_type(self) -> str | None:
        return self.config.get("video_processor_type")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VideoPreprocessor":
        file = Path(path) / VIDEO_PREPROCESSOR_FILE
        try:
            config = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: cannot read the video processor config ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{file}: must hold a JSON object (a video processor config), got {type(config).__name__}")
        return cls(config)

    def save_pretrained(self, path: str | Path) -> None:
        Path(path, VIDEO_PREPROCESSOR_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    def __call__(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> Any:
        return self._frames(images=images, return_tensors=return_tensors, **kwargs)

    def output_size(self) -> tuple[int, int]:
        """(H, W) of the frames it produces (from one blank frame: the steps above fix the size)."""
        return tuple(self(images=[np.zeros((8, 8, 3), np.uint8)], return_tensors="pt")["pixel_values"].shape[-2:])
