"""Batching SFT samples, padded (``SFTCollator``) or packed (``PackingCollator``), and totalling the
counts that batches carry.

Skips and truncations happen inside DataLoader workers, whose counters die with them, so
each sample carries its own record of them (and its frame and visual-token counts) and each
batch sums them; ``DataReport`` turns the batches a trainer sees into per-epoch and run totals.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from tc_llava.data.datasets import DataError
from tc_llava.data.templates import IGNORE_INDEX

logger = logging.getLogger(__name__)

# A Qwen-VL sample's visual inputs as HF's processors give them: rows that batch by concatenation, in sample order.
GRID_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
# What the model takes; a batch holds those its collator makes (``sample_ids`` only when packed).
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "num_frames", "sample_ids", *GRID_KEYS)
PACKING_STRATEGIES = ("best_fit", "greedy")


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


def collate_visual(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The samples' visual inputs as one batch's: ``pixel_values`` and ``num_frames`` (:func:`collate_frames`), or
    a Qwen-VL family's :data:`GRID_KEYS` concatenated in sample order with ``num_frames`` (frames decoded)."""
    if not all(key in s for s in samples for key in GRID_KEYS[:2]):
        pixel_values, num_frames = collate_frames([s["pixel_values"] for s in samples])
        return {"pixel_values": pixel_values, "num_frames": num_frames}
    batch = {key: torch.cat([s[key] for s in samples]) for key in GRID_KEYS if key in samples[0]}
    return {**batch, "num_frames": torch.tensor([int(s["num_frames"]) for s in samples])}


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
    with IGNORE_INDEX) ``[B, L]``, ``pixel_values`` and ``num_frames`` (:func:`collate_frames`: samples may
    differ in frame count, e.g. a one-frame image beside 8- and 32-frame videos; a Qwen-VL family's
    :data:`GRID_KEYS` instead, :func:`collate_visual`),
    and the batch's ``skips`` (reason -> count), ``skipped`` (one dict per replaced sample),
    ``num_truncated``, ``num_samples``, ``media`` (frames, visual tokens, image samples) and
    ``sources``. Feed the model ``{k: batch[k] for k in MODEL_KEYS if k in batch}``.
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
        visual = collate_visual(samples)
        batch = {
            "input_ids": _pad(ids, self.pad_token_id, self.padding_side, self.pad_to_multiple_of),
            "attention_mask": _pad([torch.ones_like(i) for i in ids], 0, self.padding_side, self.pad_to_multiple_of),
            **visual,
        }
        if all("labels" in s for s in samples):
            batch["labels"] = _pad([s["labels"] for s in samples], IGNORE_INDEX, self.padding_side,
                                   self.pad_to_multiple_of)
        return {**batch, **_counts(samples, visual["num_frames"])}


def _counts(samples: Sequence[Mapping[str, Any]], num_frames: torch.Tensor) -> dict[str, Any]:
    """What a batch carries for ``DataReport``: its samples' skips, truncations, media and sources."""
    skipped = [skip for s in samples for skip in s.get("skipped", ())]
    return {"skipped": skipped,
            "skips": dict(Counter(skip["reason"] for skip in skipped)),
            "num_truncated": sum(bool(s.get("truncated", False)) for s in samples),
            "num_samples": len(samples),
            "media": {"frames": int(num_frames.sum()),
                      "visual_tokens": sum(s.get("num_visual_tokens", 0) for s in samples),
                      "images": sum(bool(s.get("is_image", False)) for s in samples)},
            "sources": [s.get("source", "") for s in samples]}


