"""Batched, sharded, resumable video-prompt generation shared by every benchmark.

A benchmark turns its questions into :class:`Item` s (id, media, prompt text) and calls
:func:`generate_predictions`; it gets back one record per item, ``{"id", "item", "output",
"failed"}``, and scores them itself. What this module guarantees:

- **Batched**: frames are decoded in DataLoader workers (decoders opened inside them) while
  the model generates; prompts are left-padded and generated with the KV cache. Greedy
  outputs do not depend on the batch size.
- **Sharded**: under ``accelerate launch`` / ``torchrun`` every rank reads the cache, waits
  for the others, then takes a fixed stride of the items still to do, so the union of the
  ranks' outputs is what one process would produce.
- **Resumable**: each record is appended and flushed to ``{cache_dir}/{key}.rank{r}.jsonl``
  (:mod:`tc_llava.eval.jsonl`) as soon as it exists. ``key`` hashes the model and generation
  settings, and each record carries a hash of its item's inputs (media, prompt, bound), so a
  re-run with any world size skips finished items, and changed settings or prompts never
  reuse stale outputs.
- **Media failures are data**: an item whose media cannot be decoded is recorded with
  ``failed`` (the reason) and ``output`` None; the run goes on. Failed items are retried
  on the next run (decoding is cheap and the file may have been fixed).
- **So are prompts too long for the model**: an item whose tokens and ``max_new_tokens``
  exceed the model's context (``max_position_embeddings``) fails alone, before its media are
  decoded, with a ``PromptTooLong`` reason and ``retry`` false: a rerun does not try it again
  (its prompt and the model are in its cache key and digest; changing either retries it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tc_llava.data.collate import GRID_KEYS, SFTCollator
from tc_llava.data.inputs import Clip, ClipEncoder, budget_frames, encode_prompt, model_inputs, preprocess_frames
from tc_llava.data.templates import stop_token_ids
from tc_llava.data.video import DECODE_TIMEOUT, read_frames, sample_frames
from tc_llava.eval import jsonl

log = logging.getLogger(__name__)

DATA_TYPES = ("video", "gif", "frame")
SAMPLING = ("middle", "uniform")  # the deterministic strategies of tc_llava.data.video
TOO_LONG = "PromptTooLong"  # the reason of an item longer than the model's context (never retried)


@dataclass(frozen=True)
class Item:
    """One prompt about one video. ``prompt`` is the full template-rendered text with one placeholder."""

    id: str
    media: str
    prompt: str
    bound: tuple[float, float] | None = None
    data_type: str = "video"  # video | gif | frame (a folder of 00001.jpg, ...)


# GenerationSettings field -> its key in a benchmark config
CONFIG_KEYS = {"frame_fps": "decode.frame_fps", "backend": "decode.backend", "decode_threads": "decode.threads",
               "num_workers": "decode.num_workers", "decode_timeout": "decode.timeout"}


@dataclass(frozen=True)
class GenerationSettings:
    """How items become frames, tokens and outputs; everything but the throughput knobs is hashed."""

    num_frames: int = 16
    sampling: str = "middle"  # middle (segment middles) | uniform
    max_new_tokens: int = 100
    template: str = "vicuna_v1"
    frame_fps: float = 3.0
    batch_size: int = 8
    backend: str = "decord"
    decode_threads: int = 1
    num_workers: int = 2
    decode_timeout: float | None = DECODE_TIMEOUT  # seconds per item's decode; past it the item fails

    def __post_init__(self) -> None:
        for name, low in (("num_frames", 1), ("max_new_tokens", 1), ("batch_size", 1), ("decode_threads", 1),
                          ("num_workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"benchmark.{CONFIG_KEYS.get(name, name)}={value!r}: expected an integer >= {low}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"benchmark.sampling={self.sampling!r}: expected one of {SAMPLING}")
        if isinstance(self.frame_fps, bool) or not isinstance(self.frame_fps, (int, float)) or not self.frame_fps > 0:
            raise ValueError(f"benchmark.decode.frame_fps={self.frame_fps!r}: expected a number > 0 (frames per second)")
        timeout = self.decode_timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < float("inf")):
            raise ValueError(f"benchmark.decode.timeout={timeout!r}: expected a number of seconds > 0, or null")

    @classmethod
    def from_benchmark(cls, cfg: DictConfig) -> "GenerationSettings":
        """The settings a benchmark config names (``num_frames``, ..., ``decode.*``), checked."""
        values = {name: OmegaConf.select(cfg, key) for name, key in
                  ((name, CONFIG_KEYS.get(name, name)) for name in cls.__dataclass_fields__)}
        return cls(**values)

    def output_affecting(self) -> dict[str, Any]:
        """The fields outputs depend on (batch size and decoders are checked to not matter)."""
        throughput = ("batch_size", "backend", "decode_threads", "num_workers", "decode_timeout")
        return {k: v for k, v in asdict(self).items() if k not in throughput}


class _ItemFrames(Dataset):
    """Decodes and preprocesses one item per call, inside the DataLoader worker, by the two halves of
    :func:`~tc_llava.data.inputs.model_inputs`: a prompt too long for the context fails before its video is decoded.

    A Qwen-VL model (a :class:`~tc_llava.data.inputs.ClipEncoder` frame processor) takes the frames its budget
    chooses within the item's bound instead of ``num_frames``; its prompt's length follows the video, so the
    length check comes after decoding."""

    def __init__(self, items: Sequence[Item], settings: GenerationSettings, tokenizer: Any, image_processor: Any,
                 num_visual_tokens: int | None, max_length: int | None):
        self.items, self.settings = items, settings
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_visual_tokens = num_visual_tokens
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.items)

    def _too_long(self, item: Item, ids: torch.Tensor) -> dict[str, Any] | None:
        s = self.settings
        if self.max_length is not None and len(ids) + s.max_new_tokens > self.max_length:
            return {"id": item.id, "retry": False, "failed": (
                f"{TOO_LONG}: {len(ids)} prompt tokens + max_new_tokens {s.max_new_tokens} exceed the model's "
                f"context of {self.max_length} (max_position_embeddings)")}
        return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(self.image_processor, ClipEncoder):
            return self._clip_item(self.items[index])
        item, s = self.items[index], self.settings
        ids = encode_prompt(self.tokenizer, s.template, item.prompt, self.num_visual_tokens).input_ids
        too_long = self._too_long(item, ids)
        if too_long is not None:
            return too_long
        try:
            if item.data_type == "frame" and not Path(item.media).is_dir():
                raise ValueError(f"{item.media}: data type 'frame' expects a folder of 00001.jpg, ...")
            frames, _ = sample_frames(
                item.media, s.num_frames, s.sampling, item.bound, s.backend,
                fps=s.frame_fps if item.data_type == "frame" else None, num_threads=s.decode_threads,
                timeout=s.decode_timeout,
            )
        except ImportError:  # a missing decoder library is the setup's failure, not the item's
            raise
        except Exception as e:  # any decoder error is this item's failure, not the run's
            return {"id": item.id, "failed": f"{type(e).__name__}: {e}"}
        return {"id": item.id, "input_ids": ids, "pixel_values": preprocess_frames(self.image_processor, frames)}

    def _clip_item(self, item: Item) -> dict[str, Any]:
        s, encoder = self.settings, self.image_processor
        try:
            if item.data_type == "frame" and not Path(item.media).is_dir():
                raise ValueError(f"{item.media}: data type 'frame' expects a folder of 00001.jpg, ...")
            frames, indices, rate, total = read_frames(
                item.media, budget_frames(encoder, item.bound), s.backend,
                fps=s.frame_fps if item.data_type == "frame" else None, num_threads=s.decode_threads,
                timeout=s.decode_timeout)
            inputs = model_inputs(self.tokenizer, encoder, None, s.template, frames, item.prompt,
                                  clip=Clip(indices, rate, total))
        except ImportError:
            raise
        except Exception as e:
            return {"id": item.id, "failed": f"{type(e).__name__}: {e}"}
        too_long = self._too_long(item, inputs["input_ids"])
        if too_long is not None:
            return too_long
        return {"id": item.id, "input_ids": inputs["input_ids"], "num_frames": inputs["num_frames"],
                **{key: inputs[key] for key in GRID_KEYS if key in inputs}}


class _LeftPad:
    """Left-pads the decodable items of a batch as training's collator pads (``padding_side="left"``); failed
    ones travel beside them."""

    def __init__(self, pad_token_id: int):
        self.collator = SFTCollator(pad_token_id, padding_side="left")

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ok = [s for s in samples if "failed" not in s]
        failed = [(s["id"], s["failed"], s.get("retry", True)) for s in samples if "failed" in s]
        batch: dict[str, Any] = {"failed": failed, "ids": [s["id"] for s in ok]}
        if ok:
            padded = self.collator(ok)
            keys = ("input_ids", "attention_mask", "pixel_values", "num_frames", *GRID_KEYS)
            batch.update({key: padded[key] for key in keys if key in padded})
        return batch


def require_path(path: Path, kind: str, where: str, expected: str) -> None:
    """Raise one line naming the config field, the path and what belongs there, unless ``path`` is a ``kind``.

    ``kind`` is "file" or "directory". Benchmarks call it on their inputs before the model
    loads, so that a wrong path costs seconds rather than a 7B load.
    """
    if not (path.is_dir() if kind == "directory" else path.is_file()):
        problem = f"is not a {kind}" if path.exists() else "not found"
        raise FileNotFoundError(f"{where}: {path} {problem}; expected {expected}")


def weights_fingerprint(checkpoint: str) -> str | None:
    """Names, sizes and modification times of a checkpoint directory's weight files (None: not a directory).

    A model re-exported to the same path (``overwrite=true``, another run) is another model:
    its predictions must not be served from the cache of the one it replaced.
    """
    root = Path(checkpoint)
    if not root.is_dir():
        return None
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.iterdir())
             if p.suffix in (".safetensors", ".bin")]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:12]


def model_settings(model: Any) -> dict[str, Any]:
    """What identifies a model's outputs: checkpoint and its weight files, TC-LLaVA rules, dtype, attention backend,
    and (only when allowed) the weights it loaded without: ``weights_loading``."""
    checkpoint = str(getattr(model.config, "_name_or_path", ""))
    report = getattr(model, "weights_report", None) or {}
    allowed = {"weights_loading": report} if report.get("allow_missing_weights") else {}
    return {
        "checkpoint": checkpoint,
        "weights": weights_fingerprint(checkpoint) if checkpoint else None,
        "tc_llava": model.tc_settings(),
        **({"frame_budget": model.preprocessing.budget.to_json()} if getattr(model, "preprocessing", None) else {}),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": model.language_model.config._attn_implementation,
        **allowed,
    }


def cache_key(model: Any, settings: GenerationSettings) -> str:
    """12 hex digits naming the cache files of one (model, generation settings) combination."""
    text = json.dumps({"model": model_settings(model), "generation": settings.output_affecting()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def item_digest(item: Item) -> str:
    """Hash of an item's inputs: a record counts for the item only while media, prompt and bound are unchanged."""
    text = json.dumps([item.media, item.prompt, item.bound, item.data_type])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _with_id(record: Any) -> dict[str, Any]:
    """A cache record that has a usable id; KeyError/TypeError make its line unreadable."""
    hash(record["id"])  # an unhashable id (a list, an object) is as unusable as none
    return record


