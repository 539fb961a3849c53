"""Every family's frames become exactly the pixel values of its own HF processor, on frames decoded from a real file.

The reference is transformers' ``AutoVideoProcessor`` / ``AutoImageProcessor`` loading the saved
checkpoint and called as HF's ``...Processor`` calls it (a decoded ``[T, H, W, C]`` video, or the
frames as images for the image families); ours is what the data pipeline uses
(:func:`~tc_llava.data.inputs.preprocess_frames` with the model's ``frame_processor``), both the
processors the family builds (the tiny checkpoint in memory) and those an export reloads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoVideoProcessor

from tc_llava.data.inputs import preprocess_frames
from tc_llava.data.video import sample_frames
from tc_llava.model import processors
from tc_llava.model.families.base import clip_image_processor
from tc_llava.model.processors import VIDEO_PREPROCESSOR_FILE, VideoPreprocessor
from tc_llava.model.tc_llava import TCLlava
from tc_llava.model.tiny import build_processors

# fixture -> the class llava-hf checkpoints of that family name for its frames (torchvision backend)
FAMILY_PROCESSORS = {
    "tiny_llama": "CLIPImageProcessor",
    "tiny_next": "CLIPImageProcessor",
    "tiny_next_video": "LlavaNextVideoVideoProcessor",
    "tiny_onevision": "LlavaOnevisionVideoProcessor",
}


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> np.ndarray:
    """4 frames decoded from an H.264 file of textured, non-square (80x60) frames: resizing has work to do."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options={"qp": "10"})
        stream.width, stream.height, stream.pix_fmt = 80, 60, "yuv420p"
        for _ in range(16):
            image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    decoded, _ = sample_frames(path, 4, backend="pyav")
    return decoded


def hf_pixels(checkpoint: Path, frames: np.ndarray) -> tuple[str, torch.Tensor]:
    """The class HF's auto classes load from ``checkpoint`` and the pixel values it gives ``frames``."""
    if (checkpoint / VIDEO_PREPROCESSOR_FILE).is_file():
        processor = AutoVideoProcessor.from_pretrained(checkpoint)
        pixels = processor(videos=frames, return_tensors="pt")["pixel_values_videos"][0]
    else:
        processor = AutoImageProcessor.from_pretrained(checkpoint)
        pixels = processor(images=list(frames), return_tensors="pt")["pixel_values"]
    return type(processor).__name__, pixels


@pytest.mark.parametrize("fixture", FAMILY_PROCESSORS)
def test_frames_equal_the_family_hf_processor(fixture, frames, request, tmp_path):
    checkpoint = request.getfixturevalue(fixture)
    name, expected = hf_pixels(checkpoint, frames)
    assert name == FAMILY_PROCESSORS[fixture]
    assert expected.shape[0] == len(frames) and expected.dtype == torch.float32
    image, video = build_processors(AutoConfig.from_pretrained(checkpoint))
    built = video if video is not None else image  # what the family builds for a tiny checkpoint
    assert torch.equal(preprocess_frames(built, frames), expected)
    model = TCLlava.from_pretrained(checkpoint)
    assert torch.equal(preprocess_frames(model.frame_processor, frames), expected)
    model.save_pretrained(tmp_path / "export")  # an export preprocesses as the checkpoint did
    again = TCLlava.from_pretrained(tmp_path / "export")
    assert torch.equal(preprocess_frames(again.frame_processor, frames), expected)


# The video processor configs tc-llava wrote before its processors were HF's own (sorted keys, no torchvision).
PREVIOUS_CONFIGS = {
    "tiny_onevision": {
        "crop_size": None, "default_to_square": False, "do_center_crop": False, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "do_sample_frames": False,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": 70, "width": 70},
        "video_processor_type": "LlavaOnevisionVideoProcessor"},
    "tiny_next_video": {
        "crop_size": {"height": 56, "width": 56}, "default_to_square": False, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "do_sample_frames": False, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 56}, "video_processor_type": "LlavaNextVideoVideoProcessor"},
}


@pytest.mark.parametrize("fixture", PREVIOUS_CONFIGS)
def test_previous_exports_video_config_loads_as_hf_processor(fixture, frames, request, tmp_path):
    source = request.getfixturevalue(fixture)
    export = Path(shutil.copytree(source, tmp_path / "export"))
    (export / VIDEO_PREPROCESSOR_FILE).write_text(json.dumps(PREVIOUS_CONFIGS[fixture], indent=2, sort_keys=True))
    _, expected = hf_pixels(export, frames)
    model = TCLlava.from_pretrained(export)
    assert model.video_preprocessor.processor_type == FAMILY_PROCESSORS[fixture]
    assert torch.equal(preprocess_frames(model.frame_processor, frames), expected)
    assert torch.equal(expected, hf_pixels(source, frames)[1])  # the same settings as a checkpoint built today


def test_video_processor_is_resolved_by_registered_name_only(tiny_onevision, tmp_path):
    export = Path(shutil.copytree(tiny_onevision, tmp_path / "export"))
    file = export / VIDEO_PREPROCESSOR_FILE
    config = json.loads(file.read_text())
    (export / "evil.py").write_text("raise SystemExit('imported')\n")
    file.write_text(json.dumps({**config, "auto_map": {"AutoVideoProcessor": "evil.EvilVideoProcessor"}}))
    assert type(VideoPreprocessor.from_pretrained(export).processor).__module__.startswith("transformers.models.")
    for name in ("EvilVideoProcessor", "CLIPImageProcessor"):  # unknown; a transformers class, not a video processor
        file.write_text(json.dumps({**config, "video_processor_type": name,
                                    "auto_map": {"AutoVideoProcessor": "evil.EvilVideoProcessor"}}))
        with pytest.raises(ValueError, match=f"{file}: video_processor_type '{name}' is not a video "
                                             "processor transformers registers"):
            VideoPreprocessor.from_pretrained(export)


def test_processors_without_torchvision_are_one_clear_error(monkeypatch, tiny_onevision):
    monkeypatch.setattr(processors, "is_torchvision_available", lambda: False)
    with pytest.raises(ImportError, match=r"^CLIPImageProcessor needs torchvision \(the backend of HF's image"):
        clip_image_processor(56)
    with pytest.raises(ImportError, match="video processor 'LlavaOnevisionVideoProcessor' needs torchvision"):
        VideoPreprocessor.from_pretrained(tiny_onevision)
