"""Block-causal attention at flash speed: causal flash attention plus an in-block term, merged by log-sum-exp.

A block rule lets query ``i`` see keys ``j <= i`` and, inside its block (a frame, or the
whole video), also the keys after it. Those two key sets are disjoint, so softmax attention
over their union is the log-sum-exp merge of two attentions that flash kernels compute
without any mask:

- ``A``: plain causal attention over the whole sequence (the vanilla kernel, same cost);
- ``B``: for every block of ``n`` tokens, each token against the later tokens of its block.

``out = (e^lse_A out_A + e^lse_B out_B) / (e^lse_A + e^lse_B)``. The backward runs ``A``'s
kernel backward with the merged output and log-sum-exp (the split used by ring attention),
then adds ``B``'s gradients, so no ``L x L`` mask or score matrix is ever built. On CUDA,
``B`` is two fused Triton kernels (:mod:`tc_llava.model.block_triton`) that fold it into
``A``'s results in place; elsewhere the blocks are reversed, which makes ``B`` an ordinary
causal attention of all blocks as one batch, and merged with PyTorch ops. ``B`` costs
about ``n / L`` of ``A``; see ``scripts/bench/inblock.py``.

Two attention backends are registered in transformers' ``AttentionInterface``:

- ``block_merge``: the decomposition wherever it applies; :func:`block_spans` gives the
  layout to the layers as a keyword argument. Where it does not (left padding, a filled KV
  cache, fp32 on CUDA, blocks of unequal size) the model builds transformers' SDPA mask and
  the backend runs plain SDPA.
- ``block_auto``: the fastest path measured on the H100 (README, *Performance*): the
  decomposition wherever it applies; a GPU prefill it cannot take (a left-padded
  evaluation batch) gets flex attention with transformers' BlockMask rather than a dense
  mask; decoding steps SDPA.

``attn_implementation: auto`` picks ``block_auto`` on a GPU with flash attention (sm80+)
and SDPA on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, flex_attention_mask, sdpa_mask

NAME = "block_merge"
AUTO = "block_auto"


@dataclass(frozen=True)
class BlockSpans:
    """Equal-sized contiguous blocks: ``starts[b, k]`` (int32) is the first position of block ``k`` of
    row ``b``, and every block has ``size`` tokens. Built once per forward; every layer reads it."""

    starts: torch.Tensor
    size: int

    @property
    def index(self) -> torch.Tensor:
        """``index[b, k, j]``: sequence position of the ``j``-th token of block ``k`` in row ``b``."""
        return self.starts.long()[..., None] + torch.arange(self.size, device=self.starts.device)


def flash_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether :func:`block_merge_attention` can run these tensors (CPU: any float; CUDA: fp16/bf16 on sm80+).

    ``dtype`` is what attention computes in: the autocast dtype under mixed precision.
    """
    if device.type == "cpu":
        return True
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
            and head_dim % 8 == 0 and torch.cuda.get_device_capability(device) >= (8, 0))


def block_spans(block_ids: torch.Tensor, attention_mask: torch.Tensor) -> BlockSpans | None:
    """The equal-sized contiguous blocks of ``block_ids`` (-1: none), or None where the decomposition does not apply.

    It applies when no row has left padding (keys after a row's end are never seen by its
    real tokens, so right padding is harmless) and every row holds the same number of
    blocks of one size, each one contiguous run of one id.
    """
    real = attention_mask.bool()
    if bool((real[:, 1:] & ~real[:, :-1]).any()):
        return None  # a real token after padding: causal attention would see the pads
    in_block = block_ids >= 0
    counts = in_block.sum(-1)
    total = int(counts[0])
    if total == 0 or bool((counts != total).any()):
        return None
    batch = block_ids.shape[0]
    positions = in_block.nonzero()[:, 1].view(batch, total)
    ids = block_ids.gather(1, positions)
    run_ends = (ids[0, 1:] != ids[0, :-1]) | (positions[0, 1:] != positions[0, :-1] + 1)
    size = int(run_ends.nonzero()[0, 0]) + 1 if bool(run_ends.any()) else total
    if total % size:
        return None
    index, ids = positions.view(batch, -1, size), ids.view(batch, -1, size)
    contiguous = (index[..., 1:] == index[..., :-1] + 1).all() & (ids[..., 1:] == ids[..., :1]).all()
    touching = index[:, 1:, 0] == index[:, :-1, -1] + 1
    distinct = ~(touching & (ids[:, 1:, 0] == ids[:, :-1, 0])).any()
    if not bool(contiguous & distinct):
        return None
    return BlockSpans(index[..., 0].to(torch.int32).contiguous(), size)


