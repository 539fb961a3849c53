"""The public numerics: temporal positions and the dense frame-block-causal mask; the rules' checked parameters."""

from __future__ import annotations

import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import ListConfig

from tc_llava.model.build import model_from_config
from tc_llava.model.masks import frame_block_causal_mask
from tc_llava.model.rope import MRoPE, TADRoPE, VideoRoPE, real_token_index, temporal_positions

from conftest import CONFIGS


def reference_positions(frames: list[int], gamma: float) -> list[float]:
    """REFERENCE.md section 1, written as the literal walk with a counter."""
    out, c, prev = [], 0, None
    for m, f in enumerate(frames):
        if f < 0 or f != prev:
            tau, c = c, c + 1
        out.append(m + gamma * tau)
        prev = f
    return out


def test_positions_match_the_walk_on_a_hand_made_layout():
    # text, text, frame0 x3, frame1 x3, text, text
    frames = [-1, -1, 0, 0, 0, 1, 1, 1, -1, -1]
    got = temporal_positions(torch.tensor([frames]), gamma=1.0)[0].tolist()
    # m:   0 1 2 3 4 5 6 7 8 9 ; tau: 0 1 2 2 2 3 3 3 4 5
    assert got == [0, 2, 4, 5, 6, 8, 9, 10, 12, 14]
    assert got == reference_positions(frames, 1.0)


def test_positions_random_layouts_and_gammas():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        frames = [-1] * int(torch.randint(0, 5, (1,), generator=g))
        for f in range(int(torch.randint(1, 5, (1,), generator=g))):
            frames += [f] * int(torch.randint(1, 6, (1,), generator=g))
        frames += [-1] * int(torch.randint(0, 5, (1,), generator=g))
        for gamma in (0.0, 0.5, 1.0, 2.0):
            got = temporal_positions(torch.tensor([frames]), gamma)[0]
            torch.testing.assert_close(got, torch.tensor(reference_positions(frames, gamma)))


def test_gamma_zero_is_the_plain_index():
    frames = torch.tensor([[-1, 0, 0, 1, 1, -1]])
    assert temporal_positions(frames, 0.0)[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_padding_counts_real_tokens_only():
    frames = [-1, 0, 0, 1, 1, -1]
    left = torch.tensor([[-1, -1] + frames])
    left_mask = torch.tensor([[0, 0] + [1] * 6])
    right = torch.tensor([frames + [-1, -1]])
    right_mask = torch.tensor([[1] * 6 + [0, 0]])
    expect = reference_positions(frames, 1.0)
    assert temporal_positions(left, 1.0, left_mask)[0].tolist() == [0, 0] + expect
    assert temporal_positions(right, 1.0, right_mask)[0].tolist() == expect + [0, 0]
    assert real_token_index(left, left_mask)[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]


def dense_reference(frames: list[int], real: list[int]) -> torch.Tensor:
    """The mask rule of REFERENCE.md section 1, one (i, j) pair at a time."""
    n = len(frames)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            ok = j <= i or (frames[i] == frames[j] and frames[i] >= 0)
            out[i, j] = ok and bool(real[j])
    return out


def test_mask_matches_pairwise_rule_with_padding():
    frames = [[-1, -1, 0, 0, 1, 1, -1, -1], [-1, 0, 0, 0, 1, 1, 1, -1]]
    real = [[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]]
    mask = frame_block_causal_mask(torch.tensor(frames), torch.tensor(real))
    assert mask.shape == (2, 1, 8, 8)
    for b in range(2):
        assert torch.equal(mask[b, 0], dense_reference(frames[b], real[b]))
    # a visual token sees the later tokens of its own frame, text never sees ahead
    assert mask[1, 0, 1, 3] and not mask[1, 0, 3, 4] and not mask[0, 0, 1, 2]


# --------------------------------------------------------------------------- checked parameters
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, message", [
    (lambda: TADRoPE(gamma=NAN), "rope.gamma must be a finite number >= 0, got nan"),
    (lambda: TADRoPE(gamma=INF), "rope.gamma must be a finite number >= 0, got inf"),
    (lambda: TADRoPE(gamma=-0.5), "rope.gamma must be a finite number >= 0, got -0.5"),
    (lambda: TADRoPE(gamma="0.5"), "rope.gamma must be a finite number >= 0, got '0.5'"),
    (lambda: TADRoPE(gamma=True), "rope.gamma must be a finite number >= 0, got True"),
    (lambda: VideoRoPE(delta=NAN), "rope.delta must be a finite number >= 0, got nan"),
    (lambda: VideoRoPE(delta=-1.0), "rope.delta must be a finite number >= 0, got -1.0"),
    (lambda: VideoRoPE(temporal_pairs=1.5), "rope.temporal_pairs must be an integer >= 0, got 1.5"),
    (lambda: VideoRoPE(temporal_pairs=-1), "rope.temporal_pairs must be an integer >= 0, got -1"),
    (lambda: MRoPE(mrope_section="abc"), "rope.mrope_section must be 3 integers >= 0 (t, h, w), got 'abc'"),
    (lambda: MRoPE(mrope_section=[16, 24]), "rope.mrope_section must be 3 integers >= 0 (t, h, w), got [16, 24]"),
    (lambda: MRoPE(mrope_section=[16.0, 24, 24]),
     "rope.mrope_section must be 3 integers >= 0 (t, h, w), got [16.0, 24, 24]"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_rule_parameters_are_checked_where_the_rule_is_made(make, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        make()


def test_valid_parameters_keep_their_meaning():
    assert TADRoPE(gamma=0).gamma == 0.0 and type(TADRoPE(gamma=2).gamma) is float
    assert temporal_positions(torch.tensor([[-1, 0, 0, -1]]), TADRoPE(gamma=0).gamma)[0].tolist() == [0, 1, 2, 3]
    assert MRoPE(mrope_section=ListConfig([2, 3, 3])).mrope_section == (2, 3, 3)
    assert VideoRoPE(delta=0, temporal_pairs=0) == VideoRoPE(delta=0.0, temporal_pairs=0)


@pytest.mark.parametrize("overrides, message", [
    (["rope=tad", "rope.gamma=nan"], "rope.gamma must be a finite number >= 0, got nan"),
    (["rope=tad", "rope.gamma=abc"], "rope.gamma must be a finite number >= 0, got 'abc'"),
    (["rope=tad", "rope.gamma=-0.5"], "rope.gamma must be a finite number >= 0, got -0.5"),
    (["rope=videorope", "rope.delta=nan"], "rope.delta must be a finite number >= 0, got nan"),
    (["rope=mrope", "rope.mrope_section=[a,b,c]"],
     "rope.mrope_section must be 3 integers >= 0 (t, h, w), got ['a', 'b', 'c']"),
    (["projector=pllava_pool", "projector.pooling_shape=abc"],
     "projector.pooling_shape must be 3 integers >= 1 (T, H, W), got 'abc'"),
], ids=lambda v: v[-1] if isinstance(v, list) else None)
def test_command_line_values_are_checked_before_the_model_loads(tmp_path, overrides, message):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("eval", overrides=[*overrides, f"paths.cache={tmp_path}"])
    with pytest.raises(InstantiationException, match=re.escape(message)):
        model_from_config(cfg)
    assert not any(tmp_path.iterdir())  # refused before the tiny model was built
