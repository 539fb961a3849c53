"""Qwen2.5-VL and Qwen3-VL inputs: decoded frames -> the model's inputs, exactly as HF's processors compute them.

The two families share HF's processors (``Qwen2VLImageProcessor``; ``Qwen2VLVideoProcessor`` for
``qwen2_5_vl``, ``Qwen3VLVideoProcessor`` for ``qwen3_vl``), so the work is done by those objects,
called through their public methods: ``sample_frames`` chooses the frames, the processor's own
call resizes, normalises and patchifies them. What is ours:

- the **frame budget** (:class:`FrameBudget`): ``fps`` or ``num_frames``, ``min_frames``/``max_frames``,
  ``min_pixels``/``max_pixels`` (the processors' ``size["shortest_edge"]``/``size["longest_edge"]``),
  ``cap_pixels_per_frame``/``max_video_tokens``, each unset field taken from the checkpoint's processor,
  recorded as plain JSON, and refused where the processor would silently override it;
- **decoding only the chosen frames** (:func:`select_frames`, then the project's decoders), where HF's
  processor decodes the whole video and then samples: the same indices, fewer frames decoded;
- the **prompt** (:func:`expand_placeholders`): ``<|video_pad|>``/``<|image_pad|>`` expanded as the
  family's ``ProcessorMixin`` subclass expands them, so tokenizing the whole text gives HF's ``input_ids``.

What a pixel budget means differs by family: Qwen2.5-VL's bounds each frame's pixels, Qwen3-VL's
bounds the pixels of the whole clip (``num_frames x H x W``), as their ``smart_resize`` functions do.
torchvision is needed by HF's video processors; it is imported only when a processor is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from tc_llava.model.hf_compat import qwen3_vl_drops_video_wrapper

MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")
# HF's video processor class of each family (its checkpoints' ``video_processor_type``).
VIDEO_PROCESSOR_TYPES = {"qwen2_5_vl": "Qwen2VLVideoProcessor", "qwen3_vl": "Qwen3VLVideoProcessor"}


@dataclass(frozen=True)
class QwenTokens:
    """The placeholder tokens, read from a tokenizer as HF's Qwen processors read them (defaults: Qwen's own)."""

    image: str = "<|image_pad|>"
    video: str = "<|video_pad|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> QwenTokens:
        """A tokenizer that declares ``image_token`` etc. (``extra_special_tokens``) overrides the defaults."""
        return cls(**{field.name: getattr(tokenizer, f"{field.name}_token", field.default)
                      for field in dataclasses.fields(cls)})


# ---------------------------------------------------------------------------------------------- the budget
_COUNTS = ("num_frames", "min_frames", "max_frames", "min_pixels", "max_pixels", "max_video_tokens")


@dataclass(frozen=True)
class FrameBudget:
    """How many frames a video gives and how many pixels each keeps; ``None`` = the checkpoint's processor's value.

    ``fps`` (frames sampled per second of video, bounded by ``min_frames``/``max_frames`` and the video's
    length) and ``num_frames`` (a fixed count) are the two sampling modes of HF's ``sample_frames``; one is
    used. ``min_pixels``/``max_pixels`` are the video processor's ``size["shortest_edge"]``/
    ``size["longest_edge"]``: per frame for ``qwen2_5_vl``, per clip for ``qwen3_vl``.
    ``cap_pixels_per_frame``/``max_video_tokens`` are HF's qwen-vl-utils-style total cap (unset: off, as
    transformers 5.17-5.24 treat an unset value). :func:`resolve_budget` fills the unset fields and refuses
    what the processor would override; :meth:`to_json` is what exports and ``results.json`` record.
    """

    fps: float | None = None
    num_frames: int | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    cap_pixels_per_frame: bool | None = None
    max_video_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, Real)
                                     or not math.isfinite(self.fps) or self.fps <= 0):
            raise ValueError(f"frame budget: fps must be a number > 0 (frames per second), got {self.fps!r}")
        for name in _COUNTS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"frame budget: {name} must be an integer >= 1, got {value!r}")
        if self.cap_pixels_per_frame is not None and not isinstance(self.cap_pixels_per_frame, bool):
            raise ValueError(f"frame budget: cap_pixels_per_frame must be true or false, got "
                             f"{self.cap_pixels_per_frame!r}")
        if self.fps is not None and self.num_frames is not None:
            raise ValueError(f"frame budget: fps={self.fps} and num_frames={self.num_frames} are exclusive "
                             f"(HF's sample_frames refuses both); set one")
        if self.num_frames is not None and (self.min_frames is not None or self.max_frames is not None):
            raise ValueError(f"frame budget: min_frames/max_frames bound fps sampling only; with num_frames="
                             f"{self.num_frames} HF's sample_frames ignores them; unset them")
        if None not in (self.min_frames, self.max_frames) and self.min_frames > self.max_frames:
            raise ValueError(f"frame budget: min_frames={self.min_frames} > max_frames={self.max_frames} "
                             f"(HF's sample_frames would keep max_frames)")
        if None not in (self.min_pixels, self.max_pixels) and self.min_pixels > self.max_pixels:
            raise ValueError(f"frame budget: min_pixels={self.min_pixels} > max_pixels={self.max_pixels} "
                             f"(HF's smart_resize would keep max_pixels)")
        if self.cap_pixels_per_frame is False and self.max_video_tokens is not None:
            raise ValueError(f"frame budget: max_video_tokens={self.max_video_tokens} applies only with "
                             f"cap_pixels_per_frame=true")

    def to_json(self) -> dict[str, Any]:
        """Every field, ``None`` included: the record exports and ``results.json`` carry."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> FrameBudget:
        """The budget of a config group or a recorded :meth:`to_json`; unknown keys are refused."""
        data = dict(data or {})
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"frame budget: unknown field(s) {unknown}; expected some of {names}")
        return cls(**data)


