"""The token layout of a video prompt: which token belongs to which frame.

Each video is one contiguous run of placeholder tokens (the prompt's single ``<image>`` or
``<video>``, expanded to the video's visual token count, which may differ per sample).
Everything position- and mask-related is a function of the frame-id vector derived here:
-1 for text, ``f`` for frame ``f``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def frame_ids_from_tokens(
    input_ids: torch.Tensor, token_id: int, tokens_per_frame: int, visual_tokens: torch.Tensor
) -> torch.Tensor:
    """Per-token frame ids ``[B, L]``: the k-th placeholder token of sample b is in frame ``k // tokens_per_frame``
    while ``k < visual_tokens[b]``; placeholder tokens after that (OneVision's newline) are text."""
    is_placeholder = input_ids == token_id
    k = is_placeholder.long().cumsum(-1) - 1
    in_frame = is_placeholder & (k < visual_tokens[:, None])
    return torch.where(in_frame, k // tokens_per_frame, torch.full_like(k, -1))


def check_visual_token_count(input_ids: torch.Tensor, token_id: int, tokens_per_video: Sequence[int],
                             num_frames: Sequence[int], kind: str = "image") -> None:
    """Every sample holds exactly its video's worth of placeholder tokens, in one contiguous run."""
    is_visual = input_ids == token_id
    counts = is_visual.sum(-1).tolist()
    runs = (is_visual[:, 1:] & ~is_visual[:, :-1]).sum(-1) + is_visual[:, 0].long()
    for b, (count, run) in enumerate(zip(counts, runs.tolist())):
        if count != tokens_per_video[b] or run != 1:
            raise ValueError(
                f"sample {b}: found {count} {kind} tokens (id {token_id}) in {run} run(s); expected one video "
                f"placeholder expanded to {tokens_per_video[b]} tokens for {num_frames[b]} frames. Put exactly one "
                f"placeholder per video in the prompt and expand it with the model's tokens_per_video(num_frames)."
            )
