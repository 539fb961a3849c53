"""The block_merge backend: causal flash + in-block term merged by log-sum-exp, against dense SDPA.

On CPU it runs with PyTorch's CPU flash kernels (the same decomposition the GPU runs with
the CUDA ones, which tests/test_gpu.py checks in bf16).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from tc_llava.model.attention import BLOCK_AUTO as AUTO, BLOCK_MERGE as NAME, resolve_attention, uses_flex
from tc_llava.model.block_attention import block_merge_attention, block_merge_backward_op, block_merge_op, block_spans
from tc_llava.model.hf_compat import cache_kwargs
from tc_llava.model.masks import (
    BidirectionalVisualMask, FrameBlockCausalMask, block_causal_mask, frame_block_causal_mask, sample_block_ids,
)
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.rope import TADRoPE, VideoRoPE

from test_model import load, video_batch
from test_packed import padded_batch, samples


def layout(starts: list[int], length: int, frames: int, per_frame: int, pad_right: list[int]):
    ids = torch.full((len(starts), length), -1)
    mask = torch.ones(len(starts), length, dtype=torch.long)
    for b, (start, pad) in enumerate(zip(starts, pad_right)):
        ids[b, start:start + frames * per_frame] = torch.arange(frames).repeat_interleave(per_frame)
        if pad:
            mask[b, -pad:] = 0
    return ids, mask


@pytest.mark.parametrize("per_frame", [2, 5, 16])
@pytest.mark.parametrize("rule", [FrameBlockCausalMask(), BidirectionalVisualMask()])
def test_forward_and_backward_equal_dense_sdpa(rule, per_frame):
    torch.manual_seed(per_frame)
    frame_ids, mask = layout([3, 11, 0], 64, frames=3, per_frame=per_frame, pad_right=[0, 4, 9])
    block_ids = rule.block_ids(frame_ids)
    spans = block_spans(block_ids, mask)
    assert spans is not None
    q, k, v = (torch.randn(3, 4, 64, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    dense = block_causal_mask(block_ids)
    out = block_merge_attention(q, k, v, spans)
    ref = sdpa(q, k, v, attn_mask=dense)
    real = mask.bool()[:, None, :, None]  # right padding: only the pads' own rows differ
    assert (out - ref)[real.expand_as(out)].abs().max() < 1e-12
    weight = torch.randn_like(out) * real
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _check_inblock_kernels(kernels, dense: torch.Tensor, heads: int, dim: int, starts: torch.Tensor, size: int,
                           sizes: torch.Tensor | None = None, **tiling) -> None:
    """The in-frame kernels, from a causal flash pass's state, give the output, log-sum-exp and gradients of
    dense attention with ``dense`` as its mask (fp32 kernels against an fp64 reference)."""
    batch, length = dense.shape[0], dense.shape[-1]
    q, k, v = (torch.randn(batch, length, heads, dim, dtype=torch.float64).transpose(1, 2).requires_grad_()
               for _ in range(3))
    scale = dim ** -0.5
    ref = sdpa(q, k, v, attn_mask=dense, scale=scale)
    ref_lse = torch.logsumexp((q @ k.transpose(-1, -2) * scale).masked_fill(~dense, float("-inf")), -1)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    q32, k32, v32, g32 = (x.detach().float() for x in (q, k, v, grad))
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q32, k32, v32, 0.0, True, scale=scale)
    out, lse = out.contiguous(), lse.contiguous()
    out, lse = kernels.inblock_forward(q32, k32, v32, out, lse, starts, size, scale, sizes, **tiling)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=0, atol=2e-6)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g32, q32, k32, v32, out, lse, 0.0, True, scale=scale)
    grads = kernels.inblock_backward(g32, q32, k32, v32, out, lse, *(x.contiguous() for x in grads), starts, size,
                                     scale, sizes, **tiling)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-6)


@pytest.mark.parametrize("per_frame", [7, 150])  # one partial tile; three tiles of 64, the last partial
@pytest.mark.skipif(torch.cuda.is_available(), reason="tests/test_gpu.py runs the compiled kernels")
def test_triton_inblock_kernels_equal_dense_attention(per_frame):
    """The fused CUDA kernels (run by the interpreter) give the dense block-causal output,
    log-sum-exp and gradients, from a causal pass's state, with token-major q/k/v as the
    model's projections lay them out and a padded head dim."""
    kernels = pytest.importorskip("tc_llava.model.block_triton")  # conftest set TRITON_INTERPRET=1
    torch.manual_seed(per_frame)
    frames, length, heads, dim = 2, 2 * per_frame + 40, 2, 24
    frame_ids, _ = layout([5, 30], length, frames=frames, per_frame=per_frame, pad_right=[0, 0])
    dense = block_causal_mask(FrameBlockCausalMask().block_ids(frame_ids))
    starts = torch.tensor([[5, 5 + per_frame], [30, 30 + per_frame]], dtype=torch.int32)
    _check_inblock_kernels(kernels, dense, heads, dim, starts, per_frame)