def _processor_type(video_processor: Any) -> str:
    return type(video_processor).__name__


def _check_family(model_type: str, video_processor: Any) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a Qwen-VL family {MODEL_TYPES}")
    expected = VIDEO_PROCESSOR_TYPES[model_type]
    if _processor_type(video_processor) != expected:
        raise ValueError(f"{model_type}: the video processor must be HF's {expected}, got "
                         f"{_processor_type(video_processor)}")


def resolve_budget(model_type: str, video_processor: Any, budget: FrameBudget | None = None) -> FrameBudget:
    """``budget`` with every unset field taken from ``video_processor`` (the checkpoint's), then checked against it.

    Refused, one line naming the field, is every setting HF's processor would silently change:
    for ``qwen2_5_vl`` a ``num_frames``/``min_frames``/``max_frames`` that is not a multiple of
    ``temporal_patch_size`` (its ``sample_frames`` rounds them down) and a ``max_pixels`` below one merged
    patch (``smart_resize`` never goes below ``factor x factor``); for ``qwen3_vl`` a ``max_pixels`` below
    what ``max_frames`` frames of one merged patch take. Fewer frames than ``temporal_patch_size`` are refused
    too (HF's processors fail on them). An odd frame count is kept, as HF keeps it: the last frame is
    repeated to fill the last temporal patch (``patchify``), for both families.
    """
    _check_family(model_type, video_processor)
    budget = budget or FrameBudget()
    vp = video_processor
    tps, factor = vp.temporal_patch_size, vp.patch_size * vp.merge_size
    if budget.fps is not None or budget.num_frames is not None:
        fps, num_frames = budget.fps, budget.num_frames
    else:
        fps, num_frames = getattr(vp, "fps", None), getattr(vp, "num_frames", None)
        if (fps is None) == (num_frames is None):
            found = "both" if fps is not None else "neither"
            raise ValueError(f"frame budget: set fps or num_frames; {model_type}'s video processor sets {found} "
                             f"(fps={fps}, num_frames={num_frames})")
    sampling = {"min_frames": None, "max_frames": None}
    if fps is not None:
        sampling = {name: getattr(budget, name) or getattr(vp, name) for name in sampling}
    cap = budget.cap_pixels_per_frame
    cap = bool(getattr(vp, "cap_pixels_per_frame", None)) if cap is None else cap
    if not cap and budget.max_video_tokens is not None:
        raise ValueError(f"frame budget: max_video_tokens={budget.max_video_tokens} applies only with "
                         f"cap_pixels_per_frame=true ({model_type}'s video processor leaves it off)")
    try:
        resolved = FrameBudget(
            fps=fps, num_frames=num_frames, **sampling,
            min_pixels=budget.min_pixels or vp.size["shortest_edge"],
            max_pixels=budget.max_pixels or vp.size["longest_edge"],
            cap_pixels_per_frame=cap,
            max_video_tokens=(budget.max_video_tokens or vp.max_video_tokens) if cap else None,
        )
    except ValueError as e:  # a set field against an unset one: say where the other value came from
        raise ValueError(f"{e}; the fields left unset are {model_type}'s video processor's") from None
    fewest = resolved.num_frames if fps is None else resolved.min_frames
    field = "num_frames" if fps is None else "min_frames"
    if fewest < tps:
        raise ValueError(f"frame budget: {field}={fewest} is below {model_type}'s temporal_patch_size={tps}; "
                         f"its processor cannot take fewer frames")
    if model_type == "qwen2_5_vl":
        for name in ("num_frames", "min_frames", "max_frames"):
            value = getattr(resolved, name)
            if value is not None and value % tps:  # sample_frames rounds num_frames, floors the fps bounds
                kept = round(value / tps) * tps if name == "num_frames" else value // tps * tps
                raise ValueError(f"frame budget: {name}={value} is not a multiple of temporal_patch_size={tps}; "
                                 f"qwen2_5_vl's sample_frames would make it {kept}")
        if resolved.max_pixels < factor * factor:
            raise ValueError(f"frame budget: max_pixels={resolved.max_pixels} is below one merged patch "
                             f"({factor}x{factor}={factor * factor} pixels), the least qwen2_5_vl resizes a frame to")
    else:
        most = resolved.num_frames if fps is None else resolved.max_frames
        least = round(most / tps) * tps * factor * factor  # smart_resize: t_bar frames of at least factor x factor
        if not cap and resolved.max_pixels < least:
            raise ValueError(f"frame budget: max_pixels={resolved.max_pixels} is below {least}, what "
                             f"{most} frames of one {factor}x{factor} patch take; qwen3_vl's smart_resize would "
                             f"exceed it")
    return resolved


