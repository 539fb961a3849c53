"""``tc-llava-chat``: a tiny export answers about a generated video, in one turn and in two (the second
turn asks about the same frames, decoded once), from ``-q`` and from stdin; mistakes are one line."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tc_llava import chat
from tc_llava.data.templates import build_prompt, stop_token_ids, tokenize_prompt
from tc_llava.data.video import sample_frames
from tc_llava.model.masks import FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE
from tc_llava.model.tc_llava import TCLlava

from conftest import REPO
from test_datasets import write_video


@pytest.fixture(scope="module")
def export(tiny_onevision, tmp_path_factory):
    """A tiny OneVision export recording its rules, chat template and training frame count."""
    out = tmp_path_factory.mktemp("chat") / "export"
    model = TCLlava.from_pretrained(tiny_onevision, rope=TADRoPE(), mask=FrameBlockCausalMask(), template="chatml")
    model.frame_sampling = {"num_frames": 4, "image_frames": 1, "sampling": "random"}
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", 24, size=64)


def test_two_turns_about_one_decoded_video(export, video, monkeypatch):
    decoded, prompts = [], []
    sample = chat.sample_frames
    monkeypatch.setattr(chat, "sample_frames", lambda *a, **kw: decoded.append(a) or sample(*a, **kw))
    generate = TCLlava.generate
    monkeypatch.setattr(TCLlava, "generate", lambda self, ids, *a, **kw: prompts.append(ids) or generate(self, ids, *a, **kw))
    out = io.StringIO()
    args = chat.parse_args([str(export), str(video), "-q", "Which colour?", "-q", "And then?", "--max-new-tokens", "6"])
    answers = chat.run(args, out)
    lines = out.getvalue().splitlines()
    _, indices = sample_frames(video, 4, "middle", backend="pyav")
    assert lines[0] == (f"{video}: 4 frames, middle sampling (the model was trained with 4 (random)), "
                        f"indices {indices}")
    assert lines[1:] == ["Q: Which colour?", f"A: {answers[0]}", "Q: And then?", f"A: {answers[1]}"]
    assert len(decoded) == 1 and len(prompts) == 2 and all(answers)

    # the first turn is exactly the one-turn prompt of the benchmarks, on the same frames
    model = TCLlava.from_pretrained(export).eval()
    frames, _ = sample_frames(video, 4, "middle", backend="pyav")
    pixels = model.frame_processor(images=list(frames), return_tensors="pt")["pixel_values"][None]
    ids = tokenize_prompt(model.tokenizer, "chatml", build_prompt("chatml", None, "Which colour?", image_token="<video>"),
                          model.tokens_per_video(4))[None]
    stops = stop_token_ids(model.tokenizer, "chatml")
    assert stops == sorted({model.tokenizer.eos_token_id, model.tokenizer.convert_tokens_to_ids("<|im_end|>")})
    tokens = model.generate(ids, None, pixels, max_new_tokens=6, eos_token_id=stops).sequences[0].tolist()
    tokens = tokens[:next((k for k, t in enumerate(tokens) if t in stops), len(tokens))]
    assert torch.equal(prompts[0], ids) and answers[0] == model.tokenizer.decode(tokens, skip_special_tokens=True)

    # the second turn holds the video once, then the first question and answer, then the new question
    second = prompts[1][0]
    video_id = model.placeholder_token_id
    assert int((second == video_id).sum()) == model.tokens_per_video(4) and prompts[1].shape[1] > ids.shape[1]
    text = model.tokenizer.decode(second[second != video_id])
    assert text.index("Which colour?") < text.index(answers[0]) < text.index("And then?")


def test_an_image_is_one_frame(export, tmp_path):
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "still.png")
    out = io.StringIO()
    chat.run(chat.parse_args([str(export), str(tmp_path / "still.png"), "-q", "What?", "--max-new-tokens", "2"]), out)
    assert out.getvalue().startswith(f"{tmp_path / 'still.png'}: 1 frames, middle sampling (an image), indices [0]")


def test_the_command_reads_turns_from_stdin(export, video):
    run = subprocess.run([sys.executable, "-m", "tc_llava.chat", str(export), str(video), "--max-new-tokens", "3",
                          "--sampling", "fps", "--fps", "2", "--frames", "8"],
                         input="Which colour?\nAnd then?\n", capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    # 24 frames at 8 fps: 3 s at 2 frames per second
    assert f"{video}: 6 frames, fps sampling at 2 per second (--frames)" in run.stdout
    assert run.stdout.count("Q: ") == 2 and run.stdout.count("A: ") == 2


def test_mistakes_are_one_line(export, tmp_path, caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        chat.main([str(export), str(tmp_path / "missing.mp4"), "-q", "What?"])
    assert stop.value.code == 1
    assert caplog.records[-1].getMessage() == f"VideoReadError: {tmp_path / 'missing.mp4'}: no such file or directory"


def test_the_dtype_is_the_exports(tiny_onevision, video, tmp_path, monkeypatch):
    """An export saved in bfloat16 is asked in bfloat16 (the chat app chose float32 on CPU), unless --dtype says."""
    export = tmp_path / "bf16"
    TCLlava.from_pretrained(tiny_onevision, dtype=torch.bfloat16, template="chatml").save_pretrained(export)
    seen = []
    original = TCLlava.generate
    monkeypatch.setattr(TCLlava, "generate",
                        lambda self, *a, **kw: seen.append(next(self.parameters()).dtype) or original(self, *a, **kw))
    for flags in ([], ["--dtype", "float32"]):
        args = chat.parse_args([str(export), str(video), "-q", "What?", "--max-new-tokens", "2", *flags])
        chat.run(args, io.StringIO())
    assert seen == [torch.bfloat16, torch.float32]
