"""The public numerics: temporal positions and the dense frame-block-causal mask."""

from __future__ import annotations

import torch

from tc_llava.model.masks import frame_block_causal_mask
from tc_llava.model.rope import real_token_index, temporal_positions


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
