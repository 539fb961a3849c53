"""GPU paths: flex attention (compiled, BlockMask) against sdpa, and flex backward.

Skipped without a CUDA GPU; CI has none, the device runs recorded in the README do.
"""

from __future__ import annotations

import pytest
import torch

from tc_llava.model.masks import FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE
from tc_llava.model.tc_llava import TCLlava
from tc_llava.model.tiny import tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def batch(model: TCLlava, num_frames: int = 4):
    n = model.tokens_per_video(num_frames)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, model.config.text_config.vocab_size, (2, 24), generator=g)
    ids = torch.cat([text[:, :11], torch.full((2, n), model.image_token_id), text[:, 11:]], 1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on one sample
    pixels = torch.randn(2, num_frames, 3, 56, 56, generator=g)
    return ids.cuda(), mask.cuda(), pixels.cuda()


@pytest.fixture(scope="module")
def gpu_tiny(cache_dir):
    """Flex's GPU kernels need head_dim >= 32 to find a config: heads of 64 dims here."""
    return tiny_checkpoint(cache_dir, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2)


def test_flex_matches_sdpa_and_trains_on_gpu(gpu_tiny):
    models = {impl: TCLlava.from_pretrained(gpu_tiny, rope=TADRoPE(), mask=FrameBlockCausalMask(),
                                            attn_implementation=impl, dtype=torch.bfloat16).cuda()
              for impl in ("sdpa", "flex_attention")}
    ids, mask, pixels = batch(models["sdpa"])
    with torch.no_grad():
        logits = {impl: m(ids, mask, pixels.bfloat16()).logits.float() for impl, m in models.items()}
    real = mask.bool()
    assert (logits["sdpa"] - logits["flex_attention"])[real].abs().max() < 5e-2
    flex = models["flex_attention"].train()
    loss = flex(ids, mask, pixels.bfloat16(), labels=ids.masked_fill(~real, -100)).loss
    loss.backward()
    grads = [p.grad for p in flex.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
