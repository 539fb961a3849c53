"""The SFT dataset: VideoChat2-IT and LLaVA records from a corpus registry, mixed by weight.

Record formats
--------------
* ``videochat2`` (PLLaVA's training data): ``{video|image, QA: [{i, q, a}], start?, end?}``.
  Each QA item is one user/assistant turn. As in PLLaVA / VideoChat2 (``process_qa``), the
  instruction ``i`` of the first QA item (after the optional QA shuffle) is appended to the
  system prompt; the others' ``i`` are not used. An empty ``q`` leaves the user turn empty
  (caption corpora). ``start``/``end`` (seconds) bound the frames.
* ``llava``: ``{id, image|video, conversations: [{from: human|gpt, value}]}``, strictly
  alternating from ``human``. ``<image>``/``<video>`` may appear only in the first human turn.

Either way the sample gets one placeholder (the model's ``<image>`` or ``<video>``, followed by
``"\\n"``) before the first user text, which the tokenization expands to the sample's visual
token count. A video gets ``num_frames`` frames (or its corpus's own ``num_frames``); a still
image gets ``image_frames`` (1: an image is one frame; ``None``: repeated to ``num_frames``, as
PLLaVA does). A record without a media key is malformed: every sample has one video or image.

Mixture and epochs
------------------
An epoch is ``epoch_size`` samples (default: the total number of usable records). Corpus
``k`` gets ``round(w_k / sum(w) * epoch_size)`` positions (largest remainder), spread in a
shuffled order; within a corpus records follow a fresh permutation, restarted when used
up (a corpus weighted above its size repeats records, one weighted below sees a new subset
each epoch). Everything is a function of ``(seed, epoch)``: call ``set_epoch`` before each
epoch's iterator is created (DataLoader workers copy the dataset then, so not with
``persistent_workers=True``). The order is already shuffled: use a sequential sampler, or a
distributed one without shuffling.
A ``weight`` of ``null`` means "proportional to the corpus size" (plain concatenation, PLLaVA).

Errors
------
``on_error="raise"``: a malformed record (checked for all records when the JSON is loaded)
raises ``RecordError`` naming the JSON file, record index and field; an unreadable sample
raises ``SampleError`` naming the media file, JSON file and record index.
``on_error="skip"``: malformed records are left out at load and counted (``load_skips``); an
unreadable sample is replaced by a deterministic other position (a function of seed, epoch,
index and attempt), and the sample carries the skip in its ``skipped`` list so that the
counts survive DataLoader workers; the collator sums them per batch and ``DataReport``
(collate.py) totals them for the trainer.
Reasons: ``malformed_record``, ``missing_file``, ``zero_frames``, ``unreadable_media``,
``not_a_regular_file`` (a named pipe or device, refused unopened: reading it could block
forever) and ``decode_timeout`` (the decode outlived ``decode_timeout`` seconds).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tc_llava.data.files import EncodingError, read_text
from tc_llava.data.inputs import Clip, ClipEncoder, model_inputs
from tc_llava.data.templates import Template, check_chat_template, get_template, image_token_of
from tc_llava.data.video import (DECODE_TIMEOUT, IMAGE_SUFFIXES, DecodeTimeoutError, NotRegularFileError,
                                 VideoReadError, read_frames, sample_frames)

logger = logging.getLogger(__name__)

CORPUS_TYPES = ("videochat2", "llava")
ON_ERROR = ("raise", "skip")
PLACEHOLDERS = ("<image>", "<video>")
# Skip reasons, the keys of every count this module reports.
MALFORMED = "malformed_record"
MISSING = "missing_file"
ZERO_FRAMES = "zero_frames"
UNREADABLE = "unreadable_media"
NOT_A_FILE = "not_a_regular_file"  # a named pipe or device: never opened, it could block forever
TIMEOUT = "decode_timeout"


class DataError(ValueError):
    """Bad training data, named down to the file and record.

    A DataLoader worker's exception reaches the trainer rebuilt from one string, the
    worker's whole traceback with the message on its last line; rebuilt so, the error's
    text is that last line again and ``worker_traceback`` keeps the rest.
    """

    def __init__(self, message: str):
        self.worker_traceback = None
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            self.worker_traceback = message
            message = message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        super().__init__(message)


class RecordError(DataError):
    """A JSON record that does not have the expected structure."""


class SampleError(DataError):
    """A record whose media could not be turned into a sample; ``skip`` says which and why."""

    def __init__(self, message: str, skip: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.skip = dict(skip or {})


@dataclass(frozen=True)
class Corpus:
    """One registry entry: a JSON list of records and the folder its media paths are relative to."""

    name: str
    json: str
    media_root: str
    type: str
    weight: float | None = None
    num_frames: int | None = None  # frames of this corpus's videos (None: the dataset's num_frames)


@dataclass(frozen=True)
class Record:
    media: str  # absolute or cwd-relative path
    turns: tuple[tuple[str, str, str], ...]  # (question, answer, instruction), no placeholder
    bound: tuple[float, float] | None

    @property
    def is_image(self) -> bool:
        return os.path.splitext(self.media)[1].lower() in IMAGE_SUFFIXES


def _is_positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _has_placeholder(text: str) -> bool:
    return any(p in text for p in PLACEHOLDERS)


def _strip_placeholders(text: str) -> str:
    for p in PLACEHOLDERS:
        text = text.replace(p, "")
    return text.strip()


def _media_key(raw: Mapping[str, Any]) -> str:
    for key in ("video", "image"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise RecordError(f"'{key}' must be a non-empty string path, got {raw[key]!r}")
            return raw[key]
    raise RecordError("has no 'video' or 'image' key (every sample needs one video or image)")


def _parse_videochat2(raw: Mapping[str, Any]) -> tuple[tuple[str, str, str], ...]:
    qa = raw.get("QA")
    if not isinstance(qa, list) or not qa:
        raise RecordError(f"'QA' must be a non-empty list of {{i, q, a}}, got {type(qa).__name__}")
    turns = []
    for k, item in enumerate(qa):
        if not isinstance(item, dict):
            raise RecordError(f"QA[{k}] must be an object {{i, q, a}}, got {type(item).__name__}")
        fields = {"i": item.get("i", ""), "q": item.get("q"), "a": item.get("a")}
        for field, value in fields.items():
            if not isinstance(value, str):
                raise RecordError(f"QA[{k}].{field} must be a string, got {type(value).__name__}")
            if _has_placeholder(value):
                raise RecordError(f"QA[{k}].{field} contains a media placeholder; the loader adds it")
        turns.append((fields["q"], fields["a"], fields["i"]))
    return tuple(turns)


def _parse_llava(raw: Mapping[str, Any]) -> tuple[tuple[str, str, str], ...]:
    conv = raw.get("conversations")
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        raise RecordError("'conversations' must be a non-empty list of human/gpt pairs")
    values = []
    for k, msg in enumerate(conv):
        expected = "human" if k % 2 == 0 else "gpt"
        if not isinstance(msg, dict) or msg.get("from") != expected or not isinstance(msg.get("value"), str):
            raise RecordError(f"conversations[{k}] must be {{'from': '{expected}', 'value': str}}, got {msg!r:.80}")
        if k and _has_placeholder(msg["value"]):
            raise RecordError(f"conversations[{k}] has a media placeholder; only the first human turn may")
        values.append(msg["value"])
    values[0] = _strip_placeholders(values[0])
    return tuple((values[k], values[k + 1], "") for k in range(0, len(values), 2))


def parse_record(raw: Any, record_type: str, media_root: str) -> Record:
    """One ``videochat2`` or ``llava`` record (module comment), its media path under ``media_root``; a
    :class:`RecordError` names the field that is wrong."""
    if not isinstance(raw, dict):
        raise RecordError(f"must be a JSON object, got {type(raw).__name__}")
    media = os.path.join(media_root, _media_key(raw))
    turns = _parse_videochat2(raw) if record_type == "videochat2" else _parse_llava(raw)
    bound = None
    if "start" in raw or "end" in raw:
        start, end = raw.get("start"), raw.get("end")
        if not (_is_number(start) and _is_number(end) and start < end):
            raise RecordError(f"'start'/'end' must both be numbers (seconds) with start < end, got {start!r}, {end!r}")
        bound = (float(start), float(end))
    return Record(media, turns, bound)


def system_prompt(template: Template, system: str | None, instruction: str) -> str:
    """A sample's system prompt: ``system`` (None: the template's) with the first turn's VideoChat2-IT
    instruction ``i`` appended, as PLLaVA's ``process_qa`` does."""
    system = template.system if system is None else system
    return f"{system} {instruction}".strip() if instruction else system


