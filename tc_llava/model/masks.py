"""Attention mask rules: causal and TC-LLaVA's frame-wise block causal mask.

Query ``i`` may attend key ``j`` iff ``j <= i`` or (``frame[i] == frame[j]`` and
``frame[i] >= 0``), and never a padding key. The model builds the mask through
transformers' own ``create_causal_mask(block_sequence_ids=...)``, so every attention
backend (sdpa bool mask, eager additive mask, flex BlockMask) gets its native form;
:func:`frame_block_causal_mask` is the dense reference the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Backends that drop any custom mask: refusing them beats silently training the wrong model.
MASK_DROPPING_BACKENDS = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def frame_block_causal_mask(frame_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense boolean ``[B, 1, L, L]`` mask (True = may attend; padding keys never attended)."""
    length = frame_ids.shape[-1]
    idx = torch.arange(length, device=frame_ids.device)
    causal = idx[None, :] <= idx[:, None]
    same_frame = (frame_ids[:, :, None] == frame_ids[:, None, :]) & (frame_ids[:, :, None] >= 0)
    mask = causal[None] | same_frame
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    return mask[:, None]


@dataclass
class CausalMask:
    """Plain causal attention (the HF model's own mask)."""

    name: str = "causal"
    is_causal: bool = True

    def block_ids(self, frame_ids: torch.Tensor) -> torch.Tensor | None:
        return None


@dataclass
class FrameBlockCausalMask:
    """Visual tokens see their whole frame and everything earlier; text stays causal."""

    name: str = "frame_block_causal"
    is_causal: bool = False

    def block_ids(self, frame_ids: torch.Tensor) -> torch.Tensor | None:
        return frame_ids


def check_backend(attn_implementation: str, mask_rule: CausalMask | FrameBlockCausalMask) -> None:
    """Refuse attention backends that would silently ignore a non-causal mask."""
    if not mask_rule.is_causal and attn_implementation in MASK_DROPPING_BACKENDS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} ignores custom attention masks, so mask="
            f"{mask_rule.name!r} would silently become causal. Use 'sdpa', 'flex_attention' or 'eager'."
        )
