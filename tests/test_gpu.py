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
