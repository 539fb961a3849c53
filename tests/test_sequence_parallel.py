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
from tc_llava.model.rope import TADRoPE, VanillaRoPE
from tc_llava.model.sequence_parallel import SequenceParallel, ulysses_attention

import test_qwen_families as qwen
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


# --------------------------------------------------------------------------- the model
def _batches(model, world: int) -> dict[str, dict]:
    """Five samples of 1, 2 and 4 frames packed into two rows, and as a right-padded batch of mixed frame counts,
    each padded to a length ``world`` divides."""
    pad, items = model.tokenizer.pad_token_id, samples(model)
    packed = padded_to(packed_batch(items, ROWS, pad, pad_between=3), world, pad)
    mixed = padded_to(padded_batch(items, pad) | {"sample_ids": torch.full((5, 1), -1)}, world, pad)
    return {name: b | {"pixel_values": b["pixel_values"].double()} for name, b in
            (("packed", packed), ("mixed frames", mixed | {"sample_ids": None}))}


def _loss_and_grads(model, batch: dict, sp: SequenceParallel | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    model.shard_sequence(sp)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if sp is not None:  # each rank holds its share's part: the group's sum is the batch's gradient
        flat = torch.cat([grad.flatten() for grad in grads.values()])
        dist.all_reduce(flat)
        grads = dict(zip(grads, (part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads.values()]),
                                                                     grads.values()))))
    return loss.detach(), grads


def _cases(model, world: int):
    """(name, batch) of every rope rule, mask rule and batch, with the rules set on ``model``: a LLaVA family's
    packed and mixed-frame batches under every rule; a Qwen-VL family's left-padded batch of images and videos
    under the rope rules defined on its own positions, causal and frame_block_causal."""
    if model.family.multimodal_rope:
        ids, mask, visual, _ = qwen.batch(model)
        extra = -ids.shape[1] % world
        ids = torch.nn.functional.pad(ids, (extra, 0), value=model.tokenizer.pad_token_id)
        mask = torch.nn.functional.pad(mask, (extra, 0))
        pixels = {k: v.double() for k, v in visual.items() if k.startswith("pixel_values")}
        first = mask.bool() & (mask.cumsum(-1) == 1)  # no padding token predicts a row's first token
        labels = torch.where(mask.bool() & ~first, ids, -100)
        batches = {"images and videos": {"input_ids": ids, "attention_mask": mask, "labels": labels, **visual,
                                         **pixels}}
        # bidirectional_visual's one block of a sample's image and video comes back after the text between them:
        # refused under SP (test_sequence_parallel_train)
        ropes, rules = [VanillaRoPE(), TADRoPE()], MASKS[:2]
    else:
        batches, ropes, rules = _batches(model, world), ROPES, MASKS
    for rope in ropes:
        for rule in rules:
            model.rope, model.mask = rope, rule
            for name, batch in batches.items():
                yield f"{model.family.model_type}: {rope.name}, {rule.name}, {name}", batch


def _model_parity(rank: int, world: int, paths: list[str], references: str) -> None:
    sp = SequenceParallel.of()
    expected = torch.load(references)
    for path in paths:
        model = load(path, impl="block_merge").double()
        for case, batch in _cases(model, world):
            where = f"{case}, rank {rank} of {world}"
            ref_loss, ref_grads = expected[case]
            loss, grads = _loss_and_grads(model, batch, sp)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0, msg=where)
            assert grads.keys() == ref_grads.keys() and len(grads) > 10, where
            for key, grad in grads.items():  # to 1e-9 of the largest entry: summation order apart (the vision
                # tower's weights sum over thousands of patches, whose gradients arrive in shares)
                error, scale = (grad - ref_grads[key]).abs().max(), ref_grads[key].abs().max()
                assert error <= 1e-9 * scale + 1e-12, f"{key}: {where}: {error} of {scale}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_gives_the_whole_losses_and_gradients(tiny_llama, tiny_qwen2_5_vl, tmp_path, world):
    """Every rope rule (vanilla, tad, mrope, videorope) and mask rule (causal, frame_block_causal,
    bidirectional_visual), packed rows and a batch of mixed frame counts, and Qwen2.5-VL's left-padded images and
    videos on its own M-RoPE positions (vanilla, tad; causal, frame_block_causal): each of ``world`` ranks reports
    the SP=1 loss (this process, no group), and the ranks' gradients add up to the SP=1 gradients (fp64; the tiny
    models' 2 key/value heads are repeated for 4 shares)."""
    paths, references = [str(tiny_llama), str(tiny_qwen2_5_vl)], {}
    for path in paths:
        model = load(path, impl="block_merge").double()
        references |= {case: _loss_and_grads(model, batch, None) for case, batch in _cases(model, world)}
    torch.save(references, tmp_path / "references.pt")
    spawn(_model_parity, world, paths, str(tmp_path / "references.pt"))


