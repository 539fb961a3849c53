"""Attention mask rules: causal, TC-LLaVA's frame-wise block causal, bidirectional visual.

Every non-causal rule is a block rule: it gives each token a block id (-1: no block) and
query ``i`` may attend key ``j`` iff ``j <= i`` or (``block[i] == block[j]`` and
``block[i] >= 0``), and never a padding key. Frame-block-causal uses the frame id as the
block (a visual token sees its whole frame); bidirectional-visual puts all visual tokens
of a sample in one block (every visual token sees the whole video).

A rule only gives the block ids; :func:`tc_llava.model.attention.llm_attention` decides what
each backend receives. ``block_merge`` and ``block_auto`` build no mask where their
decomposition applies (the layers get the block layout). Otherwise transformers'
``create_causal_mask(block_sequence_ids=...)`` builds the backend's native form: a BlockMask
for flex and for ``block_auto``'s GPU prefills, an additive float mask for eager, a 4D bool
mask for sdpa and the other ``block_merge``/``block_auto`` calls. :func:`block_causal_mask`
is the dense reference the tests compare them all against; the model never builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


def block_causal_mask(block_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      sample_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Dense boolean ``[B, 1, L, L]`` mask of a block rule (True = may attend; padding keys never).

    With ``sample_ids`` (packed rows) a query sees only its own sample's keys; ``block_ids``
    are then unique along the row (:func:`sample_block_ids`).
    """
    length = block_ids.shape[-1]
    idx = torch.arange(length, device=block_ids.device)
    causal = idx[None, :] <= idx[:, None]
    same_block = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)
    mask = causal[None] | same_block
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    if sample_ids is not None:
        mask = mask & (sample_ids[:, :, None] == sample_ids[:, None, :])
    return mask[:, None]


def sample_block_ids(block_ids: torch.Tensor | None, sample_ids: torch.Tensor) -> torch.Tensor:
    """Block ids of packed rows, unique along each row: a rule's per-sample ids (frame ``f`` of every
    sample is block ``f``) shifted by ``sample * L``, so no block spans two samples and ids keep rising.
    A causal rule (no blocks) gives -1 everywhere."""
    if block_ids is None:
        return torch.full_like(sample_ids, -1)
    keep = (block_ids >= 0) & (sample_ids >= 0)
    return torch.where(keep, block_ids + sample_ids * sample_ids.shape[-1], torch.full_like(block_ids, -1))


def frame_block_causal_mask(frame_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense frame-block-causal mask: the frame ids are the blocks."""
    return block_causal_mask(frame_ids, attention_mask)


@dataclass
class CausalMask:
    """Plain causal attention (the HF model's own mask)."""

    name: ClassVar[str] = "causal"
    is_causal: ClassVar[bool] = True

    def block_ids(self, frame_ids: torch.Tensor) -> torch.Tensor | None:
        return None


@dataclass
class FrameBlockCausalMask:
    """Visual tokens see their whole frame and everything earlier; text stays causal."""

    name: ClassVar[str] = "frame_block_causal"
    is_causal: ClassVar[bool] = False

    def block_ids(self, frame_ids: torch.Tensor) -> torch.Tensor | None:
        return frame_ids


@dataclass
class BidirectionalVisualMask:
    """All visual tokens of a sample see each other (the whole video, both directions); text stays causal.

    One block holding every visual token: ``block = 0`` for visual tokens, -1 for text.
    """

    name: ClassVar[str] = "bidirectional_visual"
    is_causal: ClassVar[bool] = False

    def block_ids(self, frame_ids: torch.Tensor) -> torch.Tensor | None:
        return torch.where(frame_ids >= 0, torch.zeros_like(frame_ids), torch.full_like(frame_ids, -1))


MaskRule = CausalMask | FrameBlockCausalMask | BidirectionalVisualMask

# Every mask rule under the name that configs and checkpoints know it by (see ROPE_RULES).
MASK_RULES: dict[str, type[MaskRule]] = {
    rule.name: rule for rule in (CausalMask, FrameBlockCausalMask, BidirectionalVisualMask)
}
