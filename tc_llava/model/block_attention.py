"""Block-causal attention at flash speed: causal flash attention plus an in-block term, merged by log-sum-exp.

A block rule lets query ``i`` see keys ``j <= i`` and, inside its block (a frame, or the
whole video), also the keys after it. Those two key sets are disjoint, so softmax attention
over their union is the log-sum-exp merge of two attentions that flash kernels compute
without any mask:

- ``A``: plain causal attention over the whole sequence (the vanilla kernel, same cost);
- ``B``: for every block, each token against the later tokens of its block.

``out = (e^lse_A out_A + e^lse_B out_B) / (e^lse_A + e^lse_B)``. The backward runs ``A``'s
kernel backward with the merged output and log-sum-exp (the split used by ring attention),
then adds ``B``'s gradients, so no ``L x L`` mask or score matrix is ever built. On CUDA,
``B`` is two fused Triton kernels (:mod:`tc_llava.model.block_triton`) that fold it into
``A``'s results in place; elsewhere the blocks are reversed, which makes ``B`` an ordinary
causal attention of all blocks of one size as one batch, and merged with PyTorch ops.
Blocks may differ in size (an image then a video's frames, samples of different
resolutions): the kernels then read each block's start and size from a list, as flash's
variable-length kernel reads ``cu_seqlens``. ``B`` costs about ``n / L`` of ``A`` for
blocks of ``n`` tokens; see ``scripts/bench/inblock.py``. Forward and backward are the
custom ops ``tc_llava::block_merge`` and ``tc_llava::block_merge_backward`` under
``torch.compile``, and an autograd.Function over the same two functions in eager mode.

Packed rows (several samples in one row), left-padded evaluation batches and batches whose
rows hold different numbers of blocks take the same route on one token axis: the rows laid
end to end, ``A`` causal within each *segment* (a sample, a row's real tokens, a row's
padding) on the variable-length (``cu_seqlens``) flash kernel, ``B`` per block as before.
No mask, no per-shape compilation.

The attention backends built on it (``block_merge``, ``block_auto``) and the choice of when it
applies live in :mod:`tc_llava.model.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend


@dataclass(frozen=True)
class BlockSpans:
    """Contiguous blocks: ``starts[b, k]`` (int32) is the first position of block ``k`` of row ``b``.
    Every block has ``size`` tokens, or, where they differ, ``sizes[b, k]`` (int32, the shape of
    ``starts``) and ``size`` is the largest. Built once per forward; every layer reads it.

    With ``segments`` the rows are one token axis (``B * L`` tokens, row after row): ``starts``
    is ``[1, K]`` positions on it, and ``segments`` (int32 ``cu_seqlens``, ``[S + 1]``) cuts it
    into the runs ``A`` is causal within; ``max_segment`` is the longest.
    """

    starts: torch.Tensor
    size: int
    segments: torch.Tensor | None = None
    max_segment: int = 0
    sizes: torch.Tensor | None = None


def flash_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether :func:`block_merge_attention` can run these tensors (CPU: any float; CUDA: fp16/bf16 on sm80+).

    ``dtype`` is what attention computes in: the autocast dtype under mixed precision.
    """
    if device.type == "cpu":
        return True
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
            and head_dim % 8 == 0 and torch.cuda.get_device_capability(device) >= (8, 0))


