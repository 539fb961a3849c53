"""Sequence parallelism over real processes (gloo): every share of the sequence attends exactly as the whole does.

Each test spawns ``world`` processes forming one SP group. The reference is things we did not
write: the same model without sequence parallelism (SP=1, whose packed and frame-mask attention
tests/test_packed.py checks against HF and the dense mask), and dense SDPA under the dense
reference mask of :func:`tc_llava.model.masks.block_causal_mask`.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.functional import scaled_dot_product_attention as sdpa
from transformers import AttentionInterface, Qwen2Config
from transformers.models.llama import modeling_llama

from tc_llava.model.attention import check_sequence_parallel
from tc_llava.model.block_attention import block_spans
from tc_llava.model.layout import BatchLayout
from tc_llava.model.masks import CausalMask, FrameBlockCausalMask, block_causal_mask, sample_block_ids
from tc_llava.model.sequence_parallel import SequenceParallel, ulysses_attention

from conftest import free_port
from test_layout import padded_to
from test_model import load
from test_packed import MASKS, ROPES, ROWS, packed_batch, padded_batch, random_layout, samples


def spawn(fn, world: int, *args) -> None:
    """``fn(rank, world, *args)`` in ``world`` fresh processes joined in one gloo group; a failure in any is raised
    here with its traceback."""
    mp.spawn(_run, args=(fn, world, free_port(), *args), nprocs=world, join=True)


def _run(rank: int, fn, world: int, port: int, *args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def gathered(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's ``x`` laid end to end along ``dim``, in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim)


# --------------------------------------------------------------------------- the core attention
def _core_attention(rank: int, world: int) -> None:
    import random

    sp = SequenceParallel.of()
    rng = random.Random(0)
    length, share = 12 * world, slice(rank * 12, (rank + 1) * 12)
    for packed in (True, False):
        for rule in MASKS:
            frames, sample_ids = random_layout(rng, 2, length, (1, 2, 3), packed=packed, left=False)
            mask = (sample_ids >= 0).long()
            blocks = sample_block_ids(rule.block_ids(frames), sample_ids)
            spans = block_spans(blocks, mask, sample_ids if packed else None)
            g = torch.Generator().manual_seed(1)
            q, k, v = (torch.randn(2, h, length, 8, generator=g, dtype=torch.float64, requires_grad=True)
                       for h in (4, 2, 2))  # 4 query heads on 2 key/value heads: repeated for 4 shares
            real = mask.bool()[:, None, :, None]
            weight = torch.randn(2, 4, length, 8, generator=g, dtype=torch.float64) * real
            mine = [x.detach()[:, :, share].requires_grad_() for x in (q, k, v)]
            out = ulysses_attention(*mine, spans, None, sp)  # [B, L / sp, H, D]
            grads = torch.autograd.grad((out.transpose(1, 2) * weight[:, :, share]).sum(), mine)

            dense = block_causal_mask(blocks, mask, sample_ids) | torch.eye(length, dtype=torch.bool)
            ref = sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=dense)
            refs = torch.autograd.grad((ref * weight).sum(), (q, k, v))
            where = f"{rule.name}, {'packed' if packed else 'padded'}, rank {rank}"
            got = gathered(out.transpose(1, 2), 2)
            assert (got - ref)[real.expand_as(ref)].abs().max() < 1e-12, where
            for name, grad, want in zip("qkv", grads, refs):
                torch.testing.assert_close(gathered(grad, 2), want, rtol=1e-10, atol=1e-12, msg=f"d{name}: {where}")
            if not isinstance(rule, CausalMask):  # the rule is not causal here: a causal core would fail above
                causal = sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                              attn_mask=block_causal_mask(torch.full_like(blocks, -1), mask, sample_ids)
                              | torch.eye(length, dtype=torch.bool))
                assert (causal - ref)[real.expand_as(ref)].abs().max() > 1e-3, where


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_equals_the_dense_reference_mask(world):
    """Random packed and right-padded layouts of every mask rule, samples of different frame sizes and counts: each
    rank's share of q, k, v through the all-to-all and the decomposition; the outputs and the q, k, v gradients
    gathered over the ranks equal dense SDPA under the dense reference mask (fp64), on every real query."""
    spawn(_core_attention, world)
