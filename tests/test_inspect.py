"""``python -m tc_llava.inspect``: the picture shows the layout the model's layers receive.

The mask PNG is compared with a dense mask the test builds from the prompt's tokens by the rules' definitions;
a Qwen-VL model's per-axis positions with HF's own ``get_rope_index`` on the same inputs.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tc_llava import inspect as layout_inspect
from tc_llava.chat import Chat
from tc_llava.model.tc_llava import TCLlava

from test_datasets import write_video


def _reference(ids: np.ndarray, visual: np.ndarray, frame_of: np.ndarray, rule: str) -> np.ndarray:
    """The rule's mask by its definition: causal, plus whole frames (frame_block_causal) or all visual tokens
    (bidirectional_visual) seeing each other."""
    n = len(ids)
    allowed = np.tril(np.ones((n, n), dtype=bool))
    if rule == "frame_block_causal":
        allowed |= (frame_of[:, None] == frame_of[None, :]) & (frame_of[:, None] >= 0)
    elif rule == "bidirectional_visual":
        allowed |= visual[:, None] & visual[None, :]
    return allowed


def _draw(tmp_path, *args: str) -> None:
    """The command's work in this process (the command line itself is run by the tests below)."""
    layout_inspect.run(layout_inspect.parse_args([*args, "--out", str(tmp_path / "layout.png")]))


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tc_llava.inspect", *args, "--out", str(tmp_path / "layout.png")],
                          capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.parametrize("rule", ["frame_block_causal", "bidirectional_visual", "causal"])
def test_mask_png_is_the_rule_on_the_prompt(tiny_onevision, tmp_path, rule):
    _draw(tmp_path, str(tiny_onevision), "--frames", "3", "--template", "chatml", "--rope", "tad",
          "--param", "gamma=0.5", "--mask", rule)
    model = TCLlava.from_pretrained(tiny_onevision, template="chatml")
    frames = np.full((3, 32, 32, 3), 127, dtype=np.uint8)
    ids = Chat(model, frames, "chatml").inputs(layout_inspect.DEFAULT_QUESTION)["input_ids"].numpy()
    placeholder = np.flatnonzero(ids == model.placeholder_token_id)
    per_frame = model.tokens_per_frame(3)
    assert len(placeholder) == 3 * per_frame + 1  # OneVision: the frames' tokens, then one newline
    frame_of = np.full(len(ids), -1)
    frame_of[placeholder[:-1]] = np.arange(3 * per_frame) // per_frame
    expected = _reference(ids, frame_of >= 0, frame_of, rule)
    drawn = np.asarray(Image.open(tmp_path / "layout.mask.png"))
    assert drawn.shape == expected.shape
    np.testing.assert_array_equal(drawn == 255, expected)
    picture = Image.open(tmp_path / "layout.png")
    assert picture.size == (1650, 1100)
    table = (tmp_path / "layout.spans.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == \
        ["text", "frame 0", "frame 1", "frame 2", "newline", "text"]
    assert f"| frame 1 | {per_frame} |" in table and "| newline | 1 |" in table


def _single_reference(model: TCLlava, frames: int, rule: str) -> np.ndarray:
    """One sample's mask by the rule's definition, from its own prompt's tokens (OneVision: frames, then a newline)."""
    ids = Chat(model, np.full((frames, 32, 32, 3), 127, dtype=np.uint8), "chatml").inputs(
        layout_inspect.DEFAULT_QUESTION)["input_ids"].numpy()
    placeholder = np.flatnonzero(ids == model.placeholder_token_id)
    per_frame = model.tokens_per_frame(frames)
    frame_of = np.full(len(ids), -1)
    frame_of[placeholder[:-1]] = np.arange(frames * per_frame) // per_frame
    return _reference(ids, frame_of >= 0, frame_of, rule)


def test_batches_through_the_collators(tiny_onevision, tmp_path):
    """A packed row is its samples' masks on the diagonal and nothing across them; a left-padded row is its sample's
    mask after padding that sees nothing and is seen by nothing."""
    model = TCLlava.from_pretrained(tiny_onevision, template="chatml")
    two, three = (_single_reference(model, n, "frame_block_causal") for n in (2, 3))
    _draw(tmp_path, str(tiny_onevision), "--frames", "2", "3", "--pack", "--template", "chatml",
          "--mask", "frame_block_causal")
    packed = np.zeros((len(two) + len(three),) * 2, dtype=bool)
    packed[:len(two), :len(two)], packed[len(two):, len(two):] = two, three
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "layout.mask.png")) == 255, packed)
    assert "| s1 frame 2 |" in (tmp_path / "layout.spans.md").read_text()
    _draw(tmp_path, str(tiny_onevision), "--frames", "3", "2", "--row", "1", "--template", "chatml",
          "--mask", "frame_block_causal")
    pad = len(three) - len(two)
    padded = np.zeros((len(three),) * 2, dtype=bool)
    padded[pad:, pad:] = two
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "layout.mask.png")) == 255, padded)
    assert (tmp_path / "layout.spans.md").read_text().splitlines()[2].startswith(f"| padding | {pad} | 0-{pad - 1} |")