def block_spans(block_ids: torch.Tensor, attention_mask: torch.Tensor,
                sample_ids: torch.Tensor | None = None) -> BlockSpans | None:
    """The contiguous blocks of ``block_ids`` (-1: none), or None where the decomposition does not apply.

    Rows of right-padded samples with the same number of blocks (keys after a row's end are
    never seen by its real tokens) keep the batch layout. Packed rows (``sample_ids``: -1
    padding, ``k`` the row's k-th sample), left padding, and rows with different block
    counts get segments: each sample, and each run of real or padding tokens, is a segment
    of its own, so no token attends across one. Either way every block must be one run
    inside one segment, with ids rising along the row (an id that comes back after a gap
    would be one block to the mask but two runs here). Blocks of different sizes get
    ``sizes``; blocks of one size leave it None, the faster path. The inputs make one copy to the
    host (a single sync, once per forward), where a few dozen vector ops on a few thousand
    elements cost less than launching them on the GPU; the results go back.
    """
    device = block_ids.device
    real = attention_mask.to(block_ids.dtype)
    doc = real if sample_ids is None else torch.where(real.bool(), sample_ids.to(block_ids.dtype), -1)
    block_ids, real, doc = torch.stack([block_ids, real, doc]).cpu()
    batch, length = block_ids.shape
    segment_start = torch.ones_like(real, dtype=torch.bool)
    segment_start[:, 1:] = doc[:, 1:] != doc[:, :-1]
    in_block = (block_ids >= 0) & real.bool()
    before = nn.functional.pad(block_ids[:, :-1], (1, 0), value=-1)
    run_starts = in_block & ((block_ids != before) | segment_start)
    run = run_starts.long().cumsum(-1) * in_block  # 1-based run of each block token, 0 elsewhere
    sizes = torch.zeros(batch, length + 1, dtype=torch.long)
    sizes = sizes.scatter_add_(1, run, in_block.long())[:, 1:]
    start_ids = torch.where(run_starts, block_ids, -1).cummax(-1).values
    rising = (block_ids > nn.functional.pad(start_ids[:, :-1], (1, 0), value=-1)) | ~run_starts
    if not rising.all():
        return None
    runs, sizes = run_starts.sum(-1), sizes[sizes > 0].to(torch.int32)  # sizes in the blocks' row-major order
    size = int(sizes.max()) if len(sizes) else 0
    unequal = bool((sizes != size).any())
    left_padded = (real[:, 1:].bool() & ~real[:, :-1].bool()).any()
    if sample_ids is None and not left_padded and runs.min() > 0 and (runs == runs[0]).all():
        starts = run_starts.nonzero()[:, 1].view(batch, int(runs[0])).to(torch.int32)
        return BlockSpans(starts.to(device, non_blocking=True), size,
                          sizes=sizes.view(starts.shape).to(device, non_blocking=True) if unequal else None)
    cuts = segment_start.flatten().nonzero()[:, 0]
    segments = torch.cat([cuts, torch.tensor([batch * length])]).to(torch.int32)
    starts = run_starts.flatten().nonzero()[:, 0].to(torch.int32)[None]
    return BlockSpans(starts.to(device, non_blocking=True), size, segments.to(device, non_blocking=True),
                      int((segments[1:] - segments[:-1]).max()),
                      sizes[None].to(device, non_blocking=True) if unequal else None)


# ----------------------------------------------------------------------------- kernels
def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The fused kernel SDPA itself picks for causal attention on these tensors: ``cudnn`` or ``flash``.

    Part ``A`` runs on the same kernel as the vanilla model, so the two differ only by ``B``.
    """
    if not q.is_cuda:
        return "flash"
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True)
    return "cudnn" if choice == SDPBackend.CUDNN_ATTENTION.value else "flash"


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
            kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention ``[B, H, L, D]`` -> output and fp32 log-sum-exp ``[B, H, L]``."""
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    if kernel == "cudnn":
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                           scale=scale)
        return out, lse.view(q.shape[:3])
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[:2]


def _attend_backward(grad, q, k, v, out, lse, scale, kernel) -> tuple[torch.Tensor, ...]:
    """:func:`_attend`'s kernel backward. Without dropout it needs none of the forward's other outputs: there are
    no packed sequences (``cum_seq`` undefined), the lengths are ``L``, and the RNG seed and offset go unread."""
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, True, scale=scale)
    length = q.shape[2]
    if kernel == "cudnn":
        seed = torch.empty((), dtype=torch.long, device=q.device)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse.unsqueeze(-1), seed, seed, None, None, None, length, length, 0.0, True,
            scale=scale)
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, None, None, length, length, 0.0, True, seed, seed[0], scale=scale)