def test_spans_refuse_layouts_the_decomposition_cannot_take():
    frame_ids, mask = layout([2, 6], 30, frames=2, per_frame=4, pad_right=[0, 0])
    spans = block_spans(frame_ids, mask)
    assert spans.starts.tolist() == [[2, 6], [6, 10]] and spans.size == 4 and spans.sizes is None
    left = mask.clone()
    left[0, 0] = 0
    segmented = block_spans(frame_ids, left)  # left padding: the pads are a segment of their own
    assert segmented.segments.tolist() == [0, 1, 30, 60] and segmented.starts.tolist() == [[2, 6, 36, 40]]
    unequal = frame_ids.clone()
    unequal[0, 9] = -1  # frame 1 of row 0 is one token short: taken, with each block's size
    spans = block_spans(unequal, mask)
    assert spans.size == 4 and spans.sizes.tolist() == [[4, 3], [4, 4]] and spans.segments is None
    split = frame_ids.clone()
    split[1, 7] = -1  # row 1's frame 0 (positions 6-9) is no longer one run
    assert block_spans(split, mask) is None
    assert block_spans(torch.full_like(frame_ids, -1), mask).starts.numel() == 0  # no blocks: causal segments
    twice = torch.full_like(frame_ids, -1)
    twice[:, 2:6], twice[:, 10:14] = 0, 1
    assert block_spans(twice, mask).starts.tolist() == [[2, 10], [2, 10]]
    twice[0, 10:14] = 0  # row 0's block 0 comes back after a gap: one block to the mask, two runs here
    assert block_spans(twice, mask) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks block_merge on a GPU (tests/test_gpu.py)")
def test_auto_is_sdpa_on_cpu():
    assert resolve_attention("auto") == "sdpa"
    assert resolve_attention("flex_attention") == "flex_attention"


def test_block_auto_hands_gpu_training_prefills_the_decomposition_cannot_take_to_flex():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_flex(AUTO, cuda, 2395) and uses_flex(AUTO, cuda, 20000)  # e.g. an fp32 training batch
    assert not uses_flex(AUTO, cuda, 1)  # decoding step: SDPA
    assert not uses_flex(AUTO, cpu, 2395) and not uses_flex(NAME, cuda, 2395)
    with torch.no_grad():  # evaluation: no flex compile or BlockMask per padded width
        assert not uses_flex(AUTO, cuda, 2395)


