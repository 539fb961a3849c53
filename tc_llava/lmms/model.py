"""``TCLlavaLMM``: a tc-llava export as an lmms-eval model, with its rules.

lmms-eval's stock ``llava_hf`` would load an export as plain LLaVA (vanilla RoPE, causal mask, no
pooling) without a word. This model loads through :meth:`TCLlava.from_pretrained`, so the rules
come from the checkpoint's ``config.json`` unless ``model_args`` override them (``rope=tad,
gamma=1.0, mask=frame_block_causal, pooling_shape=16x12x12``), and answers:

- ``generate_until`` through :func:`tc_llava.eval.runner.generate_predictions`: batched,
  left-padded, KV-cached greedy decoding of the checkpoint's chat template around the task's
  text, the output cut at the task's ``until`` strings. With ``cache_dir`` the generations are
  kept per rank and a re-run resumes; an undecodable video answers ``""`` and is logged.
- ``loglikelihood`` through the model's forward: the continuation's tokens scored after the
  prompt and the video, returned as lmms-eval's models return it (the mean negative
  log-likelihood of the continuation, lower is better: lmms-eval's ``multiple_choice`` scorer and
  its ``mcppl`` tasks take the argmin) with whether greedy decoding would produce it. Each pair
  travels in lmms-eval's :class:`GenerationResult`: 0.7.3's evaluator passes every model output
  through ``unwrap_generation_output``, which turns a bare ``(float, bool)`` into its ``str`` (and
  so breaks every ``multiple_choice`` task, for ``llava_hf`` too), but unwraps its own wrapper as is.

What the export was trained with is how it is asked: its prompts begin with the system text its
training prompts began with (recorded at export, ``tc_llava_frames.system``; ``system_prompt``
overrides it), and ``num_frames`` defaults to its training frame count.

Frames, as the task asks (:meth:`TCLlavaLMM._view`, logged once per task): the count is the task
yaml's ``metadata: {sample_frames: N}`` (the key lmms-eval's own ``llava_onevision`` reads), else its
``generation_kwargs`` ``num_frames`` / ``max_num_frames`` / ``frame_num``, else ``num_frames``. The
strategy is the task's ``metadata`` or ``generation_kwargs`` ``frame_sampling``, else ``sampling``:
``uniform`` by default, frames spread evenly over the whole clip from its first to its last frame,
as lmms-eval's video models sample (``llava_onevision``, ``llava_vid``: ``np.linspace(0, n - 1, N)``,
truncated where :func:`tc_llava.data.video.sample_frames` rounds) and so as its tasks are scored;
``middle`` is MVBench's segment middles, the native evaluator's (``python -m tc_llava.eval``).

lmms-eval's own constructor flags arrive beside ``model_args`` and are taken: ``batch_size`` (N, or
``auto``/``auto:N``: :data:`AUTO_BATCH_SIZE` here, no probing), ``max_batch_size`` (its cap for
``auto``) and ``device``. Every parameter of every registered rule (``ROPE_RULES``, ``MASK_RULES``)
can be set by its name; anything else in ``model_args`` is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from tc_llava.data.collate import GRID_KEYS
from tc_llava.data.inputs import Clip, ClipEncoder, model_inputs
from tc_llava.data.templates import build_prompt, get_template, image_token_of
from tc_llava.data.video import read_frames, sample_frames
from tc_llava.eval.runner import SAMPLING, GenerationSettings, Item, generate_predictions
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.settings import build_rule, rule_parameters
from tc_llava.model.tc_llava import TCLlava

log = logging.getLogger(__name__)

TASK_FRAME_KEYS = ("num_frames", "max_num_frames", "frame_num")  # what lmms-eval tasks call a frame count
TASK_METADATA_FRAMES = "sample_frames"  # a task yaml's metadata key for its frame count (lmms-eval's llava_onevision)
TASK_SAMPLING_KEY = "frame_sampling"  # how a task names its frame sampling strategy (metadata or generation_kwargs)
DEFAULT_FRAMES = 16  # for an export that records no training frame count
AUTO_BATCH_SIZE = 8  # lmms-eval's --batch_size auto: no probing, this (capped by --max_batch_size)
RULE_PARAMS = rule_parameters()  # every registered rule's parameter -> "rope" | "mask"


def _rule(kind: str, name: str | None, params: dict[str, Any]) -> Any:
    """The ``kind`` rule ``name`` with ``params`` (None: the export's own); see :func:`build_rule`."""
    if name is None:
        if params:
            raise ValueError(f"model_args {sorted(params)} set {kind} parameters without {kind}=NAME")
        return None
    return build_rule(kind, name, params, f"model_args {kind}")


def _model_arg(value: Any) -> Any:
    """A rule parameter as lmms-eval's parser leaves it (numbers and booleans parsed, the rest text), with
    a list (``mrope_section=[16,24,24]``, kept whole by lmms-eval's comma split) and ``null`` read as JSON."""
    if isinstance(value, str) and (value.startswith("[") or value == "null"):
        try:
            return json.loads(value)
        except ValueError:
            return value  # the rule refuses it, naming the parameter
    return value


def _batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    """lmms-eval's ``--batch_size`` (N, ``auto`` or ``auto:N``) and ``--max_batch_size`` (its cap for auto)."""
    size = str(batch_size)
    if size.startswith("auto"):
        size = str(AUTO_BATCH_SIZE if max_batch_size is None else min(AUTO_BATCH_SIZE, max_batch_size))
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"batch_size={batch_size!r} (max_batch_size={max_batch_size!r}): expected an integer >= 1, "
                         "auto or auto:N")
    return int(size)