# ---------------------------------------------------------------------------------------- the processors
@dataclass(frozen=True)
class QwenVLPreprocessing:
    """A family's processors with the budget applied, and the resolved budget they apply.

    ``video_processor`` is a copy of the checkpoint's with the budget's fields and ``do_sample_frames=True``:
    saved (:func:`save_preprocessing`), HF's own ``AutoVideoProcessor`` given the whole video samples and
    preprocesses it exactly as :func:`select_frames` + :func:`video_inputs` do."""

    model_type: str
    image_processor: Any
    video_processor: Any
    budget: FrameBudget


def preprocessing(model_type: str, image_processor: Any, video_processor: Any,
                  budget: FrameBudget | None = None) -> QwenVLPreprocessing:
    """Apply ``budget`` (unset fields: the processor's own) to a copy of HF's ``video_processor``."""
    resolved = resolve_budget(model_type, video_processor, budget)
    settings = video_processor.to_dict()
    settings.update(
        fps=resolved.fps, num_frames=resolved.num_frames, do_sample_frames=True,
        size={"shortest_edge": resolved.min_pixels, "longest_edge": resolved.max_pixels},
        cap_pixels_per_frame=resolved.cap_pixels_per_frame,
        **{name: getattr(resolved, name) for name in ("min_frames", "max_frames", "max_video_tokens")
           if getattr(resolved, name) is not None},
    )
    return QwenVLPreprocessing(model_type, image_processor, type(video_processor)(**settings), resolved)


def load_preprocessing(path: str | Path, model_type: str, budget: FrameBudget | None = None) -> QwenVLPreprocessing:
    """The checkpoint's image and video processors (``AutoImageProcessor``/``AutoVideoProcessor``) with ``budget``."""
    try:
        import torchvision  # noqa: F401  HF's Qwen-VL video processors are torchvision-only
    except ImportError as e:
        raise ImportError(f"{model_type} video preprocessing needs torchvision (HF's "
                          f"{VIDEO_PROCESSOR_TYPES.get(model_type, 'video processor')}); install it from the lock "
                          f"({e})") from e
    from transformers import AutoImageProcessor, AutoVideoProcessor

    return preprocessing(model_type, AutoImageProcessor.from_pretrained(path),
                         AutoVideoProcessor.from_pretrained(path), budget)