def _attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor, max_segment: int,
                     scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each segment of ``[T, H, D]`` tokens -> output ``[T, H, D]`` and fp32 log-sum-exp
    ``[H, T]``: the variable-length flash kernel on CUDA; on CPU, the CPU flash kernel segment by segment."""
    if q.is_cuda:
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, segments, segments, max_segment, max_segment, 0.0, True, False, scale=scale)
        return out, lse
    outs, lses = [], []
    for a, b in _segment_bounds(segments):
        out, lse = _attend(*(_head_major_segment(x, a, b) for x in (q, k, v)), scale, "flash")
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, 1)


def _attend_segments_backward(grad, q, k, v, out, lse, segments, max_segment, scale) -> tuple[torch.Tensor, ...]:
    """:func:`_attend_segments`'s kernel backward (no dropout: the RNG state goes unread)."""
    if q.is_cuda:
        seed = torch.empty(2, dtype=torch.uint64, device=q.device)
        return torch.ops.aten._flash_attention_backward(
            grad, q, k, v, out, lse, segments, segments, max_segment, max_segment, 0.0, True, seed, seed[:0],
            scale=scale)
    grads = [[], [], []]
    for a, b in _segment_bounds(segments):
        parts = _attend_backward(*(_head_major_segment(x, a, b) for x in (grad, q, k, v, out)),
                                 lse[None, :, a:b].contiguous(), scale, "flash")
        for acc, part in zip(grads, parts):
            acc.append(part[0].transpose(0, 1))
    return tuple(torch.cat(acc) for acc in grads)


