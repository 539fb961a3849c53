"""Rotary position rules: vanilla 1D RoPE and TC-LLaVA's temporal-aware dual RoPE.

A rule turns the per-token frame-id vector (-1 text, f >= 0 a visual token of frame f)
into the float positions the LLM's rotary module rotates by. The positions reach the
rotary module only (through :class:`RotaryPositions`), never ``position_ids``: HF reads a
non-arange ``position_ids`` as packed sequences and would silently split the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def real_token_index(frame_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The 1D index ``m`` (0, 1, 2, ... over real tokens; 0 on padding) as int64 ``[B, L]``."""
    real = _real(frame_ids, attention_mask)
    return (real.long().cumsum(-1) - 1).clamp(min=0) * real


def temporal_positions(
    frame_ids: torch.Tensor, gamma: float = 1.0, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Float rotary positions ``p = m + gamma * tau`` for a ``[B, L]`` frame-id tensor.

    ``tau`` is one walk with a counter: a text token takes the counter and advances it; the
    first token of a new frame takes it and advances it, the frame's other tokens share it.
    With a padding mask, ``m`` and ``tau`` count real tokens only; padding gets 0.
    """
    real = _real(frame_ids, attention_mask)
    prev = torch.roll(frame_ids, 1, dims=-1)
    prev_real = torch.roll(real, 1, dims=-1)
    prev_real[..., 0] = False
    starts_step = real & ((frame_ids < 0) | ~prev_real | (frame_ids != prev))
    tau = (starts_step.long().cumsum(-1) - 1).clamp(min=0)
    m = real_token_index(frame_ids, attention_mask)
    return (m + gamma * tau).to(torch.float32) * real


def _real(frame_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(frame_ids, dtype=torch.bool)
    if attention_mask.shape != frame_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected the frame ids' {tuple(frame_ids.shape)}"
        )
    return attention_mask.bool()


@dataclass
class VanillaRoPE:
    """Plain 1D RoPE: position ``m``, one step per token (the HF model's own behaviour)."""

    name: str = "vanilla"

    @property
    def decode_step(self) -> float:
        return 1.0

    def positions(self, frame_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return real_token_index(frame_ids, attention_mask).float()


@dataclass
class TADRoPE:
    """Temporal-aware dual RoPE: ``p = m + gamma * tau`` (``gamma = 0`` is vanilla RoPE).

    Every generated (text) token advances both ``m`` and ``tau``, so decoding steps by
    ``1 + gamma``.
    """

    gamma: float = 1.0
    name: str = "tad"

    @property
    def decode_step(self) -> float:
        return 1.0 + self.gamma

    def positions(self, frame_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return temporal_positions(frame_ids, self.gamma, attention_mask)


class RotaryPositions(nn.Module):
    """Wraps an LLM's rotary module so one forward can hand it float positions.

    The LLM keeps calling ``rotary_emb(x, position_ids)``; inside :meth:`use` the wrapped
    module rotates by the given positions instead. It holds no weights, so checkpoints
    and state dicts are unchanged.
    """

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary
        self.positions: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, self.positions if self.positions is not None else position_ids)

    def use(self, positions: torch.Tensor) -> "_Override":
        return _Override(self, positions)


class _Override:
    def __init__(self, module: RotaryPositions, positions: torch.Tensor) -> None:
        self.module, self.new = module, positions

    def __enter__(self) -> None:
        self.old, self.module.positions = self.module.positions, self.new

    def __exit__(self, *exc: object) -> None:
        self.module.positions = self.old
