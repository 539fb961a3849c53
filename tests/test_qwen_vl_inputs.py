"""Qwen2.5-VL / Qwen3-VL inputs against HF's own processors, on real video files the test writes.

HF's side is ``Qwen2_5_VLProcessor``/``Qwen3VLProcessor`` built from HF's own processor classes with HF's
own argument names, given the *whole* decoded video and its metadata (``do_sample_frames=True``); ours
decodes only the frames :func:`select_frames` picks. Everything must be equal bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tc_llava.data.video import read_frames
from tc_llava.model.families.qwen_vl_inputs import (
    FrameBudget, QwenTokens, expand_placeholders, image_inputs, load_preprocessing, mm_token_type_ids, preprocessing,
    qwen3_timestamps, save_tiny_processors,
    resolve_budget, save_preprocessing, select_frames, video_inputs, vision_kwargs,
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
VIDEO_FPS = 8
# (name, frames, height, width): two resolutions; 20 frames at 8 fps sampled at 2 fps keep 5 (odd) in qwen3_vl
VIDEOS = {"wide": (21, 48, 64), "tall": (20, 72, 40)}
# Small budgets in HF's own argument names for HF's side; ours are the same numbers as a FrameBudget.
HF_VIDEO_KWARGS = {
    "qwen2_5_vl": dict(fps=2.0, min_frames=2, max_frames=6, min_pixels=28 * 28, max_pixels=28 * 28 * 6),
    "qwen3_vl": dict(fps=2.0, min_frames=3, max_frames=7, size={"shortest_edge": 1024, "longest_edge": 32 * 32 * 24}),
}
BUDGETS = {
    "qwen2_5_vl": FrameBudget(fps=2.0, min_frames=2, max_frames=6, min_pixels=28 * 28, max_pixels=28 * 28 * 6),
    "qwen3_vl": FrameBudget(fps=2.0, min_frames=3, max_frames=7, min_pixels=1024, max_pixels=32 * 32 * 24),
}
PROMPT = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What moves? "
          "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
          "<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------- the budget (no torchvision needed)
@pytest.mark.parametrize("fields, named", [
    (dict(fps=0), "fps"), (dict(fps=True), "fps"), (dict(max_frames=0), "max_frames"),
    (dict(min_pixels=2.5), "min_pixels"), (dict(cap_pixels_per_frame=1), "cap_pixels_per_frame"),
    (dict(fps=2, num_frames=8), "num_frames"), (dict(num_frames=8, max_frames=16), "max_frames"),
    (dict(min_frames=9, max_frames=8), "min_frames=9 > max_frames=8"),
    (dict(min_pixels=4096, max_pixels=1024), "min_pixels=4096 > max_pixels=1024"),
    (dict(cap_pixels_per_frame=False, max_video_tokens=64), "max_video_tokens"),
])
def test_budget_refuses_contradictions(fields, named):
    with pytest.raises(ValueError, match=named) as error:
        FrameBudget(**fields)
    assert str(error.value).startswith("frame budget: ") and "\n" not in str(error.value)


def test_budget_json_round_trip_and_unknown_field():
    budget = FrameBudget(fps=1.5, min_frames=4, max_frames=32, max_pixels=200704)
    record = json.loads(json.dumps(budget.to_json()))
    assert record == {"fps": 1.5, "num_frames": None, "min_frames": 4, "max_frames": 32, "min_pixels": None,
                      "max_pixels": 200704, "cap_pixels_per_frame": None, "max_video_tokens": None}
    assert FrameBudget.from_json(record) == budget
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['nframes'\]"):
        FrameBudget.from_json({"nframes": 8})


# --------------------------------------------------------------------------- against HF's processors
def _hf():
    pytest.importorskip("torchvision", reason="HF's Qwen-VL video processors need torchvision")
    import transformers

    return transformers


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE holding the Qwen special tokens (as tc_llava.model.tiny trains its tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user assistant What moves? 0.5 1.0 1.5 2.0 seconds <> 0123456789"] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _frame(i: int, height: int, width: int) -> np.ndarray:
    """A smooth frame that changes with i, so resizing and frame choice both show in the pixels."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 4 + i * 9) % 256, (y * 3 + i * 5) % 256, ((x + y) * 2 + 40) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen_media")
    paths = {}
    for name, (frames, height, width) in VIDEOS.items():
        paths[name] = root / f"{name}.mp4"
        with av.open(str(paths[name]), "w") as container:
            stream = container.add_stream("libx264", rate=VIDEO_FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"qp": "0", "g": "5", "bf": "2"}
            for i in range(frames):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(_frame(i, height, width), format="rgb24")))
            container.mux(stream.encode())
    paths["image"] = root / "still.png"
    Image.fromarray(_frame(3, 50, 90)).save(paths["image"])
    return paths


