"""Sequence parallelism, Ulysses-style, with the frame mask kept exact.

Each rank of a sequence-parallel (SP) group holds a contiguous share of every row's tokens
(:meth:`~tc_llava.model.layout.BatchLayout.shard`, cut from the layout of the whole rows, so
rotary positions, frames, samples and loss targets are those of the whole sequence). The
layers run on the share; attention alone needs the whole sequence, and gets it by an
all-to-all over heads: each rank sends every other rank that rank's heads of its own tokens,
attends with ``heads / sp`` heads over all tokens, and an all-to-all back returns its tokens'
outputs for every head (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv:2309.14509).

The core attention is the exact decomposition of :mod:`tc_llava.model.block_attention` on the
whole rows' block spans, which reach the layers as a keyword argument
(:func:`tc_llava.model.attention.llm_attention`), never as a mask: DeepSpeed 0.19's Ulysses sets
4D masks to None and Accelerate's context parallelism forces ``is_causal``, and either would
train a frame-block rule as a causal one without a word.

Gradients flow back through both all-to-alls (each is its own transpose). A rank's parameter
gradients are then its share's part of the group's gradient; summed over the group (the
data-parallel reduction over all ``dp x sp`` processes does it) they are the whole batch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers.integrations.sdpa_attention import repeat_kv

from tc_llava.model.block_attention import BlockSpans, block_merge_attention


@dataclass(frozen=True)
class SequenceParallel:
    """A sequence-parallel group (None: the default group) and this process's rank and share count in it."""

    group: Any
    rank: int
    size: int

    @classmethod
    def of(cls, group: Any = None) -> "SequenceParallel":
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the group (no gradient: a value every rank shares)."""
        x = x.detach().clone()
        dist.all_reduce(x, group=self.group)
        return x


def degrees(heads: int) -> list[int]:
    """The SP degrees ``heads`` attention heads split into (each rank attends with a whole number of them)."""
    return [n for n in range(1, heads + 1) if heads % n == 0]


def check_heads(heads: int, size: int, key: str = "trainer.sp_size") -> None:
    """Refuse an SP degree that does not divide the attention heads. Fewer key/value heads than the degree
    are repeated to ``lcm(kv_heads, size)`` before the all-to-all, so they restrict nothing."""
    if heads % size:
        raise ValueError(f"{key}={size} does not divide the LLM's {heads} attention heads (each rank attends with "
                         f"heads / sp_size of them): use one of {degrees(heads)}")


class _AllToAll(torch.autograd.Function):
    """Equal chunks of dim 0, chunk ``j`` to rank ``j``; its backward is the same exchange of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)  # contiguous as x now is: the collective writes the chunks one after another
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllToAll.apply(grad, ctx.group), None


def seq_to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """``[B, H, L / sp, D]`` (this rank's tokens, every head) -> ``[B, H / sp, L, D]`` (every token, its heads)."""
    b, h, share, d = x.shape
    chunks = x.reshape(b, sp.size, h // sp.size, share, d).transpose(0, 1)
    out = _AllToAll.apply(chunks, sp.group)  # [source rank = share of the sequence, B, H / sp, L / sp, D]
    return out.permute(1, 2, 0, 3, 4).reshape(b, h // sp.size, sp.size * share, d)


def heads_to_seq(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: ``[B, H / sp, L, D]`` -> ``[B, H, L / sp, D]``."""
    b, h, length, d = x.shape
    share = length // sp.size
    chunks = x.reshape(b, h, sp.size, share, d).permute(2, 0, 1, 3, 4)
    out = _AllToAll.apply(chunks, sp.group)  # [source rank = group of heads, B, H / sp, L / sp, D]
    return out.transpose(0, 1).reshape(b, sp.size * h, share, d)


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: BlockSpans,
                      scaling: float | None, sp: SequenceParallel) -> torch.Tensor:
    """Attention of this rank's share ``[B, H, L / sp, D]`` (keys and values ``[B, H_kv, L / sp, D]``) over the whole
    rows laid out by ``spans`` -> ``[B, L / sp, H, D]`` (the layout the output projection reads).

    Query head ``h`` reads key/value head ``h // (H / H_kv)``; repeating each key/value head to ``lcm(H_kv, sp)``
    keeps that pairing inside every rank's contiguous ``H / sp`` heads."""
    repeat = math.lcm(key.shape[1], sp.size) // key.shape[1]
    key, value = repeat_kv(key, repeat), repeat_kv(value, repeat)
    q, k, v = (seq_to_heads(x, sp) for x in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    out = block_merge_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), spans, scaling)
    return heads_to_seq(out, sp).transpose(1, 2).contiguous()


def reduced_loss(total: torch.Tensor, count: int | torch.Tensor, sp: SequenceParallel,
                 num_items: torch.Tensor | int | None) -> torch.Tensor:
    """The group's mean loss from this rank's summed token losses ``total`` over ``count`` tokens.

    The value is the whole batch's (the sums and, without ``num_items``, the token counts reduced over the
    group), so every rank reports the SP=1 loss; the gradient is this rank's share of it, so the group's
    gradients add up to the SP=1 gradient (a reduced loss differentiated on every rank would count it ``sp``
    times)."""
    denom = num_items if num_items is not None else sp.all_reduce(
        torch.as_tensor(count, device=total.device, dtype=total.dtype)).clamp(min=1)
    denom = torch.as_tensor(denom, device=total.device, dtype=total.dtype)
    local = total / denom
    return local + (sp.all_reduce(total) / denom - local).detach()