def read_records(path: str, where: str) -> list[Any]:
    """The JSON list of records in ``path``, or a :class:`DataError` that begins with ``where``."""
    try:
        raw = json.loads(read_text(path))
    except EncodingError as e:
        raise DataError(f"{where}: {e}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: cannot read {path}: {e}") from None
    if not isinstance(raw, list):
        raise DataError(f"{where}: {path} must hold a JSON list of records")
    return raw


def _corpus(name: str, spec: Mapping[str, Any]) -> Corpus:
    missing = {"json", "media_root", "type"} - set(spec)
    if missing:
        raise ValueError(f"corpus {name!r}: missing fields {sorted(missing)} (expected json, media_root, type, weight, "
                         "num_frames)")
    if spec["type"] not in CORPUS_TYPES:
        raise ValueError(f"corpus {name!r}: type must be one of {CORPUS_TYPES}, got {spec['type']!r}")
    weight = spec.get("weight")
    if weight is not None and not (_is_number(weight) and weight >= 0):
        raise ValueError(f"corpus {name!r}: weight must be a number >= 0 or null, got {weight!r}")
    num_frames = spec.get("num_frames")
    if num_frames is not None and not _is_positive_int(num_frames):
        raise ValueError(f"corpus {name!r}: num_frames must be a positive integer or null, got {num_frames!r} "
                         f"(data.corpora.{name}.num_frames)")
    corpus = Corpus(name, str(spec["json"]), str(spec["media_root"]), spec["type"], weight, num_frames)
    if not os.path.isfile(corpus.json):
        raise FileNotFoundError(f"corpus {name!r}: json {corpus.json} not found (data.corpora.{name}.json)")
    if not os.path.isdir(corpus.media_root):
        raise FileNotFoundError(
            f"corpus {name!r}: media_root {corpus.media_root} is not a directory (data.corpora.{name}.media_root)")
    return corpus


