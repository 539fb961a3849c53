"""Random-weight LLaVA models of real shapes for GPU benchmarks (nothing is downloaded).

CLIP ViT-L/336 vision tower (layer -2, 24x24 patches) and a Vicuna-7B-shaped Llama LLM,
built directly on the device in the requested dtype, wrapped as TC-LLaVA; and
LLaVA-OneVision-7B's shape (SigLIP-so400m/384, Qwen2-7B) as HF's own model. ``smoke=True``
swaps the 7B shape for a tiny one of the same structure (a 2-layer 56 px CLIP tower, a 64-wide
Llama), so that a benchmark can be checked end to end on CPU in seconds.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig,
)

from tc_llava.model.attention import llm_attention
from tc_llava.model.layout import BatchLayout
from tc_llava.model.masks import CausalMask, FrameBlockCausalMask
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.rope import TADRoPE, VanillaRoPE
from tc_llava.model.tc_llava import TCLlava

IMAGE_TOKEN_ID = 32000
VOCAB = 32064


def llava_7b_config(num_layers: int = 32) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                       pad_token_id=0, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def smoke_config(num_layers: int = 1) -> LlavaConfig:
    """The 7B config's structure at toy size: 56 px frames (4x4 patches), a 64-wide Llama, the same vocabulary."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32768,
                       pad_token_id=0, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


SMOKE_POOLING = (16, 2, 2)  # the smoke tower's 4x4 grid pooled as the 7B's 24x24 is to 12x12


def random_tc_llava(num_layers: int = 32, attn: str = "sdpa", tc: bool = True,
                    pooling_shape: tuple[int, int, int] | None = (16, 12, 12),
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str = "cuda",
                    smoke: bool = False) -> TCLlava:
    """TC-LLaVA (tad + frame-block mask) or, with ``tc=False``, vanilla LLaVA (1D RoPE, causal).

    ``smoke``: :func:`smoke_config` instead of the 7B shape, pooled to :data:`SMOKE_POOLING` when pooling."""
    torch.manual_seed(seed)
    config = smoke_config(num_layers) if smoke else llava_7b_config(num_layers)
    if smoke and pooling_shape is not None:
        pooling_shape = SMOKE_POOLING
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = "sdpa"
    with torch.device(device):
        hf = LlavaForConditionalGeneration(config).to(dtype)
    rope, mask = (TADRoPE(1.0), FrameBlockCausalMask()) if tc else (VanillaRoPE(), CausalMask())
    return TCLlava(hf, rope, mask, VideoPooling(pooling_shape))


def attention_path(model: TCLlava, frame_ids: torch.Tensor, mask: torch.Tensor,
                   sample_ids: torch.Tensor | None = None) -> str:
    """What the LLM attends with for this layout (under the caller's grad mode: block_auto's fallback differs):
    the block decomposition, with variable-length segments or not, or the kind of mask it gets instead."""
    embeds = torch.empty(*mask.shape, model.config.text_config.hidden_size, device=mask.device, dtype=model.hf.dtype)
    chosen = llm_attention(model.language_model.config, BatchLayout.of(model.mask, frame_ids, mask, sample_ids),
                           embeds)
    spans = chosen.layer_kwargs.get("block_spans")
    if spans is None:
        return type(chosen.attention_mask).__name__
    return "block decomposition" + (" (segments)" if spans.segments is not None else "")


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as a left-padded ``(input_ids, attention_mask)`` batch (pad id 0), as evaluation batches them."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    return ids, mask


def video_prompts(model: TCLlava, batch: int, num_frames: int = 16, text_before: int = 48,
                  text_after: int = 40, seed: int = 0, ragged: bool = True):
    """Left-padded random prompts around one video each, and random frames (on the model's device)."""
    g = torch.Generator().manual_seed(seed)
    n_vis = model.tokens_per_video(num_frames)
    rows = []
    for b in range(batch):
        extra = b % 7 if ragged else 0
        before = torch.randint(100, 30000, (text_before + extra,), generator=g).tolist()
        after = torch.randint(100, 30000, (text_after,), generator=g).tolist()
        rows.append([1] + before + [IMAGE_TOKEN_ID] * n_vis + after)
    ids, mask = left_padded(rows)
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, num_frames, 3, size, size, generator=g)
    device = model.hf.device
    return ids.to(device), mask.to(device), pixels.to(device, model.hf.dtype)


ONEVISION_VIDEO_TOKEN_ID = 151647
ONEVISION_VOCAB = 152064


def onevision_7b_config(num_layers: int = 28) -> LlavaOnevisionConfig:
    """llava-onevision-qwen2-7b-ov-hf's shape: SigLIP-so400m/384 (26 layers, 27x27 patches, read at its last
    layer), the 2-layer projector, Qwen2-7B (28 layers, 3584 wide, 28 query / 4 KV heads, RoPE base 1e6)."""
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                image_size=384, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=ONEVISION_VOCAB, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=num_layers, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1e6, use_sliding_window=False,
                       tie_word_embeddings=False, pad_token_id=151643)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                video_token_index=ONEVISION_VIDEO_TOKEN_ID, vision_feature_layer=-1,
                                vision_feature_select_strategy="full")


def random_onevision(num_layers: int = 28, attn: str = "sdpa", dtype: torch.dtype = torch.bfloat16,
                     seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    """HF's own ``LlavaOnevisionForConditionalGeneration`` of that shape, random weights, built on the GPU in ``dtype``."""
    torch.manual_seed(seed)
    config = onevision_7b_config(num_layers)
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        return LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)
