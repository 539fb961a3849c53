"""Packed rows (several samples per row): each sample gets exactly what it gets alone.

Checked against things we did not write: the same samples unpacked (each alone, and as an
ordinary right-padded batch through HF's SDPA), and the dense document- and block-causal
reference mask. The ``block_merge`` decomposition's variable-length segments (packed rows,
left padding, mixed block counts) are checked against dense SDPA on random layouts.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from tc_llava.model.block_attention import block_merge_attention, block_spans
from tc_llava.model.layout import PackedSamples
from tc_llava.model.masks import (
    BidirectionalVisualMask, CausalMask, FrameBlockCausalMask, block_causal_mask, sample_block_ids,
)
from tc_llava.model.rope import MRoPE, TADRoPE, VanillaRoPE, VideoRoPE

from test_model import load, record_masks

ROPES = [VanillaRoPE(), TADRoPE(gamma=1.0), MRoPE(), VideoRoPE()]
MASKS = [CausalMask(), FrameBlockCausalMask(), BidirectionalVisualMask()]
ROWS = [[0, 1], [2, 3, 4]]  # samples per packed row


def samples(model, seed: int = 0) -> list[dict]:
    """Five samples of different frame counts and text lengths, each with a video and labels on its answer."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    out = []
    for frames, before, after in [(4, 3, 6), (1, 5, 2), (2, 0, 9), (4, 7, 3), (1, 2, 4)]:
        text = torch.randint(10, vocab, (before + after,), generator=g)
        ids = torch.cat([text[:before], torch.full((model.tokens_per_video(frames),), model.image_token_id),
                         text[before:]])
        labels = torch.full_like(ids, -100)
        labels[-after:] = ids[-after:]
        out.append({"input_ids": ids, "labels": labels, "frames": torch.randn(frames, 3, 56, 56, generator=g)})
    return out


def packed_batch(items: list[dict], rows: list[list[int]], pad_id: int, pad_between: int = 0) -> dict:
    """``rows`` of samples laid end to end, right-padded (``pad_between`` pads after each row's first sample)."""
    seqs, sample_rows = [], []
    for row in rows:
        ids, sid = [], []
        for k, i in enumerate(row):
            ids.append(items[i]["input_ids"])
            sid.append(torch.full_like(items[i]["input_ids"], k))
            if k == 0 and pad_between:
                ids.append(torch.full((pad_between,), pad_id))
                sid.append(torch.full((pad_between,), -1))
        seqs.append((torch.cat(ids), torch.cat(sid)))
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(rows), width), pad_id)
    sample_ids = torch.full((len(rows), width), -1)
    labels = torch.full((len(rows), width), -100)
    for r, ((ids, sid), row) in enumerate(zip(seqs, rows)):
        input_ids[r, :len(ids)], sample_ids[r, :len(ids)] = ids, sid
        labels[r, :len(ids)] = torch.where(sid >= 0, 0, -100)
    flat_labels = torch.cat([items[i]["labels"] for row in rows for i in row])
    labels[sample_ids >= 0] = flat_labels
    order = [i for row in rows for i in row]
    return {"input_ids": input_ids, "attention_mask": (sample_ids >= 0).long(), "labels": labels,
            "sample_ids": sample_ids, "pixel_values": torch.cat([items[i]["frames"] for i in order]),
            "num_frames": torch.tensor([len(items[i]["frames"]) for i in order])}


def padded_batch(items: list[dict], pad_id: int) -> dict:
    """The same samples as an ordinary right-padded batch, one per row."""
    return packed_batch(items, [[i] for i in range(len(items))], pad_id) | {"sample_ids": None}


@pytest.mark.parametrize("impl", ["sdpa", "block_merge"])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.name)
@pytest.mark.parametrize("rope", ROPES, ids=lambda r: r.name)
def test_packed_rows_equal_the_samples_unpacked(tiny_llama, rope, mask, impl):
    """Per-sample logits and rotary positions equal each sample's alone; the packed loss and its gradients
    equal the right-padded batch's (fp64)."""
    model = load(tiny_llama, rope, mask, impl=impl).double()
    items = samples(model)
    pad = model.tokenizer.pad_token_id
    packed = packed_batch(items, ROWS, pad, pad_between=3)
    packed["pixel_values"] = packed["pixel_values"].double()
    with torch.no_grad():
        out = model(**{k: v for k, v in packed.items() if k != "labels"})
    layout = PackedSamples(packed["sample_ids"])
    logits = out.logits.flatten(0, 1)[layout.index]  # [S, L_max, V]
    positions = layout.unpack(out.rope_positions) if out.rope_positions.ndim == 2 else torch.stack(
        [layout.unpack(p) for p in out.rope_positions])
    order = [i for row in ROWS for i in row]
    for s, i in enumerate(order):
        n = len(items[i]["input_ids"])
        with torch.no_grad():
            alone = model(items[i]["input_ids"][None], pixel_values=items[i]["frames"][None].double())
        torch.testing.assert_close(logits[s, :n], alone.logits[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(positions[..., s, :n], alone.rope_positions[..., 0, :])

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**{k: v.double() if k == "pixel_values" else v for k, v in batch.items()}).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed_loss, packed_grads = loss_and_grads(packed)
    padded_loss, padded_grads = loss_and_grads(padded_batch(items, pad))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-10, atol=1e-10)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("mask", MASKS[1:], ids=lambda m: m.name)