def _default_processors(transformers, model_type: str):
    """The families' processors as HF defines them, before any budget: ours start from these."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    if model_type == "qwen2_5_vl":
        return transformers.Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 8), \
            transformers.Qwen2VLVideoProcessor()
    image = transformers.Qwen2VLImageProcessor(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                               size={"shortest_edge": 1024, "longest_edge": 32 * 32 * 8})
    return image, Qwen3VLVideoProcessor()


def _hf_processor(transformers, model_type: str, tokenizer, image_processor):
    """HF's processor with the budget in HF's own argument names (the reference side)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    video_class = transformers.Qwen2VLVideoProcessor if model_type == "qwen2_5_vl" else Qwen3VLVideoProcessor
    video = video_class(**HF_VIDEO_KWARGS[model_type], do_sample_frames=True, cap_pixels_per_frame=False)
    processor_class = {"qwen2_5_vl": transformers.Qwen2_5_VLProcessor, "qwen3_vl": transformers.Qwen3VLProcessor}
    return processor_class[model_type](image_processor=image_processor, tokenizer=tokenizer, video_processor=video)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_inputs_equal_hf_processor(model_type, tokenizer, media):
    """Two videos of different resolutions and an image in one prompt: pixels, grids, time and input_ids."""
    transformers = _hf()
    image_processor, video_processor = _default_processors(transformers, model_type)
    prep = preprocessing(model_type, image_processor, video_processor, BUDGETS[model_type])
    hf = _hf_processor(transformers, model_type, tokenizer, image_processor)

    videos, whole, metadata = [], [], []
    for name in VIDEOS:
        frames, indices, fps, total = read_frames(media[name], lambda n, f: select_frames(prep, n, f), backend="pyav")
        videos.append(video_inputs(prep, frames, indices, fps, total))
        everything, _, _, _ = read_frames(media[name], lambda n, f: range(n), backend="pyav")
        whole.append(everything)
        metadata.append({"total_num_frames": total, "fps": fps})
    still = np.array(Image.open(media["image"]).convert("RGB"))
    image = image_inputs(prep, still)

    expected = hf(text=[PROMPT], images=[still], videos=whole, video_metadata=metadata, do_sample_frames=True,
                  return_tensors="pt")
    ours = vision_kwargs(videos, [image])
    assert sorted(ours) == sorted(k for k in expected if k not in ("input_ids", "attention_mask", "mm_token_type_ids"))
    for key, value in ours.items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    text = expand_placeholders(PROMPT, videos, [image], QwenTokens.from_tokenizer(tokenizer))
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(input_ids, expected["input_ids"])
    types = mm_token_type_ids(input_ids, hf.image_token_id, hf.video_token_id)
    assert types.dtype == expected["mm_token_type_ids"].dtype and torch.equal(types, expected["mm_token_type_ids"])
    # the two resolutions give two grids, and frame choice follows each video's length
    assert videos[0].video_grid_thw[0, 1:].tolist() != videos[1].video_grid_thw[0, 1:].tolist()
    if model_type == "qwen2_5_vl":
        assert [v.second_per_grid_ts for v in videos] == [2 / (4 / 21 * 8), 2 / (4 / 20 * 8)]
    else:  # 21 and 20 frames at 8 fps, 2 fps: 5 frames each; the fifth fills the third patch twice
        assert videos[1].frame_indices == (0, 5, 10, 14, 19)
        assert videos[1].timestamps == pytest.approx(((0 + 5) / 16, (10 + 14) / 16, 19 / 8))
        assert "<1.5 seconds><|vision_start|>" in text and "<2.4 seconds><|vision_start|>" in text


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_odd_frame_count_as_hf(model_type, tokenizer, media):
    """Five frames handed over already chosen (``do_sample_frames=False``): HF repeats the last frame to fill the
    last temporal patch, and so do we, for both families."""
    transformers = _hf()
    image_processor, video_processor = _default_processors(transformers, model_type)
    prep = preprocessing(model_type, image_processor, video_processor, BUDGETS[model_type])
    chosen = [1, 4, 8, 13, 17]
    frames, indices, fps, total = read_frames(media["tall"], lambda n, f: chosen, backend="pyav")
    ours = video_inputs(prep, frames, indices, fps, total)
    hf = _hf_processor(transformers, model_type, tokenizer, image_processor)
    prompt = "<|vision_start|><|video_pad|><|vision_end|>"
    expected = hf(text=[prompt], videos=[frames], do_sample_frames=False, return_tensors="pt",
                  video_metadata=[{"total_num_frames": total, "fps": fps, "frames_indices": chosen}])
    assert ours.video_grid_thw[0, 0] == 3
    assert torch.equal(ours.pixel_values_videos, expected["pixel_values_videos"])
    assert torch.equal(ours.video_grid_thw, expected["video_grid_thw"])
    text = expand_placeholders(prompt, [ours], tokens=QwenTokens.from_tokenizer(tokenizer))
    assert torch.equal(tokenizer(text, return_tensors="pt")["input_ids"], expected["input_ids"])
    if model_type == "qwen2_5_vl":
        assert torch.equal(vision_kwargs([ours])["second_per_grid_ts"], expected["second_per_grid_ts"])
    else:
        assert list(ours.timestamps) == hf._calculate_timestamps(chosen, fps, 2)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_defaults_come_from_the_checkpoint_and_reload(model_type, tmp_path):
    """Unset fields are the checkpoint's; the saved processors reload to the same resolved budget."""
    transformers = _hf()
    image_processor, video_processor = _default_processors(transformers, model_type)
    video_processor.fps = video_processor.fps or 1.0
    prep = preprocessing(model_type, image_processor, video_processor, FrameBudget(max_frames=16))
    assert prep.budget.fps == video_processor.fps and prep.budget.max_frames == 16
    assert prep.budget.min_frames == video_processor.min_frames
    assert prep.budget.max_pixels == video_processor.size["longest_edge"]
    assert prep.budget.cap_pixels_per_frame is False
    save_preprocessing(prep, tmp_path)
    reloaded = load_preprocessing(tmp_path, model_type)
    assert reloaded.budget == prep.budget
    assert reloaded.video_processor.do_sample_frames is True