# ----------------------------------------------------------------------------- kernels
def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The fused kernel SDPA itself picks for causal attention on these tensors: ``cudnn`` or ``flash``.

    Part ``A`` runs on the same kernel as the vanilla model, so the two differ only by ``B``.
    """
    if not q.is_cuda:
        return "flash"
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True)
    return "cudnn" if choice == SDPBackend.CUDNN_ATTENTION.value else "flash"


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, kernel: str):
    """Causal attention ``[B, H, L, D]`` -> output, fp32 log-sum-exp ``[B, H, L]``, what the backward needs."""
    if not q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return out, lse, None
    if kernel == "cudnn":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False, scale=scale)
        return out, lse.view(q.shape[:3]), (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False, scale=scale)
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _attend_backward(grad, q, k, v, out, lse, scale, kernel, aux):
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, True, scale=scale)
    cum_q, cum_k, max_q, max_k, seed, offset = aux
    if kernel == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True,
            scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale)


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


def _reversed_rows(x: torch.Tensor, starts: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-row indices of every block reversed: its queries (all but the first token) and keys (all but the last)."""
    offsets = torch.arange(starts.shape[0], device=x.device)[:, None, None] * x.shape[2]
    reverse = starts[..., None] + offsets + torch.arange(size - 1, -1, -1, device=x.device)
    return reverse[..., 1:].flatten(), reverse[..., :-1].flatten()


def inblock_forward_torch(q, k, v, out, lse, starts, size, scale):
    """Part ``B`` merged into ``A``'s ``out``/``lse`` with PyTorch ops (the CPU path): the reversed blocks as one
    causal flash-attention batch, then the log-sum-exp merge of their rows. Returns the merged pair."""
    rows, cols = _reversed_rows(q, starts, size)
    blocks = starts.numel()
    out_b, lse_b, _ = _attend(_take(q, rows, blocks), _take(k, cols, blocks), _take(v, cols, blocks), scale, "flash")
    out_rows, lse_rows = _token_major(out).view(-1, q.shape[1], q.shape[3]), _token_major(lse)
    lse_a, lse_b = lse_rows[rows], _rows_of(lse_b)
    merged_lse = torch.logaddexp(lse_a, lse_b)
    acc = torch.promote_types(out.dtype, torch.float32)  # merge in fp32 (fp64 stays fp64)
    merged = (out_rows[rows].to(acc) * (lse_a - merged_lse).exp().to(acc)[..., None]
              + _rows_of(out_b).to(acc) * (lse_b - merged_lse).exp().to(acc)[..., None])
    out_rows[rows] = merged.to(out.dtype)
    lse_rows[rows] = merged_lse
    return _head_major(out_rows.flatten(1), out.shape), _head_major(lse_rows, lse.shape).contiguous()


def inblock_backward_torch(grad, q, k, v, out, lse, dq, dk, dv, starts, size, scale):
    """Part ``B``'s gradients (its kernel backward with the merged ``out``/``lse``) added to ``A``'s, with PyTorch ops."""
    rows, cols = _reversed_rows(q, starts, size)
    n = starts.numel()
    parts = _attend_backward(_take(grad, rows, n), _take(q, rows, n), _take(k, cols, n), _take(v, cols, n),
                             _take(out, rows, n), _take(lse, rows, n).contiguous(), scale, "flash", None)
    grads = []
    for full, part, index in zip((dq, dk, dv), parts, (rows, cols, cols)):
        full_rows = _token_major(full)
        full_rows.index_add_(0, index, _rows_of(part).flatten(1).to(full.dtype))
        grads.append(_head_major(full_rows, full.shape))
    return grads