def test_packed_mask_reaching_attention_equals_dense_reference(tiny_llama, monkeypatch, mask):
    """No token of a packed row attends across samples; inside a sample the rule holds."""
    model = load(tiny_llama, TADRoPE(), mask)
    packed = packed_batch(samples(model, seed=1), ROWS, model.tokenizer.pad_token_id)
    seen = record_masks(monkeypatch, "sdpa")
    with torch.no_grad():
        out = model(**{k: v for k, v in packed.items() if k != "labels"})
    sample_ids = packed["sample_ids"]
    reference = block_causal_mask(sample_block_ids(mask.block_ids(out.frame_ids), sample_ids),
                                  packed["attention_mask"], sample_ids)
    real_q = (sample_ids >= 0)[:, None, :, None].expand_as(reference)
    assert len(seen) == model.config.text_config.num_hidden_layers
    for got in seen:
        assert torch.equal(got.expand_as(reference)[real_q], reference[real_q])
    across = (sample_ids[:, :, None] != sample_ids[:, None, :])[:, None] & real_q
    assert across.any() and not reference[across].any()


def random_layout(rng: random.Random, rows: int, length: int, per_frame: tuple[int, ...], packed: bool, left: bool,
                  frame_counts: tuple[int, ...] = (0, 1, 2, 3)):
    """Rows of samples (text, a video of one of ``frame_counts`` frames of one of ``per_frame`` tokens each, text),
    packed several per row or one per row, padded on the left or right."""
    block_ids = torch.full((rows, length), -1)
    sample_ids = torch.full((rows, length), -1)
    for r in range(rows):
        row, k = [], 0
        while True:
            frames, tokens = rng.choice(frame_counts), rng.choice(per_frame)
            sample = [-1] * rng.randint(1, 5) + [f for f in range(frames) for _ in range(tokens)]
            sample += [-1] * rng.randint(0, 4)
            if len(row) + len(sample) > length - 2 or (row and not packed):
                break
            row += [(f, k) for f in sample]
            k += 1
        offset = length - len(row) if left else 0
        for j, (f, s) in enumerate(row):
            block_ids[r, offset + j], sample_ids[r, offset + j] = f, s
    return block_ids, sample_ids


@pytest.mark.parametrize("case", ["packed", "left_padded"])
@pytest.mark.parametrize("rule", MASKS, ids=lambda m: m.name)
def test_segments_equal_dense_sdpa_on_random_layouts(rule, case):
    """The decomposition's segments (variable-length causal part, in-block part per block) give dense SDPA's
    outputs and gradients on every real query, for random packings and left-padded rows whose samples differ
    in frame size and frame count (blocks of different sizes)."""
    rng = random.Random(f"{rule.name}-{case}")
    unequal = 0
    for trial in range(4):
        block_ids, sample_ids = random_layout(rng, 3, 48, (1, 2, 3, 7), packed=case == "packed",
                                              left=case == "left_padded")
        mask = (sample_ids >= 0).long()
        given = sample_ids if case == "packed" else None
        blocks = sample_block_ids(rule.block_ids(block_ids), sample_ids)
        spans = block_spans(blocks, mask, given)
        assert spans is not None and spans.segments is not None
        unequal += spans.sizes is not None
        q, k, v = (torch.randn(3, 2, 48, 8, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)
                   .requires_grad_() for _ in range(3))
        dense = block_causal_mask(blocks, mask, sample_ids)
        dense = dense | torch.eye(48, dtype=torch.bool)  # padding queries see themselves (no empty rows)
        out = block_merge_attention(q, k, v, spans)
        ref = sdpa(q, k, v, attn_mask=dense)
        real = mask.bool()[:, None, :, None].expand_as(out)
        assert (out - ref)[real].abs().max() < 1e-12, trial
        weight = torch.randn_like(out) * real
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
        refs = torch.autograd.grad((ref * weight).sum(), (q, k, v))
        for got, want in zip(grads, refs):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert unequal or isinstance(rule, CausalMask)


def test_spans_take_packed_and_left_padded_rows_as_segments():
    frames = torch.tensor([[-1, 0, 0, 1, 1, -1, -1, 0, 0, -1]])
    sample_ids = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, -1]])
    mask = (sample_ids >= 0).long()
    spans = block_spans(sample_block_ids(frames, sample_ids), mask, sample_ids)
    assert spans.segments.tolist() == [0, 6, 9, 10] and spans.max_segment == 6
    assert spans.starts.tolist() == [[1, 3, 7]] and spans.size == 2
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ids = torch.tensor([[-1, -1, -1, 0, 0], [-1, 0, 0, 1, 1]])
    spans = block_spans(ids, left)
    assert spans.segments.tolist() == [0, 2, 5, 10] and spans.starts.tolist() == [[3, 6, 8]]
    right = torch.ones_like(left)
    assert block_spans(ids, right).segments.tolist() == [0, 5, 10]  # block counts differ between rows


def test_packed_samples_refuse_a_split_sample(tiny_llama):
    with pytest.raises(ValueError, match="one contiguous run"):
        PackedSamples(torch.tensor([[0, 0, 1, 0, -1]]))
    model = load(tiny_llama, TADRoPE(), FrameBlockCausalMask())
    packed = packed_batch(samples(model), ROWS, model.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="sample_ids >= 0"):
        model(packed["input_ids"], torch.ones_like(packed["input_ids"]), packed["pixel_values"],
              num_frames=packed["num_frames"], sample_ids=packed["sample_ids"])