@pytest.mark.parametrize("model_type, fields, named", [
    ("qwen2_5_vl", dict(num_frames=9), "num_frames=9 is not a multiple of temporal_patch_size=2"),
    ("qwen2_5_vl", dict(num_frames=7), "num_frames=7 .* make it 8"),
    ("qwen2_5_vl", dict(fps=2.0, max_frames=33), "max_frames=33 .* make it 32"),
    ("qwen2_5_vl", dict(fps=2.0, min_frames=5), "min_frames=5 .* make it 4"),
    ("qwen2_5_vl", dict(fps=2.0, max_pixels=700), "min_pixels=\\d+ > max_pixels=700 .* video processor's"),
    ("qwen2_5_vl", dict(fps=2.0, min_pixels=100, max_pixels=700), "max_pixels=700 is below one merged patch"),
    ("qwen2_5_vl", dict(), "set fps or num_frames"),
    ("qwen3_vl", dict(min_frames=1), "min_frames=1 is below"),
    ("qwen3_vl", dict(max_frames=32, min_pixels=1024, max_pixels=32 * 32 * 16), "max_pixels=16384 is below 32768"),
    ("qwen3_vl", dict(max_video_tokens=64), "max_video_tokens=64 applies only with cap_pixels_per_frame"),
])
def test_budget_refuses_what_the_processor_would_override(model_type, fields, named):
    transformers = _hf()
    _, video_processor = _default_processors(transformers, model_type)
    with pytest.raises(ValueError, match=named):
        resolve_budget(model_type, video_processor, FrameBudget(**fields))