def _inblock(device: torch.device):
    """Part ``B``'s forward and backward: the fused Triton kernels on CUDA, PyTorch ops elsewhere."""
    if device.type == "cuda":
        from tc_llava.model.block_triton import inblock_backward, inblock_forward

        return inblock_forward, inblock_backward
    return inblock_forward_torch, inblock_backward_torch


class _BlockMergeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, starts, size, scale, kernel):
        """``A`` on the whole sequence, then ``B`` merged into its output and log-sum-exp."""
        out, lse, aux = _attend(q, k, v, scale, kernel)
        out, lse = _inblock(q.device)[0](q, k, v, out, lse, starts, size, scale)
        ctx.save_for_backward(q, k, v, out, lse, starts)
        ctx.size, ctx.scale, ctx.kernel, ctx.aux = size, scale, kernel, aux
        return out

    @staticmethod
    def backward(ctx, grad):
        """``A``'s kernel backward with the merged output and log-sum-exp, then ``B``'s gradients added."""
        q, k, v, out, lse, starts = ctx.saved_tensors
        grad = grad.to(out.dtype)
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        dq, dk, dv = _attend_backward(grad, q, k, v, out, lse, ctx.scale, ctx.kernel, ctx.aux)
        dq, dk, dv = _inblock(q.device)[1](grad, q, k, v, out, lse, dq, dk, dv, starts, ctx.size, ctx.scale)
        return dq, dk, dv, None, None, None, None


def block_merge_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: BlockSpans,
                          scale: float | None = None, kernel: str | None = None) -> torch.Tensor:
    """Block-causal attention of ``[B, H, L, D]`` tensors (same head count) -> ``[B, H, L, D]``.

    ``kernel`` (``flash`` or ``cudnn`` on CUDA) defaults to the one SDPA picks for causal attention.
    """
    if spans.size < 2:  # one-token blocks: the rule is plain causal
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _BlockMergeAttention.apply(q, k, v, spans.starts, spans.size, scale, kernel or sdpa_kernel(q, k, v))


def uses_flex(attn_implementation: str, device: torch.device, q_length: int) -> bool:
    """Whether ``block_auto`` builds flex's BlockMask for a call the decomposition did not take: a GPU prefill."""
    return attn_implementation == AUTO and device.type == "cuda" and q_length > 1


def _block_mask(*args: Any, **kwargs: Any):
    """Mask interface of both backends: flex's BlockMask where ``block_auto`` uses flex for a block rule,
    else SDPA's mask.

    A plain causal request (a causal rule, or transformers' own call while the layers take
    ``block_spans``) gets SDPA's, which is no mask at all where SDPA's causal kernel applies.
    """
    q_length = kwargs["q_length"] if "q_length" in kwargs else len(kwargs["cache_position"])
    config = kwargs.get("config")
    impl = config._attn_implementation if config is not None else NAME
    block_rule = kwargs.get("mask_function") is not causal_mask_function
    if block_rule and uses_flex(impl, torch.device(kwargs.get("device") or "cpu"), q_length):
        return flex_attention_mask(*args, **kwargs)
    return sdpa_mask(*args, **kwargs)


def block_merge_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
    block_spans: BlockSpans | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function: the decomposition with ``block_spans``, flex with a
    BlockMask, else SDPA with HF's mask."""
    if block_spans is None and not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as SDPA does under autocast (HF's rotary leaves q, k in fp32)
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if block_spans is None:
        return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(f"{NAME} attention has no dropout; got attention dropout {dropout}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"{NAME}: block_spans need a prefill without cached keys (q {query.shape[2]}, kv {key.shape[2]})")
    groups = query.shape[1] // key.shape[1]
    out = block_merge_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), block_spans, scaling)
    return out.transpose(1, 2).contiguous(), None


def resolve_attention(name: str) -> str:
    """``auto`` -> ``block_auto`` on a GPU with flash attention, else ``sdpa``; other names unchanged."""
    if name != "auto":
        return name
    gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    return AUTO if gpu else "sdpa"


for _name in (NAME, AUTO):
    AttentionInterface.register(_name, block_merge_attention_forward)
    AttentionMaskInterface.register(_name, _block_mask)