def check_sources(corpora: Mapping[str, Mapping[str, Any]], num_frames: int,
                  select: Sequence[str] | None = None) -> list[Corpus]:
    """The selected registry entries, checked down to their files, and the frame count.

    Cheap (no JSON is parsed), so trainers call it before loading a model.
    """
    if not _is_positive_int(num_frames):
        raise ValueError(f"data.num_frames must be a positive integer (frames sampled per video), got {num_frames!r}")
    names = list(corpora) if select is None else list(select)
    unknown = sorted(set(names) - set(corpora))
    if unknown:
        raise ValueError(f"select names corpora {unknown} that the registry lacks; it has {sorted(corpora)}")
    return [_corpus(name, corpora[name]) for name in names]


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


class SFTDataset(torch.utils.data.Dataset):
    """Samples ``{input_ids, attention_mask, labels, pixel_values [T,C,H,W], num_frames, num_visual_tokens,
    truncated}`` (:func:`~tc_llava.data.inputs.model_inputs`) with ``is_image``, ``skipped`` and ``source``;
    ``T`` may differ between samples (images, corpora of their own frame counts)."""

    def __init__(
        self,
        corpora: Mapping[str, Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        num_visual_tokens: int | Callable[[int], int],
        num_frames: int,
        template: str = "vicuna_v1",
        system: str | None = None,
        max_txt_len: int | None = 512,
        on_error: str = "raise",
        train: bool = True,
        shuffle_qa: bool = False,
        seed: int = 0,
        epoch_size: int | None = None,
        select: Sequence[str] | None = None,
        backend: str = "decord",
        decode_threads: int = 1,
        max_retries: int = 10,
        image_frames: int | None = None,
        decode_timeout: float | None = DECODE_TIMEOUT,
    ):
        """``corpora``: registry name -> {json, media_root, type, weight, num_frames?}; ``select`` picks
        names (default all). ``image_processor`` turns frames into ``pixel_values`` (the model's
        ``frame_processor``); ``num_visual_tokens`` is the model's ``tokens_per_video`` (a frame
        count -> its placeholder tokens), or one count when every sample has ``num_frames``
        frames. ``train`` samples frames randomly (seeded per sample) and shuffles QA turns if
        ``shuffle_qa`` (PLLaVA does); otherwise segment middles, records in order.
        ``system=None`` uses the template's system prompt. ``decode_timeout`` (seconds, None: none) bounds
        one sample's decode; past it the sample fails like an unreadable one (reason ``decode_timeout``)."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if image_frames is not None and not _is_positive_int(image_frames):
            raise ValueError(f"data.image_frames must be a positive integer or null, got {image_frames!r}")
        self.corpora = check_sources(corpora, num_frames, select)
        self.template = get_template(template)
        check_chat_template(tokenizer, self.template)
        self.image_token = image_token_of(tokenizer)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_visual_tokens = num_visual_tokens
        self.num_frames = num_frames
        self.image_frames = image_frames
        self.system = system
        self.max_txt_len = max_txt_len
        self.on_error = on_error
        self.train = train
        self.shuffle_qa = shuffle_qa
        self.seed = seed
        self.backend = backend
        self.decode_threads = decode_threads
        self.decode_timeout = decode_timeout
        self.max_retries = max_retries
        self.epoch = 0
        self.load_skips: Counter[str] = Counter()
        self._runtime_skips: Counter[str] = Counter()
        self.records = [self._load(c) for c in self.corpora]
        counts = {self.frames_of(c, r) for c, records in zip(self.corpora, self.records) for r in records}
        self.frame_counts = sorted(counts)
        if not callable(num_visual_tokens) and counts - {num_frames}:
            raise ValueError(f"num_visual_tokens={num_visual_tokens} is one count, for {num_frames} frames, but samples "
                             f"will have {sorted(counts)} frames (data.image_frames, corpora's num_frames): pass the "
                             "model's tokens_per_video")
        weights = []
        for corpus, records in zip(self.corpora, self.records):
            weight = len(records) if corpus.weight is None else corpus.weight
            if weight > 0 and not records:
                raise ValueError(f"corpus {corpus.name!r} ({corpus.json}) has weight {weight} but no usable records")
            weights.append(weight)
        self.weights = np.asarray(weights, dtype=float)
        if not self.weights.sum() > 0:
            raise ValueError(f"no corpus to sample from: weights {dict(zip([c.name for c in self.corpora], weights))}")
        self.epoch_size = sum(len(r) for r in self.records) if epoch_size is None else epoch_size
        self._plan_epoch: int | None = None
        self._plan: np.ndarray | None = None

    def _load(self, corpus: Corpus) -> list[Record]:
        """Parse and validate every record up front, so bad annotations surface before training."""
        raw = read_records(corpus.json, f"corpus {corpus.name!r}")
        records, bad = [], []
        for index, item in enumerate(raw):
            try:
                records.append(parse_record(item, corpus.type, corpus.media_root))
            except RecordError as e:
                if self.on_error == "raise":
                    raise RecordError(f"{corpus.json} record {index} (corpus {corpus.name!r}): {e}") from None
                bad.append(f"record {index}: {e}")
        if bad:
            self.load_skips[MALFORMED] += len(bad)
            logger.warning(
                "corpus %r: skipped %d malformed of %d records in %s; first: %s",
                corpus.name, len(bad), len(raw), corpus.json, "; ".join(bad[:3]),
            )
        return records

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose mixture order, frame draws and replacements are used."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.epoch_size

    def plan(self) -> np.ndarray:
        """``[epoch_size, 2]`` (corpus, record) of the current epoch; see the module docstring."""
        if self._plan is None or self._plan_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            quotas = _largest_remainder(self.weights, self.epoch_size)
            corpus_ids = np.repeat(np.arange(len(self.corpora)), quotas)
            rng.shuffle(corpus_ids)
            record_ids = np.zeros(self.epoch_size, dtype=np.int64)
            for k, quota in enumerate(quotas):
                if quota:
                    size = len(self.records[k])
                    laps = [rng.permutation(size) for _ in range(-(-quota // size))]
                    record_ids[corpus_ids == k] = np.concatenate(laps)[:quota]
            self._plan = np.stack([corpus_ids, record_ids], axis=1)
            self._plan_epoch = self.epoch
        return self._plan

    def source(self, index: int) -> tuple[str, int]:
        """(corpus name, record index) drawn for ``index`` in the current epoch."""
        k, r = self.plan()[index]
        return self.corpora[k].name, int(r)

    def skip_counts(self) -> dict[str, int]:
        """Skips seen by this process: load-time ones plus runtime ones (only all of them with
        ``num_workers=0``; with workers, total the batches' counts with ``DataReport``)."""
        return dict(self.load_skips + self._runtime_skips)

    def _sample_seed(self, position: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, position]).generate_state(1)[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.epoch_size:
            raise IndexError(f"index {index} out of range for an epoch of {self.epoch_size}")
        position, skipped = index, []
        for attempt in range(self.max_retries + 1):
            try:
                sample = self._build(position)
            except SampleError as e:
                if self.on_error == "raise":
                    raise
                logger.warning("skipping a sample: %s", e)
                skipped.append(e.skip)
                self._runtime_skips[e.skip["reason"]] += 1
                rng = np.random.default_rng([self.seed, self.epoch, index, attempt + 1])
                position = int(rng.integers(self.epoch_size))
                continue
            sample["skipped"] = skipped
            return sample
        raise RuntimeError(
            f"index {index}: {len(skipped)} replacement samples failed in a row; last: {skipped[-1]}"
        )

    def _build(self, position: int) -> dict[str, Any]:
        k, r = self.plan()[position]
        corpus, record = self.corpora[k], self.records[k][r]
        seed = self._sample_seed(position)
        turns = list(record.turns)
        if self.train and self.shuffle_qa and corpus.type == "videochat2":
            turns = [turns[i] for i in np.random.default_rng(seed).permutation(len(turns))]
        system = system_prompt(self.template, self.system, turns[0][2])
        question = turns[0][0]
        first = self.template.with_video(self.image_token, question) if question else \
            self.template.with_video(self.image_token, "").rstrip("\n")
        pairs = [(first, turns[0][1])] + [(q, a) for q, a, _ in turns[1:]]
        count = self.frames_of(corpus, record)
        frames, clip = self._frames(corpus, int(r), record, seed, count)
        inputs = model_inputs(self.tokenizer, self.image_processor, self.num_visual_tokens, self.template, frames,
                              pairs, system, self.max_txt_len, clip)
        return {**inputs, "is_image": record.is_image, "source": f"{corpus.name}:{r}"}

    def max_length(self) -> int | None:
        """The most tokens a sample can have: ``max_txt_len`` text tokens and the most visual tokens of any
        record's frame count (``None`` when ``max_txt_len`` is: text is not capped; and for a Qwen-VL model, whose
        visual tokens follow each video's length and resolution)."""
        if self.max_txt_len is None or not self.frame_counts or isinstance(self.image_processor, ClipEncoder):
            return None
        visual = self.num_visual_tokens
        return self.max_txt_len + max(visual(n) if callable(visual) else visual for n in self.frame_counts)

    def frames_of(self, corpus: Corpus, record: Record) -> int:
        """Frames a record's sample gets: ``image_frames`` for a still image, else its corpus's or the dataset's count."""
        if record.is_image and self.image_frames is not None:
            return self.image_frames
        return corpus.num_frames or self.num_frames

    def _frames(self, corpus: Corpus, index: int, record: Record, seed: int,
                count: int) -> tuple[np.ndarray, Clip | None]:
        """The record's frames: ``count`` of them by our sampling, or those a :class:`ClipEncoder` frame processor
        (Qwen-VL) chooses under its budget, with their :class:`Clip`."""
        def fail(reason: str, detail: str) -> SampleError:
            skip = {"reason": reason, "corpus": corpus.name, "json": corpus.json, "record": index, "file": record.media}
            where = f"record {index} of {corpus.json} (corpus {corpus.name!r})"
            return SampleError(f"{record.media}: {detail} [{reason}; {where}]", skip)

        if not os.path.exists(record.media):
            raise fail(MISSING, "no such file or directory")
        encoder = self.image_processor if isinstance(self.image_processor, ClipEncoder) else None
        try:
            if encoder is not None:
                frames, indices, fps, total = read_frames(record.media, encoder.frame_indices, backend=self.backend,
                                                          num_threads=self.decode_threads,
                                                          timeout=self.decode_timeout)
                count = len(indices)
            else:
                frames, _ = sample_frames(
                    record.media,
                    count,
                    strategy="random" if self.train else "middle",
                    bound=record.bound,
                    backend=self.backend,
                    seed=seed,
                    num_threads=self.decode_threads,
                    timeout=self.decode_timeout,
                )
        except NotRegularFileError as e:
            raise fail(NOT_A_FILE, e.reason) from e
        except DecodeTimeoutError as e:
            raise fail(TIMEOUT, e.reason) from e
        except VideoReadError as e:
            reason = ZERO_FRAMES if "no frames" in e.reason else UNREADABLE
            raise fail(reason, e.reason) from e
        if len(frames) != count:
            raise fail(ZERO_FRAMES if not len(frames) else UNREADABLE, f"decoded {len(frames)} of {count} frames")
        return frames, None if encoder is None else Clip(indices, fps, total)
