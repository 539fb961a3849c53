"""How the LLM attends: backend names, the automatic choice, and what each LLM call receives.

Which backend runs, and what mask or layout it gets, is decided here and nowhere else:
:mod:`tc_llava.model.block_attention` holds only the exact math it calls, and
:mod:`tc_llava.model.masks` only the rules and the dense reference.

Two backends are registered in transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` (so HF's own layers and ``create_causal_mask`` run them):

- ``block_merge``: the decomposition of :mod:`tc_llava.model.block_attention` wherever it
  applies, with :func:`~tc_llava.model.block_attention.block_spans` handed to the layers as
  a keyword argument (from the batch's :class:`~tc_llava.model.layout.BatchLayout`) and no mask built. It takes packed rows, left-padded evaluation
  prefills and mixed frame counts through its variable-length segments, and blocks of
  different sizes (an image then a video, samples of different resolutions) with each
  block's size. Where it does not apply (a filled KV cache, fp32 on CUDA, a block id that
  comes back after a gap) it gets transformers' SDPA mask and runs SDPA.
- ``block_auto``: the fastest correct path measured on the H200 (docs/performance.md):
  the decomposition wherever it applies; a GPU training prefill it cannot take gets flex
  attention with transformers' BlockMask rather than a dense mask; evaluation prefills and
  decoding steps SDPA.

``attn_implementation: auto`` picks ``block_auto`` on a GPU with flash attention (sm80+)
and SDPA on CPU. :func:`llm_attention` turns a call's layout into the LLM's arguments.

Under sequence parallelism (``trainer.sp_size``) both backends take the decomposition over the
whole sequence by an all-to-all over heads (:mod:`tc_llava.model.sequence_parallel`); every other
backend is refused (:func:`check_sequence_parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface, PreTrainedConfig
from transformers.cache_utils import Cache
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface, causal_mask_function, create_causal_mask, flex_attention_mask,
    packed_sequence_mask_function, sdpa_mask,
)

from tc_llava.model.block_attention import BlockSpans, block_merge_attention, flash_available
from tc_llava.model.hf_compat import cache_kwargs
from tc_llava.model.layout import BatchLayout
from tc_llava.model.masks import MaskRule
from tc_llava.model.sequence_parallel import SequenceParallel, check_heads, ulysses_attention

BLOCK_MERGE = "block_merge"
BLOCK_AUTO = "block_auto"

# Backends that drop any custom mask: refusing them beats silently training the wrong model.
MASK_DROPPING_BACKENDS = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def resolve_attention(name: str) -> str:
    """``auto`` -> ``block_auto`` on a GPU with flash attention, else ``sdpa``; other names unchanged."""
    if name != "auto":
        return name
    gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    return BLOCK_AUTO if gpu else "sdpa"


def check_backend(attn_implementation: str, mask_rule: MaskRule) -> None:
    """Refuse attention backends that would silently ignore a non-causal mask."""
    if not mask_rule.is_causal and attn_implementation in MASK_DROPPING_BACKENDS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} ignores custom attention masks, so mask="
            f"{mask_rule.name!r} would silently become causal. Use 'sdpa', 'flex_attention' or 'eager'."
        )


# Where sequence parallelism's core attention (the decomposition, on the whole rows' block spans) runs.
SEQUENCE_PARALLEL_BACKENDS = (BLOCK_MERGE, BLOCK_AUTO)


def check_sequence_parallel(attn_implementation: str, heads: int, size: int) -> None:
    """Refuse what sequence parallelism of ``size`` shares cannot run exactly: a degree that does not divide the
    LLM's ``heads`` attention heads, and a backend other than the decomposition (any other would attend within
    its share, or with a mask built for the share, or, like flash attention, with no mask at all)."""
    check_heads(heads, size)
    if size > 1 and attn_implementation not in SEQUENCE_PARALLEL_BACKENDS:
        raise ValueError(
            f"trainer.sp_size={size} attends through the exact block decomposition over the whole sequence; "
            f"model.attn_implementation={attn_implementation!r} would see one share or drop the mask: use "
            f"model.attn_implementation=block_merge (or block_auto on a GPU), never Accelerate's or DeepSpeed's own "
            "sequence or context parallelism, which make the mask causal")


def check_device(attn_implementation: str, device: torch.device | str) -> None:
    """Refuse ``flex_attention`` on CPU: compiled flex there (torch 2.13) returns wrong logits or NaN at some
    lengths once dynamic-shape recompiles start (34 tokens right, 40 wrong against SDPA)."""
    if attn_implementation == "flex_attention" and torch.device(device).type == "cpu":
        raise ValueError("model.attn_implementation=flex_attention is refused on CPU (compiled flex gives wrong "
                         "outputs there at some lengths); use sdpa, eager or auto on CPU, flex_attention on a GPU")


@dataclass(frozen=True)
class LLMAttention:
    """What one LLM call attends with: HF's ``attention_mask`` and ``position_ids``, and keyword
    arguments every attention layer receives (``block_spans`` for the decomposition)."""

    attention_mask: torch.Tensor | BlockMask | None
    position_ids: torch.Tensor | None
    layer_kwargs: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        """The LLM call's keyword arguments: ``lm(inputs_embeds=..., **attention.kwargs())``."""
        return {"attention_mask": self.attention_mask, "position_ids": self.position_ids, **self.layer_kwargs}