def read_records(cache_dir: str | os.PathLike, key: str) -> dict[str, list[dict[str, Any]]]:
    """Every rank file's records for ``key``, per item id; torn or unreadable lines are skipped."""
    records: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(cache_dir).glob(f"{key}.rank*.jsonl")):
        for record in jsonl.read(path, _with_id):
            records.setdefault(record["id"], []).append(record)
    return records


def _current(records: Sequence[Mapping[str, Any]], digest: str) -> Mapping[str, Any] | None:
    """The first success made from these inputs, else the latest failure, else None."""
    matching = [r for r in records if r.get("item") == digest]
    ok = [r for r in matching if r.get("failed") is None]
    return ok[0] if ok else (matching[-1] if matching else None)


def _retried(record: Mapping[str, Any]) -> bool:
    """A failure tried again on a rerun: media failures are (the file may have been fixed), a too-long prompt not."""
    return record["failed"] is not None and record.get("retry", True)


def _decode(tokenizer: Any, sequences: torch.Tensor, stops: list[int]) -> list[str]:
    texts = []
    for row in sequences.tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


@torch.no_grad()
def generate_predictions(
    model: Any,
    items: Sequence[Item],
    cache_dir: str | os.PathLike,
    settings: GenerationSettings,
    state: PartialState | None = None,
) -> dict[str, dict[str, Any]]:
    """``{id: {"id", "item", "output", "failed"}}`` for every item, generating only what the cache lacks.

    Every rank must call this with the same items; each returns the full, gathered records.
    """
    state = state or PartialState()
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"item ids must be unique; {len(ids) - len(set(ids))} repeat")
    bad = sorted({item.data_type for item in items} - set(DATA_TYPES))
    if bad:
        raise ValueError(f"item data_type {bad} not one of {DATA_TYPES}")
    key = cache_key(model, settings)
    cache_dir = Path(cache_dir)
    digests = {item.id: item_digest(item) for item in items}
    cached = read_records(cache_dir, key)
    state.wait_for_everyone()  # every rank has read the same cache before anyone appends
    done = {i: _current(cached.get(i, ()), digests[i]) for i in ids}
    todo = [item for item in items if done[item.id] is None or _retried(done[item.id])]
    mine = todo[state.process_index :: state.num_processes]
    if state.is_main_process:
        log.info("%s: %d of %d items cached, %d to generate on %d process(es)",
                 cache_dir / key, len(items) - len(todo), len(items), len(todo), state.num_processes)
    if mine:
        _generate(model, mine, digests, cache_dir / f"{key}.rank{state.process_index}.jsonl", settings, state)
    state.wait_for_everyone()
    cached = read_records(cache_dir, key)
    done = {i: _current(cached.get(i, ()), digests[i]) for i in ids}
    missing = [i for i, record in done.items() if record is None]
    if missing:
        raise RuntimeError(f"{cache_dir}: no record for {len(missing)} item(s) after generation, e.g. {missing[:3]}")
    return {i: dict(record) for i, record in done.items()}


