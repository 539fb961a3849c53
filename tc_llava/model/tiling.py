"""Long sequences on one GPU: the loss, the vision tower and the LLM's MLPs run in tiles.

Each bounds the peak memory of one part to one tile's and leaves the losses and gradients
those of the untiled run (tests/test_tiling.py):

- the loss: the LM head and cross-entropy run a tile of labelled tokens at a time, each
  tile's logits recomputed in the backward (activation checkpointing), so the logits of the
  whole sequence (0.6 MB per token in fp32 over a 152k vocabulary) never exist at once;
- the vision tower: a chunk of frames at a time (Qwen-VL: whole images and videos, since a
  video's patches attend to each other inside the tower), so its activations are one chunk's;
- the MLP: each decoder layer's MLP runs a tile of tokens at a time under activation
  checkpointing, so its intermediate (``L x intermediate_size``, several times) is one tile's.

The settings are ``model.tiling.*`` (base/model.yaml); ``None`` runs the part whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tc_llava.model.params import integer


@dataclass(frozen=True)
class Tiling:
    """Tile sizes: labelled tokens per loss tile, frames per vision chunk (Qwen-VL: temporal patches of whole
    images and videos), tokens per MLP tile; None: the part runs whole."""

    loss_tokens: int | None = 4096
    vision_frames: int | None = 64
    mlp_tokens: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                integer(f"model.tiling.{f.name}", value, minimum=1)


def _token_loss(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (an fp64 model keeps fp64)
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def _checkpointed(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` whose intermediates are recomputed in the backward (as is, without gradients)."""
    return partial(checkpoint, fn, use_reentrant=False) if torch.is_grad_enabled() else fn


def tiled_loss(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, tokens: int | None) -> torch.Tensor:
    """Summed cross-entropy of ``lm_head(hidden)`` ``[N, D]`` against ``targets`` ``[N]``, ``tokens`` rows at a time."""
    if tokens is None or hidden.shape[0] <= tokens:
        return _token_loss(lm_head, hidden, targets)
    run = _checkpointed(_token_loss)
    return sum(run(lm_head, h, t) for h, t in zip(hidden.split(tokens), targets.split(tokens)))


def item_chunks(frames: Iterable[int], size: int | None) -> list[int]:
    """Consecutive items (images, videos) of ``frames`` temporal patches each, grouped into chunks of at most ``size``
    patches (an item larger than ``size`` alone): items per chunk."""
    chunks, count, total = [], 0, 0
    for n in frames:
        if count and size is not None and total + n > size:
            chunks.append(count)
            count, total = 0, 0
        count, total = count + 1, total + n
    return chunks + ([count] if count else [])


class TiledMLP:
    """An MLP's forward run ``tokens`` positions of the sequence at a time, each tile under activation checkpointing.

    Set as the module's ``forward`` (:func:`tile_mlps`), so parameter names, state dicts and adapters are unchanged.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], tokens: int) -> None:
        self.forward, self.tokens = forward, tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] <= self.tokens:
            return self.forward(x)
        run = _checkpointed(self.forward)
        return torch.cat([run(part) for part in x.split(self.tokens, dim=-2)], dim=-2)


def tile_mlps(layers: Iterable[nn.Module], tokens: int) -> None:
    """Every decoder layer's ``mlp`` runs in tiles of ``tokens`` positions (:class:`TiledMLP`)."""
    for layer in layers:
        mlp = layer.mlp
        mlp.forward = TiledMLP(type(mlp).forward.__get__(mlp), tokens)