@pytest.mark.parametrize("rope,rule,pooling", [
    (TADRoPE(gamma=1.0), FrameBlockCausalMask(), None),
    (VideoRoPE(), BidirectionalVisualMask(), None),
    (TADRoPE(gamma=0.5), FrameBlockCausalMask(), VideoPooling([2, 2, 2])),
])
@pytest.mark.parametrize("backend", [NAME, AUTO])
def test_model_loss_and_gradients_equal_sdpa(tiny_llama, rope, rule, pooling, backend):
    """Right-padded training batch: block_merge (and block_auto, which is it on CPU) gives sdpa's loss and gradients."""
    models = {impl: load(tiny_llama, rope, rule, pooling, impl=impl).train() for impl in ("sdpa", backend)}
    ids, mask, pixels = video_batch(models["sdpa"], [(3, 9), (7, 2), (1, 1)], side="right")
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == models["sdpa"].image_token_id, -100)
    losses, grads = {}, {}
    for impl, model in models.items():
        losses[impl] = model(ids, mask, pixels, labels=labels).loss
        losses[impl].backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert losses[backend].item() == pytest.approx(losses["sdpa"].item(), abs=1e-6)
    assert grads[backend].keys() == grads["sdpa"].keys() and len(grads[backend]) > 10
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads[backend][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_generation_equals_sdpa_and_batch_one(tiny_llama, lively):
    """block_merge prefills one prompt (no padding) and a left-padded batch (its segments) with sdpa's logits
    on every real token, and generates sdpa's tokens and each prompt's own tokens at batch size one."""
    rope, rule = TADRoPE(gamma=1.0), FrameBlockCausalMask()
    models = {impl: load(lively, rope, rule, impl=impl) for impl in ("sdpa", NAME)}
    ids, mask, pixels = video_batch(models["sdpa"], [(4, 6), (9, 3), (1, 1)], side="left")
    with torch.no_grad():
        for rows in (slice(1, 2), slice(0, 3)):
            out = {impl: m.generate(ids[rows], mask[rows], pixels[rows], max_new_tokens=6, do_sample=False)
                   for impl, m in models.items()}
            assert torch.equal(out[NAME].sequences, out["sdpa"].sequences)
            single = models[NAME](ids[rows], mask[rows], pixels[rows]).logits
            real = mask[rows].bool()
            torch.testing.assert_close(single[real], models["sdpa"](ids[rows], mask[rows], pixels[rows]).logits[real],
                                       rtol=1e-4, atol=1e-5)
        batched = out[NAME].sequences
        for b in range(3):
            one = models[NAME].generate(ids[b:b + 1, mask[b].bool()], None, pixels[b:b + 1], max_new_tokens=6,
                                        do_sample=False)
            assert torch.equal(one.sequences[0], batched[b])


def test_block_auto_builds_flex_masks_only_for_block_rules(monkeypatch):
    """transformers' own causal-mask call (made while the layers take block_spans, or for a causal
    rule) must not build a BlockMask: that is a compiled create_block_mask per step, for nothing."""
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    import tc_llava.model.attention as backend

    built = []
    monkeypatch.setattr(backend, "uses_flex", lambda *args: True)  # as on a GPU
    monkeypatch.setattr(backend, "flex_attention_mask", lambda *args, **kwargs: built.append(kwargs) or "block mask")
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=16)
    config._attn_implementation = AUTO
    embeds = torch.zeros(2, 12, 64)
    plain = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, **cache_kwargs(None))
    assert plain is None and not built  # SDPA's causal kernel needs no mask
    frame_ids, mask = layout([2, 2], 12, frames=2, per_frame=3, pad_right=[0, 2])
    block = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=mask, block_sequence_ids=frame_ids,
                               **cache_kwargs(None))
    assert block == "block mask" and len(built) == 1


def _merge_inputs(segmented: bool = False, unequal: bool = False):
    """A right-padded batch (one row each), or a left-padded one (segments on one token axis); with ``unequal``
    row 0's first frame is a token short."""
    torch.manual_seed(0)
    frame_ids, mask = layout([3, 11, 0], 64, frames=3, per_frame=5, pad_right=[0, 0, 0])
    if unequal:
        frame_ids[0, 3] = -1
    if segmented:
        frame_ids, mask = frame_ids.roll(7, -1), mask.clone()
        mask[:, :7] = 0
    spans = block_spans(frame_ids, mask)
    assert (spans.segments is not None) == segmented and (spans.sizes is not None) == unequal
    qkv = [torch.randn(3, 64, 4, 16, dtype=torch.float64).transpose(1, 2).requires_grad_() for _ in range(3)]
    return spans, qkv, block_causal_mask(frame_ids, mask) | torch.eye(64, dtype=torch.bool), mask[:, None, :, None]