def test_hf_would_override_the_refused_settings():
    """What the refusals above guard against: HF's sample_frames changes these settings without a word."""
    transformers = _hf()
    from transformers.video_utils import VideoMetadata

    processor = transformers.Qwen2VLVideoProcessor(fps=2.0, min_frames=5, max_frames=33)
    assert len(processor.sample_frames(VideoMetadata(total_num_frames=160, fps=8.0))) == 32  # not max_frames 33
    assert len(processor.sample_frames(VideoMetadata(total_num_frames=8, fps=8.0))) == 4  # not min_frames 5
    assert len(processor.sample_frames(VideoMetadata(total_num_frames=80, fps=8.0), num_frames=7, fps=None)) == 8


def test_placeholder_count_mismatch_refused():
    with pytest.raises(ValueError, match=r"has 2 <\|video_pad\|> placeholder\(s\) but 1 videos"):
        expand_placeholders("<|video_pad|><|video_pad|>", videos=[object()])


def test_qwen3_timestamps_hand_computed():
    # frames 0, 5, 10 at 10 fps: patches (0, 5) and (10, 10 repeated) -> 0.25 s, 1.0 s
    assert qwen3_timestamps([0, 5, 10], 10.0, 2) == [0.25, 1.0]


@pytest.mark.parametrize("model_type, rendered", [
    ("qwen2_5_vl", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                   "<|vision_start|><|video_pad|><|vision_end|>What moves?<|im_end|>\n<|im_start|>assistant\n"),
    ("qwen3_vl", "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What moves?<|im_end|>\n"
                 "<|im_start|>assistant\n"),
])
def test_tiny_processors_saved_and_reloaded(model_type, rendered, tokenizer, tmp_path):
    """A tiny checkpoint's processors reload to the same budget; its tokenizer carries the family's template."""
    transformers = _hf()
    config = {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen3_vl": transformers.Qwen3VLConfig}[model_type]()
    budget = FrameBudget(max_frames=8)
    prep = save_tiny_processors(tmp_path, model_type, tokenizer, config.vision_config, budget)
    assert prep.budget.max_frames == 8 and prep.budget.fps == 2.0
    assert load_preprocessing(tmp_path, model_type).budget == prep.budget
    assert prep.video_processor.patch_size == config.vision_config.patch_size
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \['<\|image_pad\|>'"):
        save_tiny_processors(tmp_path / "bad", model_type, plain, config.vision_config)


@pytest.mark.parametrize("model_type, tokens", [("qwen2_5_vl", 4), ("qwen3_vl", 1)])
def test_pixel_cap_as_hf(model_type, tokens, tokenizer, media):
    """``cap_pixels_per_frame``/``max_video_tokens`` reach HF's resize as HF's own arguments do."""
    transformers = _hf()
    image_processor, video_processor = _default_processors(transformers, model_type)
    capped = dataclasses.replace(BUDGETS[model_type], cap_pixels_per_frame=True, max_video_tokens=tokens)
    prep = preprocessing(model_type, image_processor, video_processor, capped)
    plain = preprocessing(model_type, image_processor, video_processor, BUDGETS[model_type])
    frames, indices, fps, total = read_frames(media["wide"], lambda n, f: select_frames(prep, n, f), backend="pyav")
    ours = video_inputs(prep, frames, indices, fps, total)
    hf = _hf_processor(transformers, model_type, tokenizer, image_processor).video_processor
    hf.cap_pixels_per_frame, hf.max_video_tokens = True, tokens
    expected = hf(videos=[frames], do_sample_frames=False, return_tensors="pt",
                  video_metadata=[{"total_num_frames": total, "fps": fps, "frames_indices": indices}])
    assert torch.equal(ours.pixel_values_videos, expected["pixel_values_videos"])
    assert torch.equal(ours.video_grid_thw, expected["video_grid_thw"])
    assert ours.num_tokens < video_inputs(plain, frames, indices, fps, total).num_tokens