def save_preprocessing(prep: QwenVLPreprocessing, out_dir: str | Path) -> None:
    """Write ``preprocessor_config.json`` and ``video_preprocessor_config.json`` (the budget applied) to ``out_dir``."""
    prep.image_processor.save_pretrained(out_dir)
    prep.video_processor.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------- frames -> inputs
def _metadata(total_frames: int, video_fps: float, frame_indices: Sequence[int] | None = None) -> Any:
    from transformers.video_utils import VideoMetadata

    if isinstance(total_frames, bool) or not isinstance(total_frames, int) or total_frames < 1:
        raise ValueError(f"total_frames must be an integer >= 1, got {total_frames!r}")
    if not video_fps or not video_fps > 0:
        raise ValueError(f"video_fps must be > 0 (the video's frame rate), got {video_fps!r}")
    indices = None if frame_indices is None else [int(i) for i in frame_indices]
    return VideoMetadata(total_num_frames=total_frames, fps=float(video_fps), frames_indices=indices)


def select_frames(prep: QwenVLPreprocessing, total_frames: int, video_fps: float) -> list[int]:
    """Indices (0-based, in presentation order) of the frames to decode from a video of ``total_frames`` at
    ``video_fps``: HF's own ``sample_frames`` of the family's video processor under the budget."""
    metadata = _metadata(total_frames, video_fps)
    tps = prep.video_processor.temporal_patch_size
    if total_frames < tps:
        raise ValueError(f"a video of {total_frames} frame(s) is shorter than {prep.model_type}'s "
                         f"temporal_patch_size={tps}")
    return [int(i) for i in prep.video_processor.sample_frames(metadata=metadata)]