@pytest.mark.parametrize("unequal", [False, True])
@pytest.mark.parametrize("segmented", [False, True])
def test_block_merge_ops_pass_torch_library_opcheck(segmented, unequal):
    """The custom ops' schemas, fake kernels (shapes, strides, dtypes) and autograd registration, checked by
    torch.library itself against real calls."""
    spans, (q, k, v), _, _ = _merge_inputs(segmented, unequal)
    extra = (spans.segments, spans.max_segment, spans.sizes)
    torch.library.opcheck(block_merge_op, (q, k, v, spans.starts, spans.size, 0.25, *extra))
    out, lse = block_merge_op(q, k, v, spans.starts, spans.size, 0.25, *extra)
    grad = torch.randn_like(out)
    torch.library.opcheck(block_merge_backward_op, (grad, q.detach(), k.detach(), v.detach(), out.detach(),
                                                    lse.detach(), spans.starts, spans.size, 0.25, *extra))


@pytest.mark.parametrize("unequal", [False, True])
@pytest.mark.parametrize("segmented", [False, True])
def test_compiled_block_merge_is_one_graph_around_the_op(segmented, unequal):
    """Under torch.compile the attention is one opaque op in one graph (no break at SDPA's kernel choice), and
    its output and gradients are eager's."""
    spans, (q, k, v), dense, real = _merge_inputs(segmented, unequal)  # padding queries' rows are no one's business
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: block_merge_attention(q, k, v, spans), backend=backend, fullgraph=True)
    out = compiled(q, k, v)
    assert len(graphs) == 1
    assert [n.target for n in graphs[0].graph.nodes if n.op == "call_function"].count(block_merge_op._opoverload) == 1
    ref = sdpa(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out * real, ref * real, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out) * real
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ blocks of different sizes
def frames(row: torch.Tensor, at: int, sizes: list[int], first: int = 0) -> int:
    """Frame ids ``first, first + 1, ...`` of ``sizes`` tokens each, from position ``at``; returns the end."""
    for f, n in enumerate(sizes):
        row[at:at + n] = first + f
        at += n
    return at


def unequal_layout(case: str):
    """``(frame_ids, attention_mask, sample_ids)`` of a layout whose blocks differ in size (fp64 checks).

    - ``image_then_video``: one sample, an image (one frame of 6 tokens) then a video of 3-token frames;
    - ``right_padded``: two samples, 5- and 2-token frames, as many frames each (one row per sample);
    - ``left_padded``: two samples of different frame sizes and counts, left-padded (segments);
    - ``packed``: rows of packed samples mixing an image then a video, videos of two frame sizes and padding;
    - ``single_tokens``: one-token frames beside larger ones;
    - ``block_at_end``: the last frame ends at the row's last position.
    """
    length = 40
    frame_ids, samples = torch.full((2, length), -1), None
    mask = torch.ones(2, length, dtype=torch.long)
    if case == "image_then_video":
        frame_ids = frame_ids[:1]
        frames(frame_ids[0], frames(frame_ids[0], 3, [6]) + 4, [3, 3, 3], first=1)
        mask = mask[:1]
    elif case == "right_padded":
        frames(frame_ids[0], 2, [5, 5, 5])
        frames(frame_ids[1], 4, [2, 2, 2])
        mask[1, 30:] = 0
    elif case == "left_padded":
        frames(frame_ids[0], 12, [4, 4, 4, 4])
        frames(frame_ids[1], 27, [3, 3])
        mask[1, :22] = 0
    elif case == "packed":
        samples = torch.full((2, length), -1)
        samples[0, :18], samples[0, 18:33], samples[1, :26] = 0, 1, 0
        frames(frame_ids[0], frames(frame_ids[0], 2, [5]) + 1, [2, 2, 2], first=1)  # image then video
        frames(frame_ids[0], 20, [4, 4])
        frames(frame_ids[1], 3, [7, 7, 7])
        mask = (samples >= 0).long()
    elif case == "single_tokens":
        frames(frame_ids[0], 1, [1, 1, 4, 1, 3])
        frames(frame_ids[1], 5, [2, 1, 1, 6])
    elif case == "block_at_end":
        frames(frame_ids[0], length - 11, [5, 4, 2])
        frames(frame_ids[1], length - 10, [3, 3, 4])
    else:
        raise ValueError(case)
    return frame_ids, mask, samples


