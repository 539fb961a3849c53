"""The batch layout: built once per batch, and cut into shares of the sequence that hold exactly what the whole
batch gives their tokens (positions, frames and loss targets computed on the whole rows before sharding)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import cross_entropy

from tc_llava.model.masks import FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE

from test_model import load
from test_packed import ROWS, packed_batch, samples

PER_TOKEN = ("attention_mask", "frame_ids", "rope_positions", "position_ids", "sample_ids", "block_ids", "targets")


def padded_to(batch: dict, multiple: int, pad_id: int) -> dict:
    """``batch`` right-padded to a length that ``multiple`` divides."""
    extra = -batch["input_ids"].shape[1] % multiple
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "sample_ids": -1}
    return batch | {k: torch.nn.functional.pad(batch[k], (0, extra), value=fill) for k, fill in fills.items()}


@pytest.mark.parametrize("world", [2, 4])
def test_shards_hold_the_whole_layout_and_its_loss(tiny_llama, world):
    """Shares of a packed batch's layout laid end to end are the whole layout; the block spans stay the whole rows';
    and the loss summed over the shares, each on its own tokens' hidden states, is the whole batch's loss, a
    target that crosses a share boundary included (fp64)."""
    model = load(tiny_llama, TADRoPE(), FrameBlockCausalMask()).double()
    batch = padded_to(packed_batch(samples(model), ROWS, model.tokenizer.pad_token_id), world,
                      model.tokenizer.pad_token_id)
    whole, counts = model.batch_layout(batch["input_ids"], batch["attention_mask"], batch["sample_ids"],
                                       batch["labels"], batch["pixel_values"], batch["num_frames"])
    assert counts == batch["num_frames"].tolist()
    shards = [whole.shard(rank, world) for rank in range(world)]
    size = whole.length // world
    for name in PER_TOKEN:
        torch.testing.assert_close(torch.cat([getattr(s, name) for s in shards], -1), getattr(whole, name),
                                   rtol=0, atol=0, msg=name)
    assert [s.start for s in shards] == [rank * size for rank in range(world)]
    assert all(s.block_spans is whole.block_spans for s in shards)
    boundaries = torch.arange(size - 1, whole.length - 1, size)
    assert (whole.targets[:, boundaries] != -100).any(), "no target crosses a share boundary: the case is untested"

    hidden = torch.randn(*batch["input_ids"].shape, model.config.text_config.hidden_size, dtype=torch.float64)
    count = int((whole.targets != -100).sum())
    reference = model._loss(hidden, whole, None)
    parts = [model._loss(hidden[:, rank * size:(rank + 1) * size], s, count) for rank, s in enumerate(shards)]
    torch.testing.assert_close(sum(parts), reference, rtol=1e-12, atol=0)
    # the reference itself, from the labels alone: token i predicts labels[i + 1] of its own sample
    keep = (batch["labels"][:, 1:] != -100) & (batch["sample_ids"][:, 1:] == batch["sample_ids"][:, :-1])
    logits = model.hf.lm_head(hidden[:, :-1][keep])
    torch.testing.assert_close(reference, cross_entropy(logits, batch["labels"][:, 1:][keep]), rtol=1e-12, atol=0)


def test_a_share_that_does_not_divide_is_refused(tiny_llama):
    model = load(tiny_llama, TADRoPE(), FrameBlockCausalMask())
    batch = packed_batch(samples(model), ROWS, model.tokenizer.pad_token_id)
    layout, _ = model.batch_layout(batch["input_ids"], batch["attention_mask"], batch["sample_ids"], None,
                                   batch["pixel_values"], batch["num_frames"])
    world = next(n for n in range(2, 9) if layout.length % n)
    with pytest.raises(ValueError, match=f"does not split into {world} equal shares: pad rows"):
        layout.shard(0, world)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("ckpt", ["tiny_llama", "tiny_qwen2_5_vl"])
def test_the_layout_costs_one_host_synchronisation(ckpt, request):
    """A packed LLaVA batch (frame counts as a tensor) and a Qwen-VL batch (grids on the GPU): the whole layout,
    block spans and loss positions included, waits for the GPU once (torch's sync debug mode counts the waits)."""
    import warnings

    from tc_llava.model.families.qwen_vl import QwenVisual

    import test_qwen_families as qwen

    model = load(request.getfixturevalue(ckpt), TADRoPE(), FrameBlockCausalMask()).cuda()
    if ckpt == "tiny_llama":
        batch = {k: v.cuda() for k, v in packed_batch(samples(model), ROWS, model.tokenizer.pad_token_id).items()}
        args = (batch["input_ids"], batch["attention_mask"], batch["sample_ids"], batch["labels"],
                batch["pixel_values"], batch["num_frames"])
    else:
        ids, mask, visual, _ = qwen.batch(model)
        visual = {k: v.cuda() for k, v in visual.items()}
        args = (ids.cuda(), mask.cuda(), None, ids.cuda(), None, None,
                QwenVisual.of(**visual))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            layout, _ = model.batch_layout(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
    assert layout.rope_positions.is_cuda and layout.loss_index.is_cuda
    assert ckpt != "tiny_llama" or layout.block_spans.starts.is_cuda
