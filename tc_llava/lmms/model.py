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

Frames: ``num_frames`` from the task's ``generation_kwargs`` (``num_frames``, ``max_num_frames``
or ``frame_num``) when it sets one, else the ``num_frames`` model argument; segment middles as in
MVBench (the runner's sampling). What each task ran with is logged once.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from tc_llava.data.templates import build_prompt, image_token_of, tokenize_prompt
from tc_llava.data.video import sample_frames
from tc_llava.eval.runner import GenerationSettings, Item, generate_predictions
from tc_llava.model.masks import MASK_RULES
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.rope import ROPE_RULES
from tc_llava.model.tc_llava import TCLlava

log = logging.getLogger(__name__)

TASK_FRAME_KEYS = ("num_frames", "max_num_frames", "frame_num")  # what lmms-eval tasks call a frame count
SAMPLING = "middle"
ROPE_PARAMS = ("gamma", "delta")  # the rope rules' parameters (TAD's gamma, VideoRoPE's delta)


def _rule(registry: dict[str, type], kind: str, name: str | None, params: dict[str, Any]) -> Any:
    """``registry[name](**params)``; params a rule does not take are errors, never ignored."""
    if name is None:
        if params:
            raise ValueError(f"model_args {sorted(params)} set {kind} parameters without {kind}=NAME")
        return None
    if name not in registry:
        raise ValueError(f"model_args {kind}={name!r} is not a {kind} rule; known: {', '.join(registry)}")
    fields = {f.name for f in dataclasses.fields(registry[name])}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"model_args {unknown} are not parameters of {kind}={name} (its parameters: "
                         f"{', '.join(sorted(fields)) or 'none'})")
    return registry[name](**params)


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
        num_frames: int = 16,
        template: str | None = None,
        system_prompt: str = "",
        dtype: str = "float32",
        attn_implementation: str = "auto",
        batch_size: int | str = 8,
        device: str | None = None,
        cache_dir: str | None = None,
        decode_backend: str = "pyav",
        num_workers: int = 0,
        max_new_tokens: int = 128,
        **rule_params: Any,
    ) -> None:
        super().__init__()
        state = PartialState()
        self._rank, self._world_size = state.process_index, state.num_processes
        self._device = torch.device(device) if device else state.device
        unknown = sorted(set(rule_params) - set(ROPE_PARAMS))
        if unknown:
            raise ValueError(f"model_args {unknown} are not arguments of the tc_llava model; rope parameters are "
                             f"{list(ROPE_PARAMS)}, the others are those of TCLlavaLMM.__init__")
        pooling = None
        if pooling_shape is not None:
            pooling = VideoPooling([int(x) for x in str(pooling_shape).split("x")])
        self.model = TCLlava.from_pretrained(
            pretrained, rope=_rule(ROPE_RULES, "rope", rope, rule_params),
            mask=_rule(MASK_RULES, "mask", mask, {}), pooling=pooling,
            attn_implementation=attn_implementation, dtype=getattr(torch, dtype), template=template,
        ).to(self._device).eval()
        if self.model.template is None:
            raise ValueError(f"{pretrained}: the checkpoint records no chat template; pass model_args template=NAME "
                             "(vicuna_v1, llama_2, mistral_instruct, chatml, plain)")
        self.pretrained, self.system_prompt = str(pretrained), system_prompt
        self.num_frames, self.max_new_tokens = int(num_frames), int(max_new_tokens)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size) != "auto" else 8
        self.decode_backend, self.num_workers = decode_backend, int(num_workers)
        self.cache_dir = Path(cache_dir) / f"rank{self._rank}" if cache_dir else None
        self.image_token = image_token_of(self.model.tokenizer)
        self._logged: set[tuple[str, int]] = set()
        log.info("tc_llava: %s with rules %s, template %s", pretrained, self.model.tc_settings(), self.model.template)

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

    def _frames(self, task: str, gen_kwargs: dict[str, Any]) -> int:
        """The task's frame count when its generation_kwargs set one, else ``num_frames``; logged once per task."""
        found = [gen_kwargs.pop(k) for k in TASK_FRAME_KEYS if k in gen_kwargs]
        frames = int(found[0]) if found else self.num_frames
        if (task, frames) not in self._logged:
            self._logged.add((task, frames))
            source = "the task's generation_kwargs" if found else "model_args num_frames"
            log.warning("tc_llava: task %s: %d frames (%s), %s sampling", task, frames, source, SAMPLING)
        return frames

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
        groups: dict[tuple[str, int, int], list[tuple[int, Item, list[str]]]] = {}
        for k, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs)
            self._greedy_only(task, gen_kwargs)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            frames = self._frames(task, gen_kwargs)
            budget = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            item = Item(f"{task}/{split}/{doc_id}", self._video(doc_to_visual, task, split, doc_id), self._prompt(context))
            groups.setdefault((task, frames, budget), []).append((k, item, until))
        answers = [""] * len(requests)
        for (task, frames, budget), members in groups.items():
            settings = GenerationSettings(num_frames=frames, max_new_tokens=budget, template=self.model.template,
                                          batch_size=self.batch_size_per_gpu, backend=self.decode_backend,
                                          num_workers=self.num_workers)
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
        tokenizer, processor = self.model.tokenizer, self.model.frame_processor
        pixels_of: dict[tuple[str, int], torch.Tensor] = {}
        out = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            frames = self._frames(task, {})
            video = self._video(doc_to_visual, task, split, doc_id)
            if (video, frames) not in pixels_of:
                array, _ = sample_frames(video, frames, SAMPLING, None, self.decode_backend)
                pixels_of[(video, frames)] = processor(images=list(array), return_tensors="pt")["pixel_values"]
            prompt_ids = tokenize_prompt(tokenizer, self.model.template, self._prompt(context),
                                         self.model.tokens_per_video(frames))
            target = torch.tensor(tokenizer(continuation, add_special_tokens=False)["input_ids"], dtype=torch.long)
            if target.numel() == 0:
                raise ValueError(f"task {task!r} doc {doc_id}: the continuation {continuation!r} has no tokens")
            ids = torch.cat([prompt_ids, target])[None].to(self._device)
            pixels = pixels_of[(video, frames)][None].to(self._device, next(self.model.parameters()).dtype)
            logits = self.model(ids, torch.ones_like(ids), pixels).logits[0, len(prompt_ids) - 1 : -1].float()
            logprobs = torch.log_softmax(logits, -1).gather(-1, target[:, None].to(self._device))[:, 0]
            greedy = bool((logits.argmax(-1).cpu() == target).all())
            out.append(GenerationResult((float(-logprobs.mean()), greedy)))
        return out

    def generate_until_multi_round(self, requests: Sequence[Instance]) -> list[str]:
        raise NotImplementedError("tc_llava answers single-turn tasks (generate_until, loglikelihood)")
