"""Batching SFT samples, and totalling the counts that batches carry.

Skips and truncations happen inside DataLoader workers, whose counters die with them, so
each sample carries its own record of them (and its frame and visual-token counts) and each
batch sums them; ``DataReport`` turns the batches a trainer sees into per-epoch and run totals.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from tc_llava.data.templates import IGNORE_INDEX

logger = logging.getLogger(__name__)

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "num_frames")  # what the model takes


def collate_frames(pixel_values: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples' frames ``[T_b, C, H, W]`` -> ``pixel_values`` and ``num_frames [B]`` as the model takes them:
    ``[B, T, C, H, W]`` when every sample has ``T`` frames, else all frames in one ``[N, C, H, W]``."""
    frame_shapes = {tuple(p.shape[1:]) for p in pixel_values}
    if len(frame_shapes) > 1 or any(p.ndim != 4 for p in pixel_values):
        shapes = sorted({tuple(p.shape) for p in pixel_values})
        raise ValueError(f"samples' pixel_values {shapes} must be [T, C, H, W] frames of one [C, H, W] shape")
    counts = torch.tensor([p.shape[0] for p in pixel_values])
    stacked = torch.stack(list(pixel_values)) if len(set(counts.tolist())) == 1 else torch.cat(list(pixel_values))
    return stacked, counts


def _pad(seqs: Sequence[torch.Tensor], value: int, side: str, multiple: int | None = None) -> torch.Tensor:
    length = max(len(s) for s in seqs)
    if multiple:
        length = -(-length // multiple) * multiple
    out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, : len(s)] = s
        else:
            out[i, length - len(s) :] = s
    return out


class SFTCollator:
    """Pads to the longest sample: right for training, left for batched generation.

    ``pad_to_multiple_of`` rounds the padded length up (length buckets), so compiled
    kernels (``trainer.compile``, flex attention) see few distinct shapes instead of
    recompiling for every batch.

    Output: ``input_ids``, ``attention_mask``, ``labels`` (if the samples have them; padded
    with IGNORE_INDEX) ``[B, L]``, ``pixel_values`` and ``num_frames`` (:func:`collate_frames`:
    samples may differ in frame count, e.g. a one-frame image beside 8- and 32-frame videos),
    and the batch's ``skips`` (reason -> count), ``skipped`` (one dict per replaced sample),
    ``num_truncated``, ``num_samples``, ``media`` (frames, visual tokens, image samples) and
    ``sources``. Feed the model ``{k: batch[k] for k in MODEL_KEYS}``.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer or null, got {pad_to_multiple_of!r}")
        self.pad_to_multiple_of = pad_to_multiple_of
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer needs a pad token")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ids = [s["input_ids"] for s in samples]
        pixel_values, num_frames = collate_frames([s["pixel_values"] for s in samples])
        batch = {
            "input_ids": _pad(ids, self.pad_token_id, self.padding_side, self.pad_to_multiple_of),
            "attention_mask": _pad([torch.ones_like(i) for i in ids], 0, self.padding_side, self.pad_to_multiple_of),
            "pixel_values": pixel_values,
            "num_frames": num_frames,
        }
        if all("labels" in s for s in samples):
            batch["labels"] = _pad([s["labels"] for s in samples], IGNORE_INDEX, self.padding_side,
                                   self.pad_to_multiple_of)
        skipped = [skip for s in samples for skip in s.get("skipped", ())]
        batch["skipped"] = skipped
        batch["skips"] = dict(Counter(skip["reason"] for skip in skipped))
        batch["num_truncated"] = sum(bool(s.get("truncated", False)) for s in samples)
        batch["num_samples"] = len(samples)
        batch["media"] = {"frames": int(num_frames.sum()),
                          "visual_tokens": sum(s.get("num_visual_tokens", 0) for s in samples),
                          "images": sum(bool(s.get("is_image", False)) for s in samples)}
        batch["sources"] = [s.get("source", "") for s in samples]
        return batch


class DataReport:
    """Totals of samples, truncations, skips and media (frames, visual tokens, image samples) over the
    batches a trainer consumed.

    ``load_skips`` are the dataset's load-time counts (malformed records), counted once.
    With several ranks, each rank reports its own batches. ``state_dict`` goes into
    checkpoints, so a resumed run's counts continue where the checkpoint left them.
    """

    def __init__(self, load_skips: Mapping[str, int] | None = None):
        self.load_skips = Counter(load_skips or {})
        self.total = self._empty()
        self.epoch = self._empty()

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"samples": 0, "truncated": 0, "skips": Counter(), "media": Counter()}

    def update(self, batch: Mapping[str, Any]) -> None:
        for counts in (self.total, self.epoch):
            counts["samples"] += batch["num_samples"]
            counts["truncated"] += batch["num_truncated"]
            counts["skips"].update(batch["skips"])
            counts["media"].update(batch.get("media", {}))

    def state_dict(self) -> dict[str, Any]:
        """The run's and the current epoch's counts so far (load-time skips apart: each run recounts them)."""
        return {part: {**counts, "skips": dict(counts["skips"]), "media": dict(counts["media"])}
                for part, counts in (("total", self.total), ("epoch", self.epoch))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for part in ("total", "epoch"):
            counts = state[part]  # checkpoints written before media were counted have none
            setattr(self, part, {"samples": counts["samples"], "truncated": counts["truncated"],
                                 "skips": Counter(counts["skips"]), "media": Counter(counts.get("media", {}))})

    def totals(self) -> dict[str, Any]:
        """Run totals: ``{samples, truncated, skips: {reason: n}}``, load-time skips included."""
        return {"samples": self.total["samples"], "truncated": self.total["truncated"],
                "skips": dict(self.total["skips"] + self.load_skips)}

    def media_totals(self) -> dict[str, int]:
        """Run totals of what the samples showed the model: ``{frames, visual_tokens, images}``."""
        return {key: self.total["media"][key] for key in ("frames", "visual_tokens", "images")}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Log and return this epoch's counts, then start counting the next epoch."""
        counts = {**self.epoch, "skips": dict(self.epoch["skips"]), "media": dict(self.epoch["media"])}
        media = self.epoch["media"]
        logger.info(
            "data epoch %d: %d samples (%d images), %d frames, %d visual tokens, %d truncated to max_txt_len, "
            "skipped %s (at load: %s)", epoch, counts["samples"], media["images"], media["frames"],
            media["visual_tokens"], counts["truncated"], counts["skips"] or "none", dict(self.load_skips) or "none",
        )
        self.epoch = self._empty()
        return counts

    def track(self, batches: Iterable[Mapping[str, Any]], epoch: int) -> Iterator[Mapping[str, Any]]:
        """Yield the batches, counting each, and report the epoch when they run out."""
        for batch in batches:
            self.update(batch)
            yield batch
        self.end_epoch(epoch)
