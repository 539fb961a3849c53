"""A video file -> a Qwen-VL model's answer, through our pipeline and through HF's own processor and model.

The tiny checkpoints carry HF's processors and their families' chat templates; a prompt written by our template
(``qwen2_vl``/``qwen3_vl``), its frames chosen by the model's budget and encoded by :func:`model_inputs` must give
the ``input_ids``, pixels and logits HF's ``Qwen2_5_VLProcessor``/``Qwen3VLProcessor`` and model give for the
checkpoint's own chat template and the whole decoded video."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

from tc_llava.data.inputs import Clip, model_inputs
from tc_llava.data.templates import build_prompt, check_chat_template, image_token_of
from tc_llava.data.video import read_frames
from tc_llava.model.masks import CausalMask, FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE, VanillaRoPE
from tc_llava.model.settings import BUDGET_KEY
from tc_llava.model.tc_llava import TCLlava

pytest.importorskip("torchvision", reason="HF's Qwen-VL video processors need torchvision")

FAMILIES = ["tiny_qwen2_5_vl", "tiny_qwen3_vl"]
QUESTION = "Which shape moves first?"


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A real 3 s clip at 10 fps whose frames differ, 64x96 (not a multiple of the patch grid)."""
    path = tmp_path_factory.mktemp("qwen_pipeline") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"qp": "0"}
        for i in range(30):
            y, x = np.mgrid[0:64, 0:96]
            frame = np.stack([(x * 3 + i * 8) % 256, (y * 4 + i * 5) % 256, ((x + y + i) * 2) % 256], -1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")))
        container.mux(stream.encode())
    return path


def ours(model: TCLlava, path) -> dict:
    encoder = model.frame_processor
    frames, indices, fps, total = read_frames(path, encoder.frame_indices, backend="pyav")
    prompt = build_prompt(model.template, None, QUESTION, "", image_token_of(model.tokenizer))
    return model_inputs(model.tokenizer, encoder, None, model.template, frames, prompt,
                        clip=Clip(indices, fps, total))


def hf_processor(model: TCLlava):
    import transformers

    cls = {"qwen2_5_vl": transformers.Qwen2_5_VLProcessor, "qwen3_vl": transformers.Qwen3VLProcessor}
    prep = model.preprocessing
    return cls[model.family.model_type](image_processor=prep.image_processor, tokenizer=model.tokenizer,
                                        video_processor=prep.video_processor)


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_video_file_to_logits_equals_hfs_processor_and_model(ckpt, request, video):
    model = TCLlava.from_pretrained(request.getfixturevalue(ckpt), VanillaRoPE(), CausalMask(),
                                    attn_implementation="sdpa").eval()
    inputs = ours(model, video)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole, _, fps, total = read_frames(video, lambda n, f: range(n), backend="pyav")
    expected = hf_processor(model)(text=[text], videos=[whole], video_metadata=[{"total_num_frames": total, "fps": fps}],
                                   do_sample_frames=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"][0])
    visual = {key: inputs[key] for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
              if key in inputs}
    assert sorted(visual) == sorted(k for k in expected if k not in ("input_ids", "attention_mask",
                                                                      "mm_token_type_ids"))
    for key, value in visual.items():
        assert torch.equal(value, expected[key]), key
    with torch.no_grad():
        reference = model.hf(**expected).logits
        got = model(inputs["input_ids"][None], None, **visual).logits
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_export_reload_preprocesses_the_same_file_identically_and_records_the_budget(ckpt, request, video, tmp_path):
    model = TCLlava.from_pretrained(request.getfixturevalue(ckpt), TADRoPE(0.5), FrameBlockCausalMask(),
                                    attn_implementation="sdpa", frame_budget={"fps": 4.0, "max_frames": 8}).eval()
    before = ours(model, video)
    model.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())[BUDGET_KEY]
    assert (recorded["fps"], recorded["max_frames"]) == (4.0, 8)
    reloaded = TCLlava.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert reloaded.preprocessing.budget == model.preprocessing.budget
    after = ours(reloaded, video)
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key], key
    assert before["num_frames"] == 8  # 3 s at 4 fps, capped by max_frames
    visual = {k: before[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in before}
    with torch.no_grad():
        assert torch.equal(reloaded(before["input_ids"][None], None, **visual).logits,
                           model(before["input_ids"][None], None, **visual).logits)


def test_a_template_that_differs_from_the_checkpoints_is_refused(tiny_qwen2_5_vl, tiny_qwen3_vl):
    qwen25 = TCLlava.from_pretrained(tiny_qwen2_5_vl, attn_implementation="sdpa")
    check_chat_template(qwen25.tokenizer, "qwen2_vl")
    check_chat_template(TCLlava.from_pretrained(tiny_qwen3_vl, attn_implementation="sdpa").tokenizer, "qwen3_vl")
    with pytest.raises(ValueError, match="chat template 'qwen3_vl' does not write prompts as the checkpoint's own"):
        check_chat_template(qwen25.tokenizer, "qwen3_vl")  # Qwen2.5-VL's template adds its default system turn
    with pytest.raises(ValueError, match=r"model.template='chatml' does not write qwen2_5_vl prompts: .* "
                                         r"\(set model.template=qwen2_vl\)"):
        TCLlava.from_pretrained(tiny_qwen2_5_vl, template="chatml")


def test_a_budget_the_processor_would_override_is_refused_before_the_model_loads(tiny_qwen2_5_vl):
    with pytest.raises(ValueError, match="frame budget: .*min_pixels"):
        TCLlava.from_pretrained(tiny_qwen2_5_vl, frame_budget={"min_pixels": 10**6, "max_pixels": 10**4})
