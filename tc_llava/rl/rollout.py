"""Rollouts through our own generation, and the token log-probabilities the loss takes.

Completions are sampled by :func:`tc_llava.model.generation.generate` (KV cache, the rope and
mask rules of the policy, left-padded prompts), so a rollout is what the model does at
evaluation with sampling on. Their log-probabilities (the policy's now, at generation time,
and the reference's) are then recomputed by the training forward: the whole prompt plus
completion in one prefill, the rules' positions and mask, the logits of the completion
positions only (``logits_to_keep``). Generation and training forward agree token for token
(tests/test_rl.py), so the importance ratio of the first pass is 1 up to float rounding.

Like TRL, the log-probabilities are those of ``logits / temperature`` (the distribution the
tokens were drawn from, before top-p's cut). The video placeholder is never sampled (a
completion holding it would be read as visual tokens by the training forward): its logit is
-inf in generation and in the log-probabilities alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tc_llava.data.collate import GRID_KEYS


@dataclass
class Completions:
    """A batch of sampled completions of left-padded prompts (the G of a prompt next to each other).

    ``ids [B, T]`` (pad after a completion's stop token), ``mask [B, T]`` (1 on real tokens, the stop
    token included), ``texts`` (decoded up to the stop token).
    """

    ids: Tensor
    mask: Tensor
    texts: list[str]


def completion_mask(ids: Tensor, stops: Sequence[int]) -> Tensor:
    """1 up to and including each row's first stop token (every token when there is none)."""
    is_stop = torch.isin(ids, torch.tensor(list(stops), device=ids.device))
    after = is_stop.long().cumsum(-1) - is_stop.long()  # stops strictly before each position
    return (after == 0).long()


def take_rows(batch: Mapping[str, Any], rows: Tensor) -> dict[str, Any]:
    """The model inputs of some rows of a left-padded prompt batch, in ``rows``' order (a row may repeat).

    Frames may be ``pixel_values [B, T, C, H, W]``, every sample's frames ``[N, C, H, W]`` with ``num_frames``, or
    a Qwen-VL family's patches ``pixel_values_videos`` (``prod(video_grid_thw[i])`` rows for sample ``i``) with
    ``video_grid_thw`` (and ``second_per_grid_ts``)."""
    counts = torch.as_tensor(batch["num_frames"])
    out = {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows],
           "num_frames": counts[rows]}
    if "video_grid_thw" in batch:
        grids = batch["video_grid_thw"]
        patches = batch["pixel_values_videos"].split(grids.prod(-1).tolist())
        out.update(pixel_values_videos=torch.cat([patches[i] for i in rows.tolist()]), video_grid_thw=grids[rows])
        if "second_per_grid_ts" in batch:
            out["second_per_grid_ts"] = batch["second_per_grid_ts"][rows]
        return out
    pixels = batch["pixel_values"]
    if pixels.ndim == 5:
        out["pixel_values"] = pixels[rows]
    else:
        frames = pixels.split(counts.tolist())
        out["pixel_values"] = torch.cat([frames[i] for i in rows.tolist()])
    return out


def repeat_rows(batch: Mapping[str, Any], times: int) -> dict[str, Any]:
    """A left-padded prompt batch with each prompt repeated ``times`` (TRL's ``repeat_interleave`` order)."""
    return take_rows(batch, torch.arange(len(batch["input_ids"])).repeat_interleave(times))


def frame_orders(counts: Sequence[int], seeds: Sequence[int]) -> list[list[int]]:
    """T-GRPO's frame orders: a permutation of each prompt's ``counts[i]`` frames drawn from ``seeds[i]``."""
    return [torch.randperm(int(n), generator=torch.Generator().manual_seed(int(seed))).tolist()
            for n, seed in zip(counts, seeds)]


def visual_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's visual keyword arguments of a batch: ``pixel_values`` or a Qwen-VL family's ``GRID_KEYS``, and
    ``num_frames``."""
    return {key: batch[key] for key in ("pixel_values", "num_frames", *GRID_KEYS) if key in batch}


@torch.no_grad()
def sample(model: nn.Module, batch: Mapping[str, Any], *, max_new_tokens: int, temperature: float, top_p: float,
           seeds: Sequence[int], stops: Sequence[int], pad_token_id: int) -> Completions:
    """Sampled completions of the (already repeated) left-padded ``batch``, row ``i`` drawn from its own generator
    seeded by ``seeds[i]`` (so one completion can be regenerated alone), the video placeholder suppressed.

    ``model`` is the unwrapped :class:`~tc_llava.model.tc_llava.TCLlava`; it is put in eval mode (no dropout)
    for the rollout and back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        device = batch["input_ids"].device
        out = model.generate(batch["input_ids"], batch["attention_mask"], **visual_inputs(batch),
                             max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_p=top_p, eos_token_id=list(stops),
                             pad_token_id=pad_token_id,
                             generator=[torch.Generator(device).manual_seed(int(seed)) for seed in seeds],
                             suppress_tokens=[model.placeholder_token_id])
    finally:
        model.train(was_training)
    mask = completion_mask(out.sequences, stops)
    texts = [model.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
             for row, m in zip(out.sequences, mask)]
    return Completions(out.sequences, mask, texts)


def token_logps(model: nn.Module, batch: Mapping[str, Any], completions: Completions, temperature: float,
                suppressed: int) -> Tensor:
    """``[B, T]`` log-probabilities of the completion tokens under ``model`` (the training forward: prompt and
    completion in one prefill with the rules' positions and mask), of ``logits / temperature`` with token
    ``suppressed`` (the placeholder) left out as generation leaves it out; 0 on padding.

    ``model`` may be the accelerate-prepared wrapper (gradients flow when they are enabled)."""
    width = completions.ids.shape[1]
    ids = torch.cat([batch["input_ids"], completions.ids], 1)
    mask = torch.cat([batch["attention_mask"], completions.mask], 1)
    logits = model(ids, mask, **visual_inputs(batch), logits_to_keep=width + 1).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logits = logits.index_fill(-1, torch.tensor([suppressed], device=logits.device), float("-inf"))
    picked = torch.log_softmax(logits, -1).gather(-1, completions.ids[..., None]).squeeze(-1)
    return picked * completions.mask


@contextlib.contextmanager
def reference(adapters: Any) -> Iterator[None]:
    """The reference policy for the duration: with LoRA (``adapters``, peft's handle) the same model with its
    adapters disabled (peft's ``disable_adapter``), so no second copy; nothing to do without one."""
    with adapters.disable_adapter() if adapters is not None else contextlib.nullcontext():
        yield