UNEQUAL = ["image_then_video", "right_padded", "left_padded", "packed", "single_tokens", "block_at_end"]


def unequal_reference(case: str, rule=FrameBlockCausalMask()):
    """The layout's block ids and spans, and the dense reference mask (padding queries see themselves)."""
    frame_ids, mask, samples = unequal_layout(case)
    block_ids = rule.block_ids(frame_ids)
    if samples is None:
        dense = frame_block_causal_mask(block_ids, mask)
    else:
        block_ids = sample_block_ids(block_ids, samples)
        dense = block_causal_mask(block_ids, mask, samples)
    spans = block_spans(block_ids, mask, samples)
    return spans, dense | torch.eye(frame_ids.shape[1], dtype=torch.bool), mask.bool()[:, None, :, None]


def assert_equals_dense_sdpa(q, k, v, spans, dense, real, tol: float) -> None:
    """block_merge's outputs and gradients on real queries equal SDPA's with the dense mask."""
    out = block_merge_attention(q, k, v, spans)
    ref = sdpa(q, k, v, attn_mask=dense)
    real = real.expand_as(out)
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=tol)
    weight = torch.randn_like(out) * real
    for got, want in zip(torch.autograd.grad((out * weight).sum(), (q, k, v)),
                         torch.autograd.grad((ref * weight).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=0, atol=tol)


# Bidirectional-visual makes a sample's video one block: videos of different lengths are blocks of different sizes.
@pytest.mark.parametrize("case,rule", [(case, FrameBlockCausalMask()) for case in UNEQUAL] + [
    (case, BidirectionalVisualMask()) for case in ("right_padded", "left_padded", "block_at_end")],
    ids=lambda x: x if isinstance(x, str) else x.name)
def test_unequal_blocks_equal_dense_sdpa(case, rule):
    """Blocks of different sizes, within a sample and across samples, rows and packed samples, take the exact
    decomposition (the spans carry each block's size), on the batch rows or on segments, and give dense SDPA's
    outputs and gradients (fp64)."""
    torch.manual_seed(0)
    spans, dense, real = unequal_reference(case, rule)
    assert spans is not None and spans.sizes is not None and int(spans.sizes.min()) < spans.size
    assert (spans.segments is None) == (case in ("image_then_video", "right_padded", "block_at_end"))
    batch, length = dense.shape[0], dense.shape[-1]
    q, k, v = (torch.randn(batch, length, 2, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()
               for _ in range(3))
    assert_equals_dense_sdpa(q, k, v, spans, dense, real, tol=1e-12)


@pytest.mark.parametrize("case", UNEQUAL)
@pytest.mark.skipif(torch.cuda.is_available(), reason="tests/test_gpu.py runs the compiled kernels")
def test_unequal_blocks_through_the_triton_kernels(monkeypatch, case):
    """The CUDA path's in-block kernels (run by the interpreter) on their variable-length schedule, through
    block_merge's own plumbing (batch rows or segments): dense SDPA's outputs and gradients."""
    import tc_llava.model.block_attention as block_attention

    kernels = pytest.importorskip("tc_llava.model.block_triton")  # conftest set TRITON_INTERPRET=1
    monkeypatch.setattr(block_attention, "_inblock", lambda device: (kernels.inblock_forward, kernels.inblock_backward))
    torch.manual_seed(1)
    spans, dense, real = unequal_reference(case)
    batch, length = dense.shape[0], dense.shape[-1]
    q, k, v = (torch.randn(batch, length, 2, 8).transpose(1, 2).requires_grad_() for _ in range(3))
    assert_equals_dense_sdpa(q, k, v, spans, dense, real, tol=2e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests/test_gpu.py runs the compiled kernels")
def test_triton_varlen_schedule_spans_tiles_of_unequal_blocks():
    """Blocks of 150, 7, 1, 70 and 33 tokens in tiles of 16: several tiles per block, one-token blocks, a
    partial last tile, and programs past the schedule's end; the kernels give the dense output, log-sum-exp
    and gradients from a causal pass's state (interpreter, fp32 against fp64)."""
    kernels = pytest.importorskip("tc_llava.model.block_triton")
    torch.manual_seed(2)
    length, heads, dim, tile = 300, 2, 24, 16
    frame_ids = torch.full((1, length), -1)
    end = frames(frame_ids[0], frames(frame_ids[0], 4, [150, 7, 1]) + 10, [70, 33], first=3)
    spans = block_spans(frame_ids, torch.ones_like(frame_ids))
    assert spans.sizes.tolist() == [[150, 7, 1, 70, 33]] and spans.size == 150 and end == 275
    _check_inblock_kernels(kernels, frame_block_causal_mask(frame_ids), heads, dim, spans.starts, spans.size,
                           spans.sizes, tile=tile)


@pytest.mark.parametrize("case", ["image_then_video", "left_padded", "packed"])
@pytest.mark.parametrize("backend", [NAME, AUTO])
def test_unequal_blocks_get_the_decomposition_not_a_mask(case, backend):
    """What every LLM call of these layouts receives from attention.py: the block layout, no mask."""
    from transformers import LlamaConfig

    from tc_llava.model.attention import llm_attention
    from tc_llava.model.layout import BatchLayout

    config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=16)
    config._attn_implementation = backend
    frame_ids, mask, samples = unequal_layout(case)
    embeds = torch.zeros(*frame_ids.shape, 16, dtype=torch.float64)
    chosen = llm_attention(config, BatchLayout.of(FrameBlockCausalMask(), frame_ids, mask, samples), embeds)
    assert chosen.attention_mask is None and chosen.position_ids is None
    spans = chosen.layer_kwargs["block_spans"]
    assert spans.sizes is not None and len(set(spans.sizes.flatten().tolist())) > 1


def test_model_with_videos_of_different_lengths_takes_the_decomposition(tiny_llama, monkeypatch):
    """Under bidirectional_visual a video is one block, so videos of 4, 1 and 2 frames in one batch are blocks of
    different sizes: every layer takes the decomposition, with sdpa's loss and gradients (fp64)."""
    from tc_llava.model import attention

    calls = []
    merge = attention.block_merge_attention
    monkeypatch.setattr(attention, "block_merge_attention", lambda *a: calls.append(1) or merge(*a))
    losses, grads = {}, {}
    for impl in ("sdpa", NAME):
        model = load(tiny_llama, TADRoPE(), BidirectionalVisualMask(), impl=impl).double().train()
        batch = padded_batch(samples(model)[:3], model.tokenizer.pad_token_id)
        batch["pixel_values"] = batch["pixel_values"].double()
        losses[impl] = model(**batch).loss
        losses[impl].backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == model.config.text_config.num_hidden_layers
    torch.testing.assert_close(losses[NAME], losses["sdpa"], rtol=1e-10, atol=1e-10)
    assert grads[NAME].keys() == grads["sdpa"].keys() and len(grads[NAME]) > 10
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads[NAME][name], grad, rtol=1e-9, atol=1e-10, msg=name)