def test_qwen3_vl_axes_are_hf_positions_plus_gamma_tau(tiny_qwen3_vl, tmp_path):
    model = TCLlava.from_pretrained(tiny_qwen3_vl)
    frames, clip = layout_inspect.blank_video(model, 4)
    inputs = Chat(model, frames, model.template, clip=clip).inputs("What moves?")
    vanilla = layout_inspect.inspect_inputs(model, inputs)
    ids = inputs["input_ids"][None]
    types = (ids == model.hf.config.video_token_id).long() * 2
    hf, _ = model.hf.model.get_rope_index(ids, mm_token_type_ids=types, video_grid_thw=inputs["video_grid_thw"],
                                          attention_mask=torch.ones_like(ids))
    for axis, row in zip("thw", hf[:, 0].numpy()):
        np.testing.assert_array_equal(vanilla.positions[axis], row)
    tad = TCLlava.from_pretrained(tiny_qwen3_vl, rope=layout_inspect.build_rule("rope", "tad", {"gamma": 2.0}, "test"))
    shifted = layout_inspect.inspect_inputs(tad, inputs)
    np.testing.assert_array_equal(shifted.positions["t"], hf[0, 0].numpy() + 2 * vanilla.positions["tau"])
    kinds = [s.label for s in vanilla.spans]
    assert kinds.count("timestamp") == 2 and [k for k in kinds if k.startswith("frame")] == ["frame 0", "frame 1"]
    assert [s.text for s in vanilla.spans if s.kind == "timestamp"][0].startswith("<0.")


def test_a_real_video_and_question(tiny_onevision, tmp_path):
    video = write_video(tmp_path / "clip.mp4", 12)
    proc = _run(tmp_path, str(tiny_onevision), "--video", str(video), "-q", "Which colour comes first?",
                "--template", "chatml")
    assert proc.returncode == 0, proc.stderr
    assert "clip.mp4: 16 frames, middle sampling (default)" in proc.stdout
    table = (tmp_path / "layout.spans.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:] if "frame" in line] == \
        [f"frame {f}" for f in range(16)]
    assert "| \\nWhich colour comes first?<\\|im_end\\|>" in table


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "--frames must be positive integers, got [0]"),
    (["--frames", "2", "--param", "gamma=1"], "set rope parameters: name the rule with --rope"),
    (["--frames", "2", "--param", "colour=1"], "expected NAME=VALUE with NAME one of"),
])
def test_bad_arguments_are_one_line_before_loading(tmp_path, caplog, args, message):
    with pytest.raises(SystemExit) as exit_:
        layout_inspect.main([str(tmp_path / "no_model"), *args, "--out", str(tmp_path / "layout.png")])
    assert exit_.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("ValueError: ") and message in errors[0]
    assert "config.json" not in caplog.text  # refused before the model is looked at