def _segment_bounds(segments: torch.Tensor) -> list[tuple[int, int]]:
    bounds = segments.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _head_major_segment(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Tokens ``a:b`` of ``[T, H, D]`` as a ``[1, H, b - a, D]`` view."""
    return x[a:b].transpose(0, 1)[None]


# ----------------------------------------------------------------------------- part B
def _token_major(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, ...]`` -> ``[B*L, H*...]`` rows, a view of ``x`` when its storage is token-major, else a copy."""
    t = x.transpose(1, 2)
    return (t if t.is_contiguous() else t.contiguous()).view(x.shape[0] * x.shape[2], -1)


def _head_major(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_token_major`: ``[B*L, H*...]`` rows as a ``[B, H, L, ...]`` view."""
    return rows.view(shape[0], shape[2], shape[1], *shape[3:]).transpose(1, 2)


def _take(x: torch.Tensor, flat: torch.Tensor, blocks: int) -> torch.Tensor:
    """Rows ``flat`` of ``[B, H, L, ...]`` as a ``[blocks, H, m, ...]`` view of one gathered copy (kernel-ready strides)."""
    rows = _token_major(x).index_select(0, flat)
    return rows.view(blocks, -1, x.shape[1], *x.shape[3:]).transpose(1, 2)


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """``[blocks, H, m, ...]`` -> ``[blocks*m, H, ...]`` (token rows of a per-block result)."""
    return x.transpose(1, 2).flatten(0, 1)


def _reversed_groups(x: torch.Tensor, starts: torch.Tensor, size: int,
                     sizes: torch.Tensor | None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """The blocks of more than one token in groups of one size: each group's block count and the token-row
    indices of its blocks reversed, queries (all but the first token) and keys (all but the last)."""
    flat = (starts.long() + torch.arange(starts.shape[0], device=x.device)[:, None] * x.shape[2]).flatten()
    groups = [(size, flat)] if sizes is None else [(n, flat[sizes.flatten() == n]) for n in sizes.unique().tolist()]
    out = []
    for n, first in groups:
        if n > 1:
            reverse = first[:, None] + torch.arange(n - 1, -1, -1, device=x.device)
            out.append((first.numel(), reverse[:, 1:].flatten(), reverse[:, :-1].flatten()))
    return out


def inblock_forward_torch(q, k, v, out, lse, starts, size, scale, sizes=None):
    """Part ``B`` merged into ``A``'s ``out``/``lse`` with PyTorch ops (the CPU path): for each block size, the
    reversed blocks as one causal flash-attention batch, then the log-sum-exp merge of their rows. Returns the
    merged pair."""
    out_rows, lse_rows = _token_major(out).view(-1, q.shape[1], q.shape[3]), _token_major(lse)
    acc = torch.promote_types(out.dtype, torch.float32)  # merge in fp32 (fp64 stays fp64)
    for blocks, rows, cols in _reversed_groups(q, starts, size, sizes):
        out_b, lse_b = _attend(_take(q, rows, blocks), _take(k, cols, blocks), _take(v, cols, blocks), scale,
                               "flash")
        lse_a, lse_b = lse_rows[rows], _rows_of(lse_b)
        merged_lse = torch.logaddexp(lse_a, lse_b)
        merged = (out_rows[rows].to(acc) * (lse_a - merged_lse).exp().to(acc)[..., None]
                  + _rows_of(out_b).to(acc) * (lse_b - merged_lse).exp().to(acc)[..., None])
        out_rows[rows] = merged.to(out.dtype)
        lse_rows[rows] = merged_lse
    return _head_major(out_rows.flatten(1), out.shape), _head_major(lse_rows, lse.shape).contiguous()


def inblock_backward_torch(grad, q, k, v, out, lse, dq, dk, dv, starts, size, scale, sizes=None):
    """Part ``B``'s gradients (its kernel backward with the merged ``out``/``lse``) added to ``A``'s, with PyTorch ops."""
    full_rows = [_token_major(full) for full in (dq, dk, dv)]
    for blocks, rows, cols in _reversed_groups(q, starts, size, sizes):
        parts = _attend_backward(*(_take(x, rows, blocks) for x in (grad, q)),
                                 *(_take(x, cols, blocks) for x in (k, v)), _take(out, rows, blocks),
                                 _take(lse, rows, blocks).contiguous(), scale, "flash")
        for acc, part, index in zip(full_rows, parts, (rows, cols, cols)):
            acc.index_add_(0, index, _rows_of(part).flatten(1).to(acc.dtype))
    return [_head_major(acc, full.shape) for acc, full in zip(full_rows, (dq, dk, dv))]


def _inblock(device: torch.device):
    """Part ``B``'s forward and backward: the fused Triton kernels on CUDA, PyTorch ops elsewhere."""
    if device.type == "cuda":
        from tc_llava.model.block_triton import inblock_backward, inblock_forward

        return inblock_forward, inblock_backward
    return inblock_forward_torch, inblock_backward_torch


def _strided_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s strides (a copy only where they differ), as the fake kernel promised."""
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)


def _merge_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, size: int,
                   scale: float, segments: torch.Tensor | None = None, max_segment: int = 0,
                   sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` on the whole sequence (or within each segment), then ``B`` merged into its output and log-sum-exp.

    Returns the output token-major (``[B, L, H, D]``, the layout the output projection
    reads) and the log-sum-exp: ``[B, H, L]``, or ``[1, H, B * L]`` with segments.
    """
    if segments is None:
        out, lse = _attend(q, k, v, scale, sdpa_kernel(q, k, v))
        if size > 1 and starts.numel():
            out, lse = _inblock(q.device)[0](q, k, v, out, lse, starts, size, scale, sizes)
        return out.transpose(1, 2).contiguous(), lse.contiguous()
    flat = [_tokens(x) for x in (q, k, v)]
    out, lse = _attend_segments(*flat, segments, max_segment, scale)
    out, lse = _one_row(out), lse[None]
    if size > 1 and starts.numel():
        out, lse = _inblock(q.device)[0](*(_one_row(x) for x in flat), out, lse, starts, size, scale, sizes)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], q.shape[1], q.shape[3]), lse.contiguous()


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B * L, H, D]``, the rows end to end (a view of token-major storage)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _one_row(x: torch.Tensor) -> torch.Tensor:
    """``[T, H, D]`` -> a ``[1, H, T, D]`` view: the token axis as one row for the in-block kernels."""
    return x.transpose(0, 1)[None]


def _merge_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, starts: torch.Tensor, size: int, scale: float,
                    segments: torch.Tensor | None = None, max_segment: int = 0,
                    sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A``'s kernel backward with the merged output and log-sum-exp, then ``B``'s gradients added."""
    grad = grad.to(out.dtype)
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    if segments is None:
        grad, out, kernel = grad.transpose(1, 2), out.transpose(1, 2), sdpa_kernel(q, k, v)
        grads = _attend_backward(grad, q, k, v, out, lse, scale, kernel)
        if size > 1 and starts.numel():
            grads = _inblock(q.device)[1](grad, q, k, v, out, lse, *grads, starts, size, scale, sizes)
    else:
        shape = (q.shape[0], q.shape[2], q.shape[1], q.shape[3])  # [B, L, H, D]
        grad, out = grad.reshape(-1, *shape[2:]), out.reshape(-1, *shape[2:])
        flat = [_tokens(x) for x in (q, k, v)]
        grads = _attend_segments_backward(grad, *flat, out, lse[0], segments, max_segment, scale)
        if size > 1 and starts.numel():
            grads = _inblock(q.device)[1](*(_one_row(x) for x in (grad, *flat, out)), lse,
                                          *(_one_row(g) for g in grads), starts, size, scale, sizes)
            grads = [g[0].transpose(0, 1) for g in grads]
        grads = [g.view(shape).transpose(1, 2) for g in grads]
    return tuple(_strided_like(g, t) for g, t in zip(grads, (q, k, v)))


# Under torch.compile the two halves are custom ops: opaque, so dynamo neither breaks the graph at
# the kernel choice nor lets inductor trace into the Triton kernels. Eager calls the same functions
# through an autograd.Function, which skips the dispatcher's round trip into Python (one measurement
# on the H100's host: 1.3 ms against 1.8 ms for a small fwd+bwd).
block_merge_op = torch.library.custom_op("tc_llava::block_merge", _merge_forward, mutates_args=())
block_merge_backward_op = torch.library.custom_op("tc_llava::block_merge_backward", _merge_backward, mutates_args=())


@block_merge_op.register_fake
def _(q, k, v, starts, size, scale, segments=None, max_segment=0, sizes=None):
    batch, heads, length, dim = q.shape
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    lse_shape = (batch, heads, length) if segments is None else (1, heads, batch * length)
    return q.new_empty(batch, length, heads, dim), q.new_empty(lse_shape, dtype=lse_dtype)


@block_merge_backward_op.register_fake
def _(grad, q, k, v, out, lse, starts, size, scale, segments=None, max_segment=0, sizes=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, starts, size, scale, segments, max_segment, sizes = inputs
    ctx.save_for_backward(q, k, v, *output, starts, segments, sizes)
    ctx.size, ctx.scale, ctx.max_segment = size, scale, max_segment


def _backward_with(merge_backward):
    def backward(ctx, grad, _grad_lse):
        q, k, v, out, lse, starts, segments, sizes = ctx.saved_tensors
        grads = merge_backward(grad, q, k, v, out, lse, starts, ctx.size, ctx.scale, segments, ctx.max_segment, sizes)
        return (*grads, None, None, None, None, None, None)

    return backward


block_merge_op.register_autograd(_backward_with(block_merge_backward_op), setup_context=_setup_context)


class _BlockMerge(torch.autograd.Function):
    forward = staticmethod(_merge_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward_with(_merge_backward))


def block_merge_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: BlockSpans,
                          scale: float | None = None) -> torch.Tensor:
    """Block-causal attention of ``[B, H, L, D]`` tensors (same head count) -> ``[B, H, L, D]`` (a token-major view).

    Part ``A`` runs on the kernel SDPA itself picks for causal attention (cuDNN or flash).
    """
    if spans.size < 2 and spans.segments is None:  # one-token blocks, one sequence per row: plain causal
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    merge = block_merge_op if torch.compiler.is_compiling() else _BlockMerge.apply
    return merge(q, k, v, spans.starts, spans.size, scale, spans.segments, spans.max_segment,
                 spans.sizes)[0].transpose(1, 2)
