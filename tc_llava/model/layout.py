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


class PackedSamples:
    """The samples of packed rows, each as a row of its own, and the way back.

    ``sample_ids [B, L]`` marks the packed rows: -1 padding, ``k`` the row's k-th sample,
    each sample one contiguous run. Samples are numbered row after row, left to right: the
    order of ``num_frames`` and of the frames in ``pixel_values``. Every per-sample rule
    (frame ids, rotary positions, real-token index) runs on :meth:`unpack`'s rows exactly as
    on an unpacked batch, and :meth:`pack` puts the results back, so positions restart at
    each sample for every rule.
    """

    def __init__(self, sample_ids: torch.Tensor) -> None:
        # A few vector ops on a few thousand ids: on the host, after one copy (as block_spans does), not as a
        # string of small GPU launches each waited for.
        batch, length = sample_ids.shape
        flat = sample_ids.flatten().cpu()
        real = flat >= 0
        pos = torch.arange(flat.numel())
        key = torch.where(real, pos // length * length + flat, -1)
        starts = real & (key != torch.nn.functional.pad(key[:-1], (1, 0), value=-1))
        sample = starts.long().cumsum(0) - 1
        count = int(starts.sum())
        if count != torch.unique(key[real]).numel():
            raise ValueError("sample_ids must give each packed sample one contiguous run of one id per row "
                             f"(-1 on padding); got {sample_ids.tolist()}")
        offset = pos - pos[starts][sample.clamp(min=0)]
        lengths = torch.bincount(sample[real], minlength=count)
        valid = torch.arange(int(lengths.max()) if count else 0) < lengths[:, None]
        index = torch.zeros(valid.shape, dtype=torch.long)
        index[sample[real], offset[real]] = pos[real]
        self.shape = (batch, length)
        self.valid, self.index = valid.to(sample_ids.device), index.to(sample_ids.device)
        self.positions = pos[real].to(sample_ids.device)  # where each valid entry goes back, in ``valid``'s order

    def __len__(self) -> int:
        return self.valid.shape[0]

    def unpack(self, x: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
        """``[B, L]`` packed rows -> ``[S, L_max]``, one sample per row, right-padded with ``fill``."""
        return torch.where(self.valid, x.flatten()[self.index], torch.full_like(self.index, fill, dtype=x.dtype))

    def pack(self, y: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
        """``[..., S, L_max]`` per-sample rows -> ``[..., B, L]`` packed rows, ``fill`` on padding."""
        lead = y.shape[:-2]
        out = torch.full((*lead, self.shape[0] * self.shape[1]), fill, dtype=y.dtype, device=y.device)
        out[..., self.positions] = y[..., self.valid]
        return out.view(*lead, *self.shape)