def llm_attention(config: PreTrainedConfig, layout: BatchLayout, inputs_embeds: torch.Tensor,
                  cache: Cache | None = None, sequence_parallel: SequenceParallel | None = None) -> LLMAttention:
    """The mask, position ids and layer arguments of one call of the LLM configured by ``config``.

    ``layout`` is the call's :class:`~tc_llava.model.layout.BatchLayout`: its block ids (None: a
    causal rule, or a decode step, whose new tokens are text and see every earlier key), the 2D
    padding mask, the real-token index HF's mask code reads as ``position_ids`` (the rotary
    positions go to the rotary module only) and, for packed rows, the sample ids, with which
    every rule, causal included, keeps each sample to its own keys. ``inputs_embeds`` gives the
    batch, length, device and dtype.

    Causal rules and decode steps of unpacked rows get the 2D padding mask (HF builds the
    rest). Otherwise the layers get the layout's block spans for the ``block_merge``/``block_auto``
    decomposition where it applies: no mask is built, and no ``position_ids`` either (with no
    mask HF would read a non-arange ``position_ids`` as packed sequences and build a mask for
    nothing). Elsewhere they get the backend's own mask from transformers' ``create_causal_mask``,
    with ``block_sequence_ids`` for the blocks and transformers' packed-sequence mask function for
    the samples.

    With ``sequence_parallel`` (the layout and ``inputs_embeds`` still the whole rows', before sharding) every
    rule gets the block spans of the whole rows and the group, whatever it is: the layers attend by
    :func:`~tc_llava.model.sequence_parallel.ulysses_attention`, and no mask is built.
    """
    check_device(config._attn_implementation, inputs_embeds.device)
    if sequence_parallel is not None:
        return _sequence_parallel_attention(config, layout, inputs_embeds, sequence_parallel)
    if layout.block_ids is None:
        return LLMAttention(layout.attention_mask, layout.position_ids)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    device = inputs_embeds.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else inputs_embeds.dtype
    if (config._attn_implementation in (BLOCK_MERGE, BLOCK_AUTO) and layout.block_spans is not None
            and flash_available(inputs_embeds.device, dtype, head_dim)):
        return LLMAttention(None, None, {"block_spans": layout.block_spans})
    sample_ids = layout.sample_ids
    mask = create_causal_mask(
        config=config, inputs_embeds=inputs_embeds, attention_mask=layout.attention_mask,
        position_ids=layout.position_ids, block_sequence_ids=layout.block_ids, **cache_kwargs(cache),
        and_mask_function=None if sample_ids is None else packed_sequence_mask_function(sample_ids),
    )
    return LLMAttention(mask, layout.position_ids)


