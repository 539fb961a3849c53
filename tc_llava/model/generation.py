"""KV-cache generation for TC-LLaVA: prefill with the block mask, decode causally.

The prefill runs the full model (video, the mask rule's block mask, the rope rule's
positions). Each new token is text, so decoding needs only the plain causal mask, and its
rotary position (``[B, 1]``, or ``[3, B, 1]`` for multi-axis rules) is the prefill's
``next_rope_positions`` for the first one, then ``rope.next_positions`` of the previous token's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, new] generated ids, pad after a sample's EOS
    scores: list[torch.Tensor] | None  # per step [B, V] logits (float32), when asked


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
          generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if isinstance(generator, Sequence):  # one generator per row: each row draws as it would alone
        return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    output_scores: bool = False,
    num_frames: torch.Tensor | Sequence[int] | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    suppress_tokens: Sequence[int] | None = None,
    **visual: torch.Tensor,
) -> GenerationOutput:
    """Greedy or sampled generation for a left-padded batch of video prompts.

    ``num_frames`` gives each sample's frame count when ``pixel_values`` is ``[N, C, H, W]``;
    ``streamer`` is called with each step's new tokens ``[B]`` as soon as they are chosen; ``visual`` holds a
    Qwen-VL family's own visual inputs (grids, video patches). ``suppress_tokens`` are never chosen (their
    logits, and ``scores``, are -inf): RL rollouts suppress the video placeholder, which a training forward would
    read as visual tokens. ``generator`` may be a list with one generator per row: each row then samples from its
    own, so one row regenerated alone with its generator draws the same tokens as in the batch.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if isinstance(generator, Sequence) and len(generator) != input_ids.shape[0]:
        raise ValueError(f"generate(): {len(generator)} generators for {input_ids.shape[0]} rows; expected one per row")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generate() needs left-padded prompts: attention_mask[:, -1] must be 1 for every sample")
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=input_ids.device)
    out = model(input_ids, attention_mask, pixel_values, use_cache=True, logits_to_keep=1, num_frames=num_frames,
                **visual)
    cache, positions = out.cache, out.next_rope_positions
    position_ids = attention_mask.sum(-1, keepdim=True)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens, scores = [], []
    suppressed = torch.tensor(list(suppress_tokens or []), dtype=torch.long, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float().index_fill(-1, suppressed, float("-inf"))
        if output_scores:
            scores.append(logits)
        nxt = _pick(logits, do_sample, temperature, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        tokens.append(nxt)
        if streamer is not None:
            streamer(nxt)
        finished |= torch.isin(nxt, eos)
        if bool(finished.all()) or len(tokens) == max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], -1)
        out = model(
            nxt[:, None], attention_mask, cache=cache, use_cache=True,
            rope_positions=positions, position_ids=position_ids,
        )
        positions, position_ids = model.rope.next_positions(positions), position_ids + 1
    sequences = torch.stack(tokens, -1) if tokens else input_ids.new_zeros((input_ids.shape[0], 0))
    return GenerationOutput(sequences=sequences, scores=scores if output_scores else None)