def _generate(model: Any, items: Sequence[Item], digests: Mapping[str, str], path: Path, settings: GenerationSettings,
              state: PartialState) -> None:
    tokenizer = model.tokenizer
    if tokenizer is None or model.frame_processor is None:
        raise ValueError("the model has no tokenizer/image processor: its checkpoint must include them")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if settings.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the fast tokenizer runs in forked workers
    clips = isinstance(model.frame_processor, ClipEncoder)  # a Qwen-VL model: frames by its budget
    num_visual_tokens = None if clips else model.tokens_per_video(settings.num_frames)
    max_length = getattr(model.language_model.config, "max_position_embeddings", None)
    dataset = _ItemFrames(items, settings, tokenizer, model.frame_processor, num_visual_tokens, max_length)
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.num_workers,
                        collate_fn=_LeftPad(pad))
    stops = stop_token_ids(tokenizer, settings.template)
    device, dtype = state.device, next(model.parameters()).dtype
    out = jsonl.Appender(path)
    bar = tqdm(total=len(items), desc=f"generate (rank {state.process_index})", disable=not state.is_main_process)
    try:
        for batch in loader:
            for item_id, reason, retry in batch["failed"]:
                final = {} if retry else {"retry": False}
                out.write({"id": item_id, "item": digests[item_id], "output": None, "failed": reason, **final})
            if batch["ids"]:
                visual = {key: batch[key].to(device, dtype if key.startswith("pixel_values") else None)
                          for key in ("pixel_values", *GRID_KEYS) if key in batch}
                result = model.generate(
                    batch["input_ids"].to(device), batch["attention_mask"].to(device), num_frames=batch["num_frames"],
                    max_new_tokens=settings.max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad,
                    **visual,
                )
                for item_id, text in zip(batch["ids"], _decode(tokenizer, result.sequences, stops)):
                    out.write({"id": item_id, "item": digests[item_id], "output": text, "failed": None})
            bar.update(len(batch["ids"]) + len(batch["failed"]))
    finally:
        bar.close()
        out.close()