def qwen3_timestamps(frame_indices: Sequence[int], video_fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds written before each temporal patch by ``Qwen3VLProcessor``: the mean of the patch's first and
    last frame times, the last index repeated to fill the last patch (its ``_calculate_timestamps``)."""
    indices = [int(i) for i in frame_indices]
    indices += indices[-1:] * (-len(indices) % temporal_patch_size)
    times = [i / video_fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


@dataclass(frozen=True)
class VideoInputs:
    """One video's model inputs: HF's ``pixel_values_videos`` rows and ``video_grid_thw`` row, and its time.

    ``second_per_grid_ts`` (``qwen2_5_vl``): seconds per temporal patch, ``temporal_patch_size`` over the
    sampled rate, as ``Qwen2_5_VLProcessor`` computes it. ``timestamps`` (``qwen3_vl``): one per temporal
    patch, written into the prompt by :meth:`placeholder`."""

    model_type: str
    pixel_values_videos: torch.Tensor  # [grid_t * grid_h * grid_w, C * temporal_patch_size * patch**2]
    video_grid_thw: torch.Tensor  # [1, 3] (grid_t, grid_h, grid_w), in patches
    merge_size: int
    frame_indices: tuple[int, ...]
    video_fps: float
    total_frames: int
    second_per_grid_ts: float | None = None
    timestamps: tuple[float, ...] | None = None

    @property
    def tokens_per_patch(self) -> int:
        """LLM tokens of one temporal patch (after the ``merge_size x merge_size`` merger)."""
        return int(self.video_grid_thw[0, 1:].prod()) // self.merge_size ** 2

    @property
    def num_tokens(self) -> int:
        """``<|video_pad|>`` tokens the video takes in the prompt."""
        return int(self.video_grid_thw[0, 0]) * self.tokens_per_patch

    @property
    def drops_wrapper(self) -> bool:
        """Whether the placeholder replaces the prompt's ``<|vision_start|><|video_pad|><|vision_end|>`` as a whole
        (``qwen3_vl`` from transformers 5.25 on), not only the ``<|video_pad|>``."""
        return self.timestamps is not None and qwen3_vl_drops_video_wrapper()

    def placeholder(self, tokens: QwenTokens = QwenTokens()) -> str:
        """What replaces the video's ``<|video_pad|>``: the pads (``qwen2_5_vl``), or per temporal patch
        ``<{t:.1f} seconds>`` + ``<|vision_start|>`` + pads + ``<|vision_end|>`` (``qwen3_vl``; the prompt's own
        ``<|vision_start|>``/``<|vision_end|>`` around the placeholder stay before transformers 5.25 and go with
        it from 5.25 on, :attr:`drops_wrapper`, as in the installed release's processor)."""
        if self.timestamps is None:
            return tokens.video * self.num_tokens
        patch = tokens.vision_start + tokens.video * self.tokens_per_patch + tokens.vision_end
        return "".join(f"<{t:.1f} seconds>" + patch for t in self.timestamps)


def video_inputs(prep: QwenVLPreprocessing, frames: np.ndarray | Sequence[Any], frame_indices: Sequence[int],
                 video_fps: float, total_frames: int) -> VideoInputs:
    """Decoded frames (``uint8 [T, H, W, 3]`` or T PIL images, those of ``frame_indices`` in a video of
    ``total_frames`` at ``video_fps``) -> the family's video inputs, by HF's video processor itself."""
    if len(frames) != len(frame_indices):
        raise ValueError(f"video_inputs: {len(frames)} frames but {len(frame_indices)} frame indices")
    metadata = _metadata(total_frames, video_fps, frame_indices)
    vp = prep.video_processor
    out = vp(videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt")
    common = dict(model_type=prep.model_type, pixel_values_videos=out["pixel_values_videos"],
                  video_grid_thw=out["video_grid_thw"], merge_size=vp.merge_size,
                  frame_indices=tuple(metadata.frames_indices), video_fps=metadata.fps, total_frames=total_frames)
    if prep.model_type == "qwen2_5_vl":
        return VideoInputs(**common, second_per_grid_ts=vp.temporal_patch_size / metadata.sampled_fps)
    return VideoInputs(**common, timestamps=tuple(qwen3_timestamps(metadata.frames_indices, metadata.fps,
                                                                   vp.temporal_patch_size)))


@dataclass(frozen=True)
class ImageInputs:
    """One still image's model inputs: HF's ``pixel_values`` rows and ``image_grid_thw`` row."""

    pixel_values: torch.Tensor  # [grid_h * grid_w, C * temporal_patch_size * patch**2] (grid_t = 1)
    image_grid_thw: torch.Tensor  # [1, 3]
    merge_size: int

    @property
    def num_tokens(self) -> int:
        """``<|image_pad|>`` tokens the image takes in the prompt."""
        return int(self.image_grid_thw[0].prod()) // self.merge_size ** 2

    def placeholder(self, tokens: QwenTokens = QwenTokens()) -> str:
        return tokens.image * self.num_tokens


def image_inputs(prep: QwenVLPreprocessing, image: Any) -> ImageInputs:
    """A still image (PIL or ``uint8 [H, W, 3]``) -> its inputs, by the checkpoint's image processor itself."""
    ip = prep.image_processor
    out = ip(images=[image], return_tensors="pt")
    return ImageInputs(out["pixel_values"], out["image_grid_thw"], ip.merge_size)


def expand_placeholders(text: str, videos: Sequence[VideoInputs] = (), images: Sequence[ImageInputs] = (),
                        tokens: QwenTokens = QwenTokens()) -> str:
    """``text`` with its i-th ``<|video_pad|>`` replaced by ``videos[i]``'s placeholder and its i-th
    ``<|image_pad|>`` by ``images[i]``'s, in one left-to-right pass as ``ProcessorMixin`` replaces them.

    A count that does not match (placeholders in the text vs inputs given) is refused."""
    for token, given, kind in ((tokens.video, videos, "videos"), (tokens.image, images, "images")):
        found = text.count(token)
        if found != len(given):
            raise ValueError(f"the prompt has {found} {token} placeholder(s) but {len(given)} {kind} were given")
    if any(video.drops_wrapper for video in videos):  # 5.25's Qwen3VLProcessor: the wrapper goes with the pad
        text = text.replace(tokens.vision_start + tokens.video + tokens.vision_end, tokens.video)
    queues = {tokens.video: iter(videos), tokens.image: iter(images)}
    pattern = "|".join(re.escape(token) for token in queues)
    return re.sub(pattern, lambda m: next(queues[m.group()]).placeholder(tokens), text)


def vision_kwargs(videos: Sequence[VideoInputs] = (), images: Sequence[ImageInputs] = ()) -> dict[str, torch.Tensor]:
    """The visual model kwargs of a batch, in prompt order, as HF's processor returns them: ``pixel_values``
    and ``image_grid_thw``, ``pixel_values_videos`` and ``video_grid_thw`` (rows concatenated), and for
    ``qwen2_5_vl`` ``second_per_grid_ts`` (one per video)."""
    kwargs: dict[str, torch.Tensor] = {}
    if images:
        kwargs["pixel_values"] = torch.cat([image.pixel_values for image in images])
        kwargs["image_grid_thw"] = torch.cat([image.image_grid_thw for image in images])
    if videos:
        kwargs["pixel_values_videos"] = torch.cat([video.pixel_values_videos for video in videos])
        kwargs["video_grid_thw"] = torch.cat([video.video_grid_thw for video in videos])
        seconds = [video.second_per_grid_ts for video in videos]
        if None not in seconds:
            kwargs["second_per_grid_ts"] = torch.tensor(seconds)
    return kwargs


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """``input_ids``' modality per token as HF's processor marks it for ``get_rope_index``: 0 text, 1 image pad,
    2 video pad (``ProcessorMixin.create_mm_token_type_ids``; timestamps and vision start/end are text)."""
    types = torch.zeros_like(input_ids)
    types[input_ids == image_token_id] = 1
    types[input_ids == video_token_id] = 2
    return types


# ---------------------------------------------------------------------------------------- tiny checkpoints
# Qwen2-VL's chat template, which the Qwen2.5-VL checkpoints ship: a default system turn, media as
# <|vision_start|><pad><|vision_end|> where the message puts them.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-Instruct's rendering of system, user and assistant turns with text, images and videos (no default
# system turn); its tool-calling and reasoning branches are left out of the tiny checkpoints.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TEMPLATES = {"qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE, "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE}
# Normalisation of each family's vision tower (its checkpoints' image_mean/image_std).
_MEAN_STD = {"qwen2_5_vl": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
             "qwen3_vl": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])}


def tiny_preprocessing(model_type: str, vision_config: Any, budget: FrameBudget | None = None) -> QwenVLPreprocessing:
    """The processors a tiny checkpoint of ``model_type`` ships: the family's processor classes at the tower's
    ``patch_size``/``temporal_patch_size``/``spatial_merge_size``, the family's mean/std, and small pixel
    budgets (images up to 16 merged patches; videos 2 fps, 4-16 frames, up to 4 merged patches a frame),
    then ``budget`` on top."""
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        raise ImportError(f"a tiny {model_type} checkpoint's video processor needs torchvision ({e})") from e
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a Qwen-VL family {MODEL_TYPES}")
    mean, std = _MEAN_STD[model_type]
    shape = dict(patch_size=vision_config.patch_size, temporal_patch_size=vision_config.temporal_patch_size,
                 merge_size=vision_config.spatial_merge_size, image_mean=mean, image_std=std)
    patch = (vision_config.patch_size * vision_config.spatial_merge_size) ** 2
    image = Qwen2VLImageProcessor(**shape, size={"shortest_edge": patch, "longest_edge": 16 * patch})
    frames = dict(fps=2.0, min_frames=4, max_frames=16, cap_pixels_per_frame=False)
    if model_type == "qwen2_5_vl":  # per frame
        video = Qwen2VLVideoProcessor(**shape, **frames, size={"shortest_edge": patch, "longest_edge": 4 * patch})
    else:  # per clip
        video = Qwen3VLVideoProcessor(**shape, **frames, size={"shortest_edge": 4 * patch, "longest_edge": 64 * patch})
    return preprocessing(model_type, image, video, budget)


def save_tiny_processors(out_dir: str | Path, model_type: str, tokenizer: Any, vision_config: Any,
                         budget: FrameBudget | None = None) -> QwenVLPreprocessing:
    """Write what a tiny checkpoint of ``model_type`` ships beside its weights: ``preprocessor_config.json``,
    ``video_preprocessor_config.json`` (:func:`tiny_preprocessing`) and ``tokenizer`` with the family's chat
    template (checkpoints carry the template in the tokenizer). The tokenizer must hold the Qwen tokens."""
    tokens = QwenTokens.from_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    missing = [token for token in (*dataclasses.astuple(tokens), "<|im_start|>", "<|im_end|>") if token not in vocab]
    if missing:
        raise ValueError(f"tiny {model_type} checkpoint: the tokenizer lacks the special token(s) {missing}")
    prep = tiny_preprocessing(model_type, vision_config, budget)
    save_preprocessing(prep, out_dir)
    tokenizer.chat_template = CHAT_TEMPLATES[model_type]
    tokenizer.save_pretrained(out_dir)
    return prep