def _attention_reaching_layers(rank: int, world: int, path: str) -> None:
    sp = SequenceParallel.of()
    rule = FrameBlockCausalMask()
    model = load(path, TADRoPE(), rule, impl="block_merge").double()
    batch = _batches(model, world)["packed"]
    original, seen = AttentionInterface._global_mapping["block_merge"], []

    def recorder(module, q, k, v, attention_mask, **kwargs):
        out = original(module, q, k, v, attention_mask, **kwargs)
        if isinstance(module, modeling_llama.LlamaAttention):  # not the vision tower's layers
            seen.append((q, k, v, attention_mask, kwargs, out[0], module.scaling))
        return out

    AttentionInterface._global_mapping["block_merge"] = recorder
    try:
        model.shard_sequence(sp)
        with torch.no_grad():
            model(**batch)
    finally:
        AttentionInterface._global_mapping["block_merge"] = original
    whole, _ = model.batch_layout(batch["input_ids"], batch["attention_mask"], batch["sample_ids"], batch["labels"],
                                  batch["pixel_values"], batch["num_frames"])
    sample_ids = batch["sample_ids"]
    dense = block_causal_mask(sample_block_ids(rule.block_ids(whole.frame_ids), sample_ids), batch["attention_mask"],
                              sample_ids) | torch.eye(whole.length, dtype=torch.bool)
    causal = block_causal_mask(torch.full_like(sample_ids, -1), batch["attention_mask"], sample_ids) \
        | torch.eye(whole.length, dtype=torch.bool)
    real = batch["attention_mask"].bool()[:, None, :, None]
    assert len(seen) == model.config.text_config.num_hidden_layers
    for q, k, v, attention_mask, kwargs, out, scaling in seen:
        assert attention_mask is None and kwargs["sequence_parallel"] is model.sequence_parallel
        assert torch.equal(kwargs["block_spans"].starts, whole.block_spans.starts)
        assert q.shape[2] == whole.length // world  # the layers hold a share; attention sees all of it
        q, k, v = (gathered(x, 2) for x in (q, k, v))
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
        got = gathered(out, 1).transpose(1, 2)
        ref = sdpa(q, k, v, attn_mask=dense, scale=scaling)
        assert (got - ref)[real.expand_as(ref)].abs().max() < 1e-12
        assert (sdpa(q, k, v, attn_mask=causal, scale=scaling) - ref)[real.expand_as(ref)].abs().max() > 1e-6


def _attention(rank: int, world: int, path: str) -> None:
    _core_attention(rank, world)
    _attention_reaching_layers(rank, world, path)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_attention_across_shares_equals_the_dense_reference_mask(tiny_llama, world):
    """The attention of ``world`` shares against dense SDPA under the dense reference mask of masks.py (fp64):

    - random packed and right-padded layouts of every mask rule, samples of different frame sizes and counts: each
      rank's share of q, k, v (4 query heads on 2 key/value heads) through the all-to-all and the decomposition;
      the outputs and the q, k, v gradients gathered over the ranks equal the reference on every real query;
    - what the tiny model's layers attend with (frame_block_causal, packed rows): no mask, the whole rows' block
      spans and the group as layer arguments, and every layer's outputs gathered over the shares equal the reference
      on the gathered q, k, v, and differ from the causal mask's (a parallel mode that turned the mask causal fails).
    """
    spawn(_attention, world, str(tiny_llama))
