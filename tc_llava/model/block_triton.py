"""Triton kernels for ``block_merge``'s in-block term, fused with the log-sum-exp merge.

Part ``B`` of the decomposition (each token against the later tokens of its block) is a
small attention per block. Done with the library's causal kernel it needs the block's rows
gathered in reverse order, a merge and, in the backward, scatter-adds: some twenty
memory-bound passes that cost more than ``B``'s arithmetic. These kernels read ``q``,
``k``, ``v`` in place and fold ``B`` straight into ``A``'s output and log-sum-exp (the
online softmax starts from ``A``'s state), and the backward adds ``B``'s gradients into
``A``'s in place: one launch each way. A program owns one tile of one block and head (in
the backward, the tile's keys or its queries), so no two programs write the same element.

Blocks of one size get a ``(tile, block, head)`` grid. Blocks of different sizes (an image
then a video's frames, samples of different resolutions) get a variable-length schedule,
as flash's ``cu_seqlens`` kernels do: each block's size is read from ``sizes``, and the
programs of axis 0 are the blocks' tiles laid end to end (``first[b]`` is block ``b``'s
first program, ``block_of[p]`` program ``p``'s block), so no program is spent on the tiles a
small block lacks; the few at the end beyond the last tile do nothing.

Tensors are ``[B, H, L, D]`` with any batch/head/token strides and a contiguous last dim;
the log-sum-exp is fp32 ``[B, H, L]`` in natural-log units, as the flash and cuDNN kernels
return it. On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), which
is how the CPU tests check them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(math.log(2))
# Queries and keys per tile (a 144-token frame is three), warps and software-pipeline stages:
# the fastest on the H100 of those scripts/bench/inblock.py times. The loops run one to
# three tiles, so the backward gains nothing from prefetching and loses occupancy to it.
TILE = 64
WARPS = 4
FORWARD_STAGES = 3
BACKWARD_STAGES = 1


@triton.jit
def _program_block(STARTS, SIZES, FIRST, BLOCK_OF, n, VARLEN: tl.constexpr):
    """This program's block, its first position and size, and the program's index among the block's."""
    if VARLEN:
        block = tl.load(BLOCK_OF + tl.program_id(0))
        program = tl.program_id(0) - tl.load(FIRST + block)
        n = tl.load(SIZES + block)
    else:
        block, program = tl.program_id(1), tl.program_id(0)
    return block, tl.load(STARTS + block), n, program