def _sequence_parallel_attention(config: PreTrainedConfig, layout: BatchLayout, inputs_embeds: torch.Tensor,
                                 sp: SequenceParallel) -> LLMAttention:
    check_sequence_parallel(config._attn_implementation, config.num_attention_heads, sp.size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    device = inputs_embeds.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else inputs_embeds.dtype
    if not flash_available(inputs_embeds.device, dtype, head_dim):
        raise ValueError(f"sequence parallelism attends with the block decomposition, which needs bf16/fp16 on an "
                         f"sm80+ GPU (or any float on CPU); got {dtype} on {inputs_embeds.device}: set "
                         "trainer.mixed_precision=bf16")
    if layout.block_spans is None:
        raise ValueError("sequence parallelism keeps a block mask exact where every block is one run of rising ids; "
                         "here a block id comes back after a gap (mask=bidirectional_visual over an image and a video "
                         "with text between them): train such data with trainer.sp_size=1")
    return LLMAttention(None, None, {"block_spans": layout.block_spans, "sequence_parallel": sp})


def uses_flex(attn_implementation: str, device: torch.device, q_length: int) -> bool:
    """Whether ``block_auto`` builds flex's BlockMask for a call the decomposition did not take: a GPU training
    prefill (fp32, or a block id that comes back after a gap)."""
    # Measured on the H100: in training, flex with a BlockMask costs 1.04-1.14x of vanilla, SDPA with the dense
    # mask 1.10-1.38x. Without gradients (evaluation) every new padded width would compile flex and build a
    # BlockMask (seconds each), while the causal baseline of a left-padded batch runs SDPA with a dense mask too:
    # SDPA. A decoding step has one query and nothing after it to see: SDPA. On CPU torch has no flex backward.
    return (attn_implementation == BLOCK_AUTO and device.type == "cuda" and q_length > 1
            and torch.is_grad_enabled())


def _block_backend_mask(*args: Any, **kwargs: Any):
    """Mask interface of both backends: flex's BlockMask where ``block_auto`` uses flex for a block rule,
    else SDPA's mask.

    A plain causal request (a causal rule, or transformers' own call while the layers take
    ``block_spans``) gets SDPA's, which is no mask at all where SDPA's causal kernel applies.
    """
    q_length = kwargs["q_length"] if "q_length" in kwargs else len(kwargs["cache_position"])
    config = kwargs.get("config")
    impl = config._attn_implementation if config is not None else BLOCK_MERGE
    block_rule = kwargs.get("mask_function") is not causal_mask_function
    if block_rule and uses_flex(impl, torch.device(kwargs.get("device") or "cpu"), q_length):
        return flex_attention_mask(*args, **kwargs)
    return sdpa_mask(*args, **kwargs)


def block_merge_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
    block_spans: BlockSpans | None = None, sequence_parallel: SequenceParallel | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function of both backends: the decomposition with ``block_spans`` (over the
    whole sequence by an all-to-all over heads with ``sequence_parallel``), flex with a BlockMask, else SDPA
    with HF's mask."""
    if block_spans is None and not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as SDPA does under autocast (HF's rotary leaves q, k in fp32)
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if block_spans is None:
        return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(f"{BLOCK_MERGE} attention has no dropout; got attention dropout {dropout}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"{BLOCK_MERGE}: block_spans need a prefill without cached keys (q {query.shape[2]}, kv {key.shape[2]})")
    if sequence_parallel is not None:
        return ulysses_attention(query, key, value, block_spans, scaling, sequence_parallel), None
    groups = query.shape[1] // key.shape[1]
    out = block_merge_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), block_spans, scaling)
    return out.transpose(1, 2).contiguous(), None


for _name in (BLOCK_MERGE, BLOCK_AUTO):
    AttentionInterface.register(_name, block_merge_attention_forward)
    AttentionMaskInterface.register(_name, _block_backend_mask)
