"""The token layout of a video prompt: which token belongs to which frame, and the batch's layout built from it.

Each video is one contiguous run of placeholder tokens (the prompt's single ``<image>`` or
``<video>``, expanded to the video's visual token count, which may differ per sample).
Everything position- and mask-related is a function of the frame-id vector derived here:
-1 for text, ``f`` for frame ``f``. :class:`BatchLayout` holds all of it for one LLM call,
built once per batch on the host, and cuts it into the shares of sequence parallelism.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tc_llava.model.block_attention import BlockSpans, block_spans
from tc_llava.model.masks import sample_block_ids
from tc_llava.model.rope import real_token_index


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


def to_host(*tensors: Any) -> list[Any]:
    """The tensors on the host (anything else passes), after one synchronisation however many come from a GPU.

    Copies from a GPU are queued without waiting (into pinned memory) and waited for once: the
    layout of a batch costs one host synchronisation, not one per tensor read.
    """
    on_gpu = [isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in tensors]
    out = [t.to("cpu", non_blocking=True) if gpu else t for t, gpu in zip(tensors, on_gpu)]
    devices = {t.device for t, gpu in zip(tensors, on_gpu) if gpu}
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    return out


def loss_targets(labels: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L]``: the label token ``i`` predicts (``labels[i + 1]``), -100 where it predicts nothing (the row's last
    token, unlabelled targets, and a packed sample's last token, which never predicts the next sample's first).

    Shifted on the whole row, so a share of the sequence keeps the target of its last token (the next share's
    first label)."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    if sample_ids is not None:
        same = torch.nn.functional.pad(sample_ids[:, 1:] == sample_ids[:, :-1], (0, 1), value=False)
        targets = torch.where(same, targets, torch.full_like(targets, -100))
    return targets


def _move(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, BlockSpans):
        return dataclasses.replace(x, **{f.name: _move(getattr(x, f.name), device) for f in dataclasses.fields(x)
                                         if isinstance(getattr(x, f.name), torch.Tensor)})
    return x


@dataclass(frozen=True)
class BatchLayout:
    """Everything position- and mask-related of one LLM call, built once per batch on the host.

    Per-token fields are ``[B, L]`` (rotary positions ``[B, L]`` or ``[3, B, L]``):
    ``attention_mask`` (1 real, 0 padding), ``frame_ids`` (-1 text, ``f`` frame ``f`` of its
    sample; None for a decode step, whose new tokens are text), ``sample_ids`` (packed rows: -1
    padding, ``k`` the row's k-th sample), ``rope_positions`` (what the rotary module rotates by),
    ``position_ids`` (the real-token index HF's mask code reads), ``block_ids`` (the mask rule's
    blocks, unique along a packed row; None: no blocks, causal) and ``targets``
    (:func:`loss_targets`). ``loss_index`` holds the flat ``B * L`` positions that predict a
    label. ``block_spans`` is the decomposition's layout of the whole rows (None for a decode step
    and where it does not apply), ``next_positions`` where generation continues (``[..., B, 1]``; None for packed rows).

    :meth:`shard` cuts a contiguous share of the sequence for one rank of sequence parallelism:
    positions, frames and targets are computed on the whole rows before, so every share holds
    exactly what the whole batch gives its tokens.
    """

    attention_mask: torch.Tensor
    frame_ids: torch.Tensor | None
    rope_positions: torch.Tensor | None
    position_ids: torch.Tensor | None
    sample_ids: torch.Tensor | None = None
    block_ids: torch.Tensor | None = None
    block_spans: BlockSpans | None = None
    next_positions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    loss_index: torch.Tensor | None = None
    start: int = 0  # where this share begins in the whole rows (block_spans count from the rows' start)

    @classmethod
    def build(cls, mask_rule: Any, attention_mask: torch.Tensor, frame_ids: torch.Tensor | None,
              rope_positions: torch.Tensor | None, position_ids: torch.Tensor | None,
              next_positions: torch.Tensor | None = None, sample_ids: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> "BatchLayout":
        """The layout of a prefill (``frame_ids``) or decode step (None), on the device of its inputs.

        Built on the host (after :func:`to_host`) it costs no further synchronisation; :meth:`to` moves it."""
        block_ids = None if frame_ids is None else mask_rule.block_ids(frame_ids)
        if sample_ids is not None:
            block_ids = sample_block_ids(block_ids, sample_ids)
        # Every prefill gets the decomposition's spans, a causal rule's too (its segments alone): sequence
        # parallelism's core attention reads them whatever the rule.
        spans = None if frame_ids is None else block_spans(
            torch.full_like(frame_ids, -1) if block_ids is None else block_ids, attention_mask, sample_ids)
        targets = None if labels is None else loss_targets(labels, sample_ids)
        return cls(attention_mask, frame_ids, rope_positions, position_ids, sample_ids, block_ids, spans,
                   next_positions, targets, _loss_index(targets))

    @classmethod
    def of(cls, mask_rule: Any, frame_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           sample_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> "BatchLayout":
        """A prefill's layout from its frame ids alone, with 1D positions (the real-token index): for benchmarks and
        tests of the attention, which read no rotary positions."""
        if attention_mask is None:
            attention_mask = torch.ones_like(frame_ids) if sample_ids is None else (sample_ids >= 0).long()
        index = real_token_index(frame_ids, attention_mask)
        return cls.build(mask_rule, attention_mask, frame_ids, index.float(), index, sample_ids=sample_ids,
                         labels=labels)

    @property
    def length(self) -> int:
        return self.attention_mask.shape[-1]

    def to(self, device: torch.device | str) -> "BatchLayout":
        """The layout on ``device`` (copies queued without waiting)."""
        device = torch.device(device)
        return dataclasses.replace(self, **{f.name: _move(getattr(self, f.name), device)
                                            for f in dataclasses.fields(self)})

    def shard(self, rank: int, world: int) -> "BatchLayout":
        """Rank ``rank``'s contiguous share of ``world`` equal shares of the sequence.

        Every per-token field is cut to the share; ``block_spans`` stays the whole rows' (attention sees the
        whole sequence: each rank holds all tokens for its share of the heads) and ``loss_index`` counts
        within the share. The sequence length must divide into ``world`` shares (pad rows to a multiple).
        """
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"shard {rank} of {world}: expected 0 <= rank < world")
        if self.length % world:
            raise ValueError(f"a sequence of {self.length} tokens does not split into {world} equal shares: pad rows "
                             f"to a multiple of {world} (data.pad_to_multiple_of)")
        size = self.length // world
        cut = slice(rank * size, (rank + 1) * size)
        per_token = ("attention_mask", "frame_ids", "rope_positions", "position_ids", "sample_ids", "block_ids",
                     "targets")
        fields = {name: None if getattr(self, name) is None else getattr(self, name)[..., cut] for name in per_token}
        return dataclasses.replace(self, **fields, loss_index=_loss_index(fields["targets"]),
                                   start=self.start + rank * size)


def _loss_index(targets: torch.Tensor | None) -> torch.Tensor | None:
    return None if targets is None else (targets != -100).flatten().nonzero()[:, 0]