def pack(lengths: Sequence[int], max_tokens: int | None, strategy: str = "best_fit") -> list[list[int]]:
    """Rows of sample indices, each row's lengths summing to at most ``max_tokens``; a pure function of its input.

    ``best_fit``: longest first (ties by index), each into the fullest row it fits, else a new row.
    ``greedy``: in index order, each into the first row it fits (first fit), else a new row.
    ``max_tokens=None``: one row. Within a row, samples keep their index order; rows are in order of creation.
    """
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"data.pack.strategy must be one of {PACKING_STRATEGIES}, got {strategy!r}")
    if max_tokens is None:
        return [list(range(len(lengths)))]
    order = range(len(lengths))
    if strategy == "best_fit":
        order = sorted(order, key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if not fits:
            rows.append([])
            free.append(max_tokens)
            fits = [len(rows) - 1]
        r = min(fits, key=lambda r: free[r]) if strategy == "best_fit" else fits[0]  # min: first of equals
        rows[r].append(i)
        free[r] -= lengths[i]
    return [sorted(row) for row in rows]


class PackingCollator(SFTCollator):
    """Packs a pool of samples (one DataLoader batch) into as few rows of ``max_tokens`` as :func:`pack` finds,
    so that short samples stop paying for the batch's longest one in padding.

    Each pool is packed on its own and deterministically, so a resumed run (the same loader with its first
    batches skipped) gets the rows an uninterrupted one got. Rows are right-padded to the longest row
    (rounded up by ``pad_to_multiple_of``, which may exceed ``max_tokens``).

    Output: :class:`SFTCollator`'s keys over ``R`` rows, with every per-sample entry (``pixel_values``,
    ``num_frames``, ``sources``, ``skipped``) in row-major sample order: the order the samples' placeholder
    runs appear in the rows. Plus ``sample_ids [R, L]`` (the sample's place in its row, 0, 1, ...; -1 on
    padding), for a mask that keeps samples from attending to each other, and ``packing``: ``{rows, tokens,
    capacity, samples}`` (tokens / capacity is the fill). Each sample's first label is IGNORE_INDEX, so no
    sample's last token learns to predict the next sample's first. A sample longer than ``max_tokens`` is
    refused (:class:`DataError`), never dropped.
    """

    def __init__(self, pad_token_id: int, max_tokens: int | None = None, strategy: str = "best_fit",
                 pad_to_multiple_of: int | None = None):
        super().__init__(pad_token_id, "right", pad_to_multiple_of)
        if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ValueError(f"data.pack.max_tokens must be a positive integer or null, got {max_tokens!r}")
        pack([], None, strategy)  # refuses an unknown strategy now, not at the first batch
        self.max_tokens = max_tokens
        self.strategy = strategy

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        lengths = [len(s["input_ids"]) for s in samples]
        for s, n in zip(samples, lengths):
            if n > (self.max_tokens or n):
                raise DataError(f"sample {s.get('source', '?')} has {n} tokens, more than one packed row holds "
                                f"(data.pack.max_tokens={self.max_tokens}); raise it or lower data.max_txt_len")
        packed = [[samples[i] for i in row] for row in pack(lengths, self.max_tokens, self.strategy)]
        ordered = [s for row in packed for s in row]
        visual = collate_visual(ordered)
        ids = [torch.cat([s["input_ids"] for s in row]) for row in packed]
        sample_ids = [torch.cat([torch.full_like(s["input_ids"], k, dtype=torch.long) for k, s in enumerate(row)])
                      for row in packed]
        batch = {
            "input_ids": _pad(ids, self.pad_token_id, "right", self.pad_to_multiple_of),
            "attention_mask": _pad([torch.ones_like(i) for i in ids], 0, "right", self.pad_to_multiple_of),
            "sample_ids": _pad(sample_ids, -1, "right", self.pad_to_multiple_of),
            **visual,
        }
        if all("labels" in s for s in samples):
            batch["labels"] = _pad([torch.cat([_unlearn_first(s["labels"]) for s in row]) for row in packed],
                                   IGNORE_INDEX, "right", self.pad_to_multiple_of)
        batch["packing"] = {"rows": len(packed), "tokens": sum(lengths), "capacity": batch["input_ids"].numel(),
                            "samples": len(samples)}
        return {**batch, **_counts(ordered, visual["num_frames"])}


def _unlearn_first(labels: torch.Tensor) -> torch.Tensor:
    out = labels.clone()
    out[:1] = IGNORE_INDEX
    return out


class DataReport:
    """Totals of samples, truncations, skips, media (frames, visual tokens, image samples) and, for packed
    batches, packing (rows, tokens, capacity, samples) over the batches a trainer consumed.

    ``load_skips`` are the dataset's load-time counts (malformed records), counted once.
    With several ranks each counts its own batches, and ``gather`` (every rank's object, in rank order:
    ``accelerate.utils.gather_object([obj])``) makes every report the run's: ``state_dict``, ``totals``,
    ``media_totals`` and ``end_epoch`` are then collectives that every rank calls. ``state_dict`` goes
    into checkpoints, so a resumed run's counts continue where the checkpoint left them.
    """

    def __init__(self, load_skips: Mapping[str, int] | None = None,
                 gather: Callable[[Any], list[Any]] | None = None):
        self.load_skips = Counter(load_skips or {})
        self.gather = gather or (lambda obj: [obj])
        self.total = self._empty()
        self.epoch = self._empty()

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"samples": 0, "truncated": 0, "skips": Counter(), "media": Counter(), "packing": Counter()}

    def update(self, batch: Mapping[str, Any]) -> None:
        for counts in (self.total, self.epoch):
            counts["samples"] += batch["num_samples"]
            counts["truncated"] += batch["num_truncated"]
            counts["skips"].update(batch["skips"])
            counts["media"].update(batch.get("media", {}))
            counts["packing"].update(batch.get("packing", {}))

    def state_dict(self) -> dict[str, Any]:
        """The run's and the current epoch's counts so far, summed over ranks (load-time skips apart: each run
        recounts them)."""
        ranks = self.gather({"total": self._plain(self.total), "epoch": self._plain(self.epoch)})
        return {part: self._plain(self._sum(rank[part] for rank in ranks)) for part in ("total", "epoch")}

    @staticmethod
    def _plain(counts: Mapping[str, Any]) -> dict[str, Any]:
        return {**counts, **{key: dict(counts[key]) for key in ("skips", "media", "packing")}}

    @classmethod
    def _sum(cls, parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        out = cls._empty()
        for counts in parts:  # checkpoints written before media or packing were counted have none
            out["samples"] += counts["samples"]
            out["truncated"] += counts["truncated"]
            for key in ("skips", "media", "packing"):
                out[key].update(counts.get(key, {}))
        return out

    def load_state_dict(self, state: Mapping[str, Any], main: bool = True) -> None:
        """Continue from a checkpoint's counts (already the run's): on the main process; another rank
        (``main=False``) starts from zero, so that the sum over ranks continues them once."""
        for part in ("total", "epoch"):
            setattr(self, part, self._sum([state[part]] if main else []))

    def totals(self) -> dict[str, Any]:
        """Run totals: ``{samples, truncated, skips: {reason: n}}``, load-time skips included."""
        total = self.state_dict()["total"]
        return {"samples": total["samples"], "truncated": total["truncated"],
                "skips": dict(Counter(total["skips"]) + self.load_skips)}

    def media_totals(self) -> dict[str, int]:
        """Run totals of what the samples showed the model: ``{frames, visual_tokens, images}``."""
        media = self.state_dict()["total"]["media"]
        return {key: media.get(key, 0) for key in ("frames", "visual_tokens", "images")}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Log and return this epoch's counts (the run's), then start counting the next epoch."""
        counts = self.state_dict()["epoch"]
        media, packing = Counter(counts["media"]), Counter(counts["packing"])
        logger.info(
            "data epoch %d: %d samples (%d images), %d frames, %d visual tokens, %d truncated to max_txt_len, "
            "skipped %s (at load: %s)", epoch, counts["samples"], media["images"], media["frames"],
            media["visual_tokens"], counts["truncated"], counts["skips"] or "none", dict(self.load_skips) or "none",
        )
        if packing["rows"]:
            logger.info("data epoch %d: packed into %d rows, %.1f%% of their slots filled", epoch, packing["rows"],
                        100 * packing["tokens"] / packing["capacity"])
        self.epoch = self._empty()
        return counts

    def track(self, batches: Iterable[Mapping[str, Any]], epoch: int) -> Iterator[Mapping[str, Any]]:
        """Yield the batches, counting each, and report the epoch when they run out."""
        for batch in batches:
            self.update(batch)
            yield batch
        self.end_epoch(epoch)