@dataclasses.dataclass
class _OneProcess:
    """The runner's view of this rank alone: lmms-eval already gave each rank its own requests."""

    device: torch.device
    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        """Nothing to wait for: no other rank shares these items."""


class TCLlavaLMM(lmms):
    """A tc-llava export for lmms-eval (see the module docstring for what each request does)."""

    def __init__(
        self,
        pretrained: str,
        rope: str | None = None,
        mask: str | None = None,
        pooling_shape: str | None = None,
        num_frames: int | None = None,
        sampling: str = "uniform",
        template: str | None = None,
        system_prompt: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "auto",
        batch_size: int | str = AUTO_BATCH_SIZE,
        max_batch_size: int | None = None,
        device: str | None = None,
        cache_dir: str | None = None,
        decode_backend: str = "pyav",
        num_workers: int = 0,
        max_new_tokens: int = 128,
        **rule_params: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(rule_params) - set(RULE_PARAMS))
        if unknown:
            raise ValueError(f"model_args {unknown} are not arguments of the tc_llava model: its own are those of "
                             f"TCLlavaLMM.__init__, the rules' parameters {sorted(RULE_PARAMS)}")
        if sampling not in SAMPLING:
            raise ValueError(f"model_args sampling={sampling!r}: expected one of {SAMPLING}")
        params = {kind: {k: _model_arg(v) for k, v in rule_params.items() if RULE_PARAMS[k] == kind}
                  for kind in ("rope", "mask")}
        rules = {kind: _rule(kind, name, params[kind]) for kind, name in (("rope", rope), ("mask", mask))}
        self.batch_size_per_gpu = _batch_size(batch_size, max_batch_size)
        state = PartialState()
        self._rank, self._world_size = state.process_index, state.num_processes
        self._device = torch.device(device) if device else state.device
        pooling = None
        if pooling_shape is not None:
            pooling = VideoPooling([int(x) for x in str(pooling_shape).split("x")])
        self.model = TCLlava.from_pretrained(
            pretrained, rope=rules["rope"], mask=rules["mask"], pooling=pooling,
            attn_implementation=attn_implementation, dtype=getattr(torch, dtype), template=template,
        ).to(self._device).eval()
        if self.model.template is None:
            raise ValueError(f"{pretrained}: the checkpoint records no chat template; pass model_args template=NAME "
                             "(vicuna_v1, llama_2, mistral_instruct, chatml, plain)")
        trained = self.model.frame_sampling or {}
        # A checkpoint's own chat template (Qwen-VL) brings its own default system turn; a LLaVA recipe's none
        own_system = get_template(self.model.template).checkpoint_template
        if system_prompt is None and "system" not in trained and not own_system:
            log.warning("tc_llava: %s records no training system text (exported before tc-llava recorded it): "
                        "prompting with none, as the data.system of the PLLaVA recipes; model_args system_prompt=... "
                        "sets one", pretrained)
        self.pretrained = str(pretrained)
        self.system_prompt = trained.get("system", None if own_system else "") if system_prompt is None \
            else system_prompt
        self.num_frames = int(num_frames) if num_frames is not None else trained.get("num_frames", DEFAULT_FRAMES)
        self.frames_source = ("model_args num_frames" if num_frames is not None else
                              "the export's training" if "num_frames" in trained else "the default")
        self.sampling, self.max_new_tokens = sampling, int(max_new_tokens)
        self.decode_backend, self.num_workers = decode_backend, int(num_workers)
        self.cache_dir = Path(cache_dir) / f"rank{self._rank}" if cache_dir else None
        self.image_token = image_token_of(self.model.tokenizer)
        self._logged: set[tuple[str, int, str]] = set()
        # a warning, as the per-task frames: lmms-eval leaves plugins' loggers at WARNING, and this is what was asked
        system = "the template's own" if self.system_prompt is None else repr(self.system_prompt[:80])
        log.warning("tc_llava: %s with rules %s, template %s, system text %s, batch size %d", pretrained,
                    self.model.tc_settings(), self.model.template, system, self.batch_size_per_gpu)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ----------------------------------------------------------------- helpers
    def _video(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> str:
        """The one video path a request's document shows; anything else is an error naming the task."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = visuals if isinstance(visuals, list) else [visuals]
        if len(visuals) != 1 or not isinstance(visuals[0], (str, Path)):
            kinds = [type(v).__name__ for v in visuals]
            raise ValueError(f"task {task!r} doc {doc_id}: tc_llava answers about one video file per question, "
                             f"the task gives {kinds}")
        return str(visuals[0])

    def _view(self, request: Instance, gen_kwargs: dict[str, Any]) -> tuple[int, str]:
        """The frame count and sampling ``request``'s task asks for (see the module docstring); the task's keys
        are taken out of ``gen_kwargs``. Logged once per task."""
        task, metadata = request.task_name, request.metadata or {}
        counts = [gen_kwargs.pop(k) for k in TASK_FRAME_KEYS if k in gen_kwargs]
        asked_sampling = gen_kwargs.pop(TASK_SAMPLING_KEY, None)
        if TASK_METADATA_FRAMES in metadata:
            frames, source = int(metadata[TASK_METADATA_FRAMES]), f"the task's metadata {TASK_METADATA_FRAMES}"
        elif counts:
            frames, source = int(counts[0]), "the task's generation_kwargs"
        else:
            frames, source = self.num_frames, self.frames_source
        sampling = metadata.get(TASK_SAMPLING_KEY, asked_sampling) or self.sampling
        if sampling not in SAMPLING:
            raise ValueError(f"task {task!r} asks for {TASK_SAMPLING_KEY}={sampling!r}; tc_llava samples {SAMPLING}")
        if (task, frames, sampling) not in self._logged:
            self._logged.add((task, frames, sampling))
            log.warning("tc_llava: task %s: %d frames (%s), %s sampling", task, frames, source, sampling)
        return frames, sampling

    def _prompt(self, context: str) -> str:
        return build_prompt(self.model.template, self.system_prompt, context, "", self.image_token)

    @staticmethod
    def _greedy_only(task: str, gen_kwargs: dict[str, Any]) -> None:
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0 or int(
                gen_kwargs.get("num_beams") or 1) > 1:
            raise ValueError(f"task {task!r} asks for sampling or beam search ({gen_kwargs}); tc_llava decodes "
                             "greedily (the runner's guarantee that batch size does not change outputs)")

    # ----------------------------------------------------------------- requests
    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """Greedy answers through the batched runner, grouped by task, frames and token budget."""
        groups: dict[tuple[str, int, str, int], list[tuple[int, Item, list[str]]]] = {}
        for k, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs)
            self._greedy_only(task, gen_kwargs)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            frames, sampling = self._view(request, gen_kwargs)
            budget = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            item = Item(f"{task}/{split}/{doc_id}", self._video(doc_to_visual, task, split, doc_id), self._prompt(context))
            groups.setdefault((task, frames, sampling, budget), []).append((k, item, until))
        answers = [""] * len(requests)
        for (task, frames, sampling, budget), members in groups.items():
            settings = GenerationSettings(num_frames=frames, sampling=sampling, max_new_tokens=budget,
                                          template=self.model.template, batch_size=self.batch_size_per_gpu,
                                          backend=self.decode_backend, num_workers=self.num_workers)
            records = self._run(task, [item for _, item, _ in members], settings)
            for k, item, until in members:
                record = records[item.id]
                if record["failed"]:
                    log.warning("tc_llava: %s: %s; answered ''", item.id, record["failed"])
                    continue
                text = record["output"]
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                answers[k] = text
        return answers

    def _run(self, task: str, items: list[Item], settings: GenerationSettings) -> dict[str, dict[str, Any]]:
        state = _OneProcess(self._device)
        if self.cache_dir is not None:
            return generate_predictions(self.model, items, self.cache_dir / task, settings, state)
        with tempfile.TemporaryDirectory(prefix="tc_llava_lmms_") as scratch:
            return generate_predictions(self.model, items, scratch, settings, state)

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[Instance]) -> list[GenerationResult]:
        """(mean negative log-likelihood of the continuation, greedy) per request, by the model's forward,
        each in a :class:`GenerationResult` (see the module docstring)."""
        tokenizer, dtype = self.model.tokenizer, next(self.model.parameters()).dtype
        last: tuple[tuple[str, int, str, str], dict[str, Any]] | None = None  # a question's choices share its inputs
        out = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            frames, sampling = self._view(request, {})
            video = self._video(doc_to_visual, task, split, doc_id)
            if last is None or last[0] != (video, frames, sampling, context):
                encoder, clip = self.model.frame_processor, None
                if isinstance(encoder, ClipEncoder):  # a Qwen-VL model: the frames its budget chooses
                    array, indices, fps, total = read_frames(video, encoder.frame_indices, self.decode_backend)
                    clip = Clip(indices, fps, total)
                else:
                    array, _ = sample_frames(video, frames, sampling, None, self.decode_backend)
                last = (video, frames, sampling, context), model_inputs(
                    tokenizer, encoder, self.model.tokens_per_video, self.model.template, array,
                    self._prompt(context), clip=clip)
            prompt_ids = last[1]["input_ids"]
            target = torch.tensor(tokenizer(continuation, add_special_tokens=False)["input_ids"], dtype=torch.long)
            if target.numel() == 0:
                raise ValueError(f"task {task!r} doc {doc_id}: the continuation {continuation!r} has no tokens")
            ids = torch.cat([prompt_ids, target])[None].to(self._device)
            visual = ({"pixel_values": last[1]["pixel_values"][None].to(self._device, dtype)}
                      if "pixel_values" in last[1] else
                      {key: last[1][key].to(self._device, dtype if key.startswith("pixel_values") else None)
                       for key in GRID_KEYS if key in last[1]})
            logits = self.model(ids, torch.ones_like(ids), **visual).logits[0, len(prompt_ids) - 1 : -1].float()
            logprobs = torch.log_softmax(logits, -1).gather(-1, target[:, None].to(self._device))[:, 0]
            greedy = bool((logits.argmax(-1).cpu() == target).all())
            out.append(GenerationResult((float(-logprobs.mean()), greedy)))
        return out

    def generate_until_multi_round(self, requests: Sequence[Instance]) -> list[str]:
        raise NotImplementedError("tc_llava answers single-turn tasks (generate_until, loglikelihood)")
