"""GPU paths: flex attention (compiled, BlockMask) against sdpa, and flex backward.

Uses the benchmark's random model of real shapes (CLIP ViT-L/336, 7B-shaped Llama layers,
16 frames pooled to 16x12x12), where flex's GPU kernels have their configs. Skipped
without a CUDA GPU; CI has none, the device runs recorded in the README do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))


def test_flex_matches_sdpa_and_trains_on_gpu():
    from shapes import random_tc_llava, video_prompts

    model = random_tc_llava(num_layers=2, attn="sdpa")
    ids, mask, pixels = video_prompts(model, batch=2)
    real = mask.bool()
    with torch.no_grad():
        sdpa = model(ids, mask, pixels).logits.float()
        model.language_model.config._attn_implementation = "flex_attention"
        flex = model(ids, mask, pixels).logits.float()
    # bf16 logits of magnitude ~5: the two kernels round differently, not by more
    assert (sdpa - flex)[real].abs().max() < 0.25
    labels = ids.masked_fill(~real, -100).masked_fill(ids == model.image_token_id, -100)
    model(ids, mask, pixels, labels=labels).loss.backward()
    grads = [p.grad for p in model.language_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def assert_as_close_as_bf16_sdpa(q, k, v, spans, dense: torch.Tensor, real: torch.Tensor | bool = True) -> None:
    """block_merge's bf16 outputs and gradients (on ``real`` queries) are as close to the fp32 dense-mask reference
    as bf16 SDPA with that mask is."""
    from tc_llava.model.block_attention import block_merge_attention

    weight = torch.randn(q.shape, device="cuda") * real
    runs = {
        "reference": lambda: sdpa(q.float(), k.float(), v.float(), attn_mask=dense),
        "sdpa_bf16": lambda: sdpa(q, k, v, attn_mask=dense),
        "block_merge": lambda: block_merge_attention(q, k, v, spans),
    }
    outs, grads = {}, {}
    for name, fn in runs.items():
        outs[name] = fn().float() * real
        grads[name] = torch.autograd.grad((outs[name] * weight).sum(), (q, k, v))
    for name in ("sdpa_bf16", "block_merge"):
        assert torch.isfinite(outs[name]).all() and all(torch.isfinite(g).all() for g in grads[name])
    error = {n: (outs[n] - outs["reference"]).abs().max().item() for n in ("sdpa_bf16", "block_merge")}
    assert error["block_merge"] <= 2 * error["sdpa_bf16"] + 1e-3, error
    for got, bf16, want in zip(grads["block_merge"], grads["sdpa_bf16"], grads["reference"]):
        assert (got.float() - want).abs().max() <= 2 * (bf16.float() - want).abs().max() + 1e-3


def test_block_merge_matches_the_dense_reference_in_bf16():
    """block_merge in bf16 is as close to the fp32 dense-mask reference as bf16 SDPA with that mask is."""
    from tc_llava.model.block_attention import block_spans
    from tc_llava.model.masks import block_causal_mask

    torch.manual_seed(0)
    length = 2395
    frame_ids = torch.full((1, length), -1, device="cuda")
    frame_ids[0, 49:49 + 16 * 144] = torch.arange(16, device="cuda").repeat_interleave(144)
    spans = block_spans(frame_ids, torch.ones_like(frame_ids))
    q, k, v = (torch.randn(1, 32, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    assert_as_close_as_bf16_sdpa(q, k, v, spans, block_causal_mask(frame_ids))


@pytest.mark.parametrize("case", ["packed", "left_padded"])
def test_segments_match_the_dense_reference_in_bf16(case):
    """The variable-length flash part plus the Triton in-block part, on packed rows of different frame counts
    and on left-padded rows, is as close to the fp32 dense reference as bf16 SDPA with the mask is."""
    from tc_llava.model.block_attention import block_spans
    from tc_llava.model.masks import block_causal_mask, sample_block_ids

    torch.manual_seed(1)
    length, per_frame = 3072, 144
    frame_ids = torch.full((2, length), -1, device="cuda")
    sample_ids = torch.full((2, length), -1, device="cuda")
    if case == "packed":  # row 0: 8 frames + 1 frame + 4 frames; row 1: 16 frames, then padding
        for row, samples in ((0, [(0, 40, 8), (1300, 17, 1), (1500, 3, 4)]), (1, [(0, 60, 16)])):
            for k, (start, text, frames) in enumerate(samples):
                end = start + text + frames * per_frame + 30
                sample_ids[row, start:end] = k
                frame_ids[row, start + text:start + text + frames * per_frame] = (
                    torch.arange(frames, device="cuda").repeat_interleave(per_frame))
    else:  # left padding: 12 and 16 frames
        for row, frames in ((0, 12), (1, 16)):
            start = length - (frames * per_frame + 200)
            sample_ids[row, start:] = 0
            frame_ids[row, start + 50:start + 50 + frames * per_frame] = (
                torch.arange(frames, device="cuda").repeat_interleave(per_frame))
    mask = (sample_ids >= 0).long()
    blocks = sample_block_ids(frame_ids, sample_ids)
    spans = block_spans(blocks, mask, sample_ids if case == "packed" else None)
    assert spans is not None and spans.segments is not None
    dense = block_causal_mask(blocks, mask, sample_ids) | torch.eye(length, dtype=torch.bool, device="cuda")
    q, k, v = (torch.randn(2, length, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    assert_as_close_as_bf16_sdpa(q, k, v, spans, dense, real=mask.bool()[:, None, :, None])


def frame_runs(row: torch.Tensor, at: int, sizes: list[int], first: int = 0) -> int:
    """Frame ids ``first, first + 1, ...`` of ``sizes`` tokens each from position ``at``; returns the end."""
    for f, n in enumerate(sizes):
        row[at:at + n] = first + f
        at += n
    return at


@pytest.mark.parametrize("case", ["image_then_video", "resolutions_left_padded", "packed"])
def test_unequal_blocks_match_the_dense_reference_in_bf16(case):
    """Blocks of different sizes (an image then a video's frames; samples of two resolutions, left-padded; packed
    rows mixing them) on the CUDA path: flash (or its variable-length kernel) plus the Triton in-block kernels on
    their variable-length schedule, as close to the fp32 dense reference as bf16 SDPA with the mask is."""
    from tc_llava.model.block_attention import block_spans
    from tc_llava.model.masks import block_causal_mask, sample_block_ids

    torch.manual_seed(2)
    rows, length = (1, 4096) if case == "image_then_video" else (2, 3584)
    frame_ids = torch.full((rows, length), -1, device="cuda")
    sample_ids = torch.full((rows, length), -1, device="cuda")
    if case == "image_then_video":  # a 26x46 image, then 16 frames of 12x12
        sample_ids[0] = 0
        frame_runs(frame_ids[0], frame_runs(frame_ids[0], 40, [1196]) + 12, [144] * 16, first=1)
    elif case == "resolutions_left_padded":  # 12 frames of 16x16 beside 20 frames of 10x10
        for row, (frames, per_frame) in enumerate(((12, 256), (20, 100))):
            start = length - (frames * per_frame + 150)
            sample_ids[row, start:] = 0
            frame_runs(frame_ids[row], start + 60, [per_frame] * frames)
    else:  # row 0: an image of 576 then 8 frames of 144, and 10 frames of 64; row 1: 6 frames of 256, padding
        sample_ids[0, :1900], sample_ids[0, 1900:2700], sample_ids[1, :1700] = 0, 1, 0
        frame_runs(frame_ids[0], frame_runs(frame_ids[0], 30, [576]) + 9, [144] * 8, first=1)
        frame_runs(frame_ids[0], 1950, [64] * 10)
        frame_runs(frame_ids[1], 50, [256] * 6)
    mask = (sample_ids >= 0).long()
    packed = case == "packed"
    blocks = sample_block_ids(frame_ids, sample_ids) if packed else torch.where(mask.bool(), frame_ids, -1)
    spans = block_spans(blocks, mask, sample_ids if packed else None)
    assert spans is not None and spans.sizes is not None
    dense = block_causal_mask(blocks, mask, sample_ids) | torch.eye(length, dtype=torch.bool, device="cuda")
    q, k, v = (torch.randn(rows, length, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               .requires_grad_() for _ in range(3))
    assert_as_close_as_bf16_sdpa(q, k, v, spans, dense, real=mask.bool()[:, None, :, None])


def test_block_backends_match_sdpa_logits():
    """auto -> block_auto, and block_merge, against the dense SDPA mask.

    One prompt (both decompose it, the in-block term in the Triton kernels) and a left-padded
    pair (both decompose it through variable-length segments), then KV-cached generation
    through block_auto.
    """
    from shapes import random_tc_llava, video_prompts

    from tc_llava.model.attention import BLOCK_AUTO as AUTO, BLOCK_MERGE as NAME, resolve_attention

    assert resolve_attention("auto") == AUTO
    model = random_tc_llava(num_layers=2, attn="sdpa")
    for batch in (1, 2):
        ids, mask, pixels = video_prompts(model, batch=batch)
        real = mask.bool()
        logits = {}
        with torch.no_grad():
            for impl in ("sdpa", AUTO, NAME):
                model.language_model.config._attn_implementation = impl
                logits[impl] = model(ids, mask, pixels).logits.float()
        for impl in (AUTO, NAME):  # bf16 logits of magnitude ~5: the kernels round differently, not by more
            assert (logits[impl] - logits["sdpa"])[real].abs().max() < 0.25, (impl, batch)
    model.language_model.config._attn_implementation = AUTO
    with torch.no_grad():
        out = model.generate(ids, mask, pixels, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.sequences.shape == (2, 4)


def test_packed_training_step_matches_padded_and_compiles_once_per_layer():
    """A packed image/video batch of the 7B-shaped layers through block_auto (segments on the variable-length flash
    kernel) gives the padded batch's loss, eager and with compiled layers, and packings of new shapes do not
    recompile the layers once their shapes are dynamic."""
    import numpy as np
    from shapes import random_tc_llava
    from sft_mixture import PAD, mixture_samples, model_inputs

    from tc_llava.data.collate import PackingCollator, SFTCollator
    from tc_llava.model.attention import BLOCK_AUTO
    from tc_llava.train.loop import compile_layers, compiled_graphs

    model = random_tc_llava(num_layers=2, attn=BLOCK_AUTO).train()
    model.hf.model.vision_tower.requires_grad_(False)
    rng = np.random.default_rng(0)
    size = model.config.vision_config.image_size
    batches = [mixture_samples(rng, 6, model, size) for _ in range(4)]
    assert {s["is_image"] for s in batches[0] + batches[1]} == {True, False}

    def loss(collate, samples):
        return model(**model_inputs(collate(samples), "cuda", torch.bfloat16)).loss

    packed, padded = PackingCollator(PAD, max_tokens=6000), SFTCollator(PAD)
    for samples in batches[:2]:
        a, b = loss(packed, samples), loss(padded, samples)
        assert torch.isfinite(a) and abs(a.item() - b.item()) < 1e-2 * abs(b.item()), (a.item(), b.item())
    eager = [loss(packed, samples).item() for samples in batches]
    torch._dynamo.reset()
    compile_layers(model)
    compiled, graphs, before = [], [], compiled_graphs()  # the count is the process's, other tests' included
    for samples in batches:
        out = loss(packed, samples)
        out.backward()
        compiled.append(out.item())
        graphs.append(compiled_graphs() - before)
    np.testing.assert_allclose(compiled, eager, rtol=1e-2)
    # a static graph, then one with dynamic shapes; the last packings add none
    assert graphs[-1] == graphs[-2] <= 4, graphs
