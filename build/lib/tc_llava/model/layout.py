"""The token layout of a video prompt: which token belongs to which frame.

Each video is one contiguous run of image tokens (the prompt's single placeholder,
expanded to the video's visual token count). Everything position- and mask-related is a
function of the frame-id vector derived here: -1 for text, ``f`` for frame ``f``.
"""

from __future__ import annotations

import torch


def frame_ids_from_tokens(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_frame: int, tokens_per_video: int
) -> torch.Tensor:
    """Per-token frame ids ``[B, L]``; the k-th image token of a sample is in frame ``(k % tpv) // tpf``."""
    is_visual = input_ids == image_token_id
    k = is_visual.long().cumsum(-1) - 1
    frame = (k % tokens_per_video) // tokens_per_frame
    return torch.where(is_visual, frame, torch.full_like(frame, -1))


def check_visual_token_count(input_ids: torch.Tensor, image_token_id: int, tokens_per_video: int, num_frames: int) -> None:
    """Every sample holds exactly one video's worth of image tokens, in one contiguous run."""
    is_visual = input_ids == image_token_id
    counts = is_visual.sum(-1).tolist()
    runs = (is_visual[:, 1:] & ~is_visual[:, :-1]).sum(-1) + is_visual[:, 0].long()
    for b, (count, run) in enumerate(zip(counts, runs.tolist())):
        if count != tokens_per_video or run != 1:
            raise ValueError(
                f"sample {b}: found {count} image tokens (id {image_token_id}) in {run} run(s); expected one video "
                f"placeholder expanded to {tokens_per_video} tokens for {num_frames} frames. Put exactly one "
                f"placeholder per video in the prompt and expand it with the model's tokens_per_video(num_frames)."
            )