@triton.jit
def _inblock_forward(Q, K, V, O, LSE, STARTS, SIZES, FIRST, BLOCK_OF, n, blocks_per_row, scale_log2,
                     sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l, sl_b, sl_h, sl_l,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, VARLEN: tl.constexpr):
    block, start, n, tile = _program_block(STARTS, SIZES, FIRST, BLOCK_OF, n, VARLEN)
    row, head = block // blocks_per_row, tl.program_id(2)
    scale_log2 = tl.cast(scale_log2, tl.float32)  # torch.compile may hand Python floats over as fp64
    i = tile * TILE + tl.arange(0, TILE)
    d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = i < n, d < D
    q = tl.load(Q + row * sq_b + head * sq_h + (start + i)[:, None] * sq_l + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    out = O + row * so_b + head * so_h + (start + i)[:, None] * so_l + d[None, :]
    lse = LSE + row * sl_b + head * sl_h + (start + i) * sl_l
    # Online softmax resumed from A's state: running max = A's lse, running sum = 1.
    acc = tl.load(out, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    m = tl.load(lse, mask=row_ok, other=0.0) * _LOG2E
    total = tl.full([TILE], 1.0, tl.float32)
    for j0 in range(tile * TILE, n, TILE):  # keys after the tile's first query
        j = j0 + tl.arange(0, TILE)
        col_ok = j < n
        k = tl.load(K + row * sk_b + head * sk_h + (start + j)[:, None] * sk_l + d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + row * sv_b + head * sv_h + (start + j)[:, None] * sv_l + d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where((j[None, :] > i[:, None]) & col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    tl.store(out, (acc / total[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse, (m + tl.log2(total)) * _LN2, mask=row_ok)


@triton.jit
def _query_rows(Q, DO, O, LSE, start, i, i_ok, d, d_ok, sq_l, sg_l, so_l, sl_l):
    """Queries ``i`` of a block: ``q``, ``do``, the merged log-sum-exp (log2 units) and ``delta = rowsum(do * o)``."""
    mask = i_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + (start + i)[:, None] * sq_l + d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + (start + i)[:, None] * sg_l + d[None, :], mask=mask, other=0.0)
    o = tl.load(O + (start + i)[:, None] * so_l + d[None, :], mask=mask, other=0.0)
    m = tl.load(LSE + (start + i) * sl_l, mask=i_ok, other=0.0) * _LOG2E
    return q, do, m, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)


@triton.jit
def _add_into(ptr, value, mask):
    tl.store(ptr, (tl.load(ptr, mask=mask, other=0.0).to(tl.float32) + value).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inblock_backward(Q, K, V, O, DO, LSE, DQ, DK, DV, STARTS, SIZES, FIRST, BLOCK_OF, n, blocks_per_row, scale,
                      scale_log2, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l,
                      sg_b, sg_h, sg_l, sl_b, sl_h, sl_l, sdq_b, sdq_h, sdq_l, sdk_b, sdk_h, sdk_l,
                      sdv_b, sdv_h, sdv_l, D: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
                      VARLEN: tl.constexpr):
    """Program ``t`` of a block's ``2T``: ``dk``, ``dv`` of key tile ``t`` (over earlier queries); program ``T + t``:
    ``dq`` of query tile ``t`` (over later keys). Two roles rather than one program doing both: twice the
    programs, each holding half the accumulators. A program past ``2T`` (the schedule's tail) owns no token."""
    block, start, n, program = _program_block(STARTS, SIZES, FIRST, BLOCK_OF, n, VARLEN)
    row, head = block // blocks_per_row, tl.program_id(2)
    scale, scale_log2 = tl.cast(scale, tl.float32), tl.cast(scale_log2, tl.float32)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    Q, K, V = Q + row * sq_b + head * sq_h, K + row * sk_b + head * sk_h, V + row * sv_b + head * sv_h
    O, DO, LSE = O + row * so_b + head * so_h, DO + row * sg_b + head * sg_h, LSE + row * sl_b + head * sl_h
    tiles = tl.cdiv(n, TILE)
    own = tl.where(program < tiles, program, program - tiles) * TILE + tl.arange(0, TILE)
    own_ok = own < n
    own_mask = own_ok[:, None] & d_ok[None, :]
    if program < tiles:  # keys ``own`` against the queries before the tile's last key
        k = tl.load(K + (start + own)[:, None] * sk_l + d[None, :], mask=own_mask, other=0.0)
        v = tl.load(V + (start + own)[:, None] * sv_l + d[None, :], mask=own_mask, other=0.0)
        dk = tl.zeros([TILE, BLOCK_D], tl.float32)
        dv = tl.zeros([TILE, BLOCK_D], tl.float32)
        for i0 in range(0, tl.minimum(n, (program + 1) * TILE), TILE):
            i = i0 + tl.arange(0, TILE)
            q, do, m, delta = _query_rows(Q, DO, O, LSE, start, i, i < n, d, d_ok, sq_l, sg_l, so_l, sl_l)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            p = tl.where((own[None, :] > i[:, None]) & own_ok[None, :] & (i < n)[:, None], tl.exp2(s - m[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            ds = p * (tl.dot(do, tl.trans(v)).to(tl.float32) - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        _add_into(DK + row * sdk_b + head * sdk_h + (start + own)[:, None] * sdk_l + d[None, :], dk * scale, own_mask)
        _add_into(DV + row * sdv_b + head * sdv_h + (start + own)[:, None] * sdv_l + d[None, :], dv, own_mask)
    else:  # queries ``own`` against the keys after the tile's first query
        q, do, m, delta = _query_rows(Q, DO, O, LSE, start, own, own_ok, d, d_ok, sq_l, sg_l, so_l, sl_l)
        dq = tl.zeros([TILE, BLOCK_D], tl.float32)
        for j0 in range((program - tiles) * TILE, n, TILE):
            j = j0 + tl.arange(0, TILE)
            mask = (j < n)[:, None] & d_ok[None, :]
            k = tl.load(K + (start + j)[:, None] * sk_l + d[None, :], mask=mask, other=0.0)
            v = tl.load(V + (start + j)[:, None] * sv_l + d[None, :], mask=mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            p = tl.where((j[None, :] > own[:, None]) & (j < n)[None, :] & own_ok[:, None], tl.exp2(s - m[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(v)).to(tl.float32) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        _add_into(DQ + row * sdq_b + head * sdq_h + (start + own)[:, None] * sdq_l + d[None, :], dq * scale, own_mask)


def _strides(*tensors: torch.Tensor) -> list[int]:
    """Batch, head and token strides of ``[B, H, L, ...]`` tensors, in order (the last dim must be contiguous)."""
    for t in tensors:
        if t.dim() == 4 and t.stride(-1) != 1:
            raise ValueError(f"in-block kernels need a contiguous head dim; got strides {t.stride()}")
    return [s for t in tensors for s in t.stride()[:3]]


def _launch(q: torch.Tensor, starts: torch.Tensor, size: int, sizes: torch.Tensor | None, tile: int, warps: int,
            stages: int, roles: int = 1) -> tuple[tuple, tuple, dict]:
    """Grid, schedule tensors (``sizes``, ``first``, ``block_of``) and meta-parameters of one launch.

    Blocks of one size: ``roles * T`` programs per block on axis 0. Blocks of different sizes: each
    block's ``roles * cdiv(size, tile)`` programs end to end on axis 0, mapped to blocks by device ops
    (no sync); the grid is a bound on their total from the shapes alone (the longest block's count per
    block, or the token count's), and the programs past the total fall on the last block beyond its tiles.
    """
    head_dim = q.shape[-1]
    meta = dict(D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), TILE=tile, num_warps=warps,
                num_stages=stages, VARLEN=sizes is not None)
    blocks = starts.numel()
    if sizes is None:
        return (roles * triton.cdiv(size, tile), blocks, q.shape[1]), (starts, starts, starts), meta
    programs = roles * ((sizes.flatten() + tile - 1) // tile)
    ends = programs.cumsum(0, dtype=torch.int32)
    bound = roles * min(blocks * triton.cdiv(size, tile), triton.cdiv(q.shape[0] * q.shape[2], tile) + blocks)
    program = torch.arange(bound, dtype=torch.int32, device=q.device)
    block_of = torch.searchsorted(ends, program, right=True, out_int32=True).clamp_(max=blocks - 1)
    return (bound, 1, q.shape[1]), (sizes, ends - programs, block_of), meta


def inblock_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    starts: torch.Tensor, size: int, scale: float, sizes: torch.Tensor | None = None,
                    tile: int = TILE, warps: int = WARPS,
                    stages: int = FORWARD_STAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: ``out``/``lse`` (part ``A``'s) become the merge with the in-block term; returns them.

    ``starts[b, k]`` is the first position of block ``k`` of row ``b``; every block has ``size`` tokens,
    or, where ``sizes`` (int32, the shape of ``starts``) is given, ``sizes[b, k]`` of at most ``size``.
    """
    grid, schedule, meta = _launch(q, starts, size, sizes, tile, warps, stages)
    _inblock_forward[grid](q, k, v, out, lse, starts, *schedule, size, starts.shape[1], scale * LOG2E,
                           *_strides(q, k, v, out, lse), **meta)
    return out, lse


def inblock_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                     starts: torch.Tensor, size: int, scale: float, sizes: torch.Tensor | None = None,
                     tile: int = TILE, warps: int = WARPS,
                     stages: int = BACKWARD_STAGES) -> tuple[torch.Tensor, ...]:
    """In place: ``dq``, ``dk``, ``dv`` (part ``A``'s, from the merged ``out``/``lse``) gain the in-block term's
    gradients; returns them. ``starts``, ``size`` and ``sizes`` as in :func:`inblock_forward`."""
    grid, schedule, meta = _launch(q, starts, size, sizes, tile, warps, stages, roles=2)
    _inblock_backward[grid](q, k, v, out, grad, lse, dq, dk, dv, starts, *schedule, size, starts.shape[1], scale,
                            scale * LOG2E, *_strides(q, k, v, out, grad, lse, dq, dk, dv), **meta)
    return dq, dk, dv
