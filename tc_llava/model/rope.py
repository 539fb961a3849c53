"""Rotary position rules: vanilla 1D RoPE, TC-LLaVA's dual RoPE, M-RoPE and VideoRoPE.

A rule turns the per-token frame-id vector (-1 text, f >= 0 a visual token of frame f)
and the spatial grid ``(H, W)`` of each frame into the positions the LLM's rotary module
rotates by. 1D rules give float ``[B, L]`` positions; multi-axis rules give ``[3, B, L]``
positions on the (t, h, w) axes plus :meth:`pair_axes`, the axis each frequency pair
rotates by. The positions reach the rotary module only (through :class:`RotaryPositions`),
never ``position_ids``: HF reads a non-arange ``position_ids`` as packed sequences and
would silently split the mask.

Every rule also says where generation continues (:meth:`next_positions`): each generated
token is text, so its position follows from the last token's alone, and KV-cache decoding
equals a full recompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from tc_llava.model.params import integer, integers, number

# Qwen2-VL's split of 64 frequency pairs (head_dim 128) into t/h/w; scaled to other head dims.
QWEN2VL_SECTION = (16, 24, 24)


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
    m = real_token_index(frame_ids, attention_mask)
    return (m + gamma * temporal_index(frame_ids, attention_mask)).to(torch.float32) * real


def temporal_index(frame_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """TC-LLaVA's temporal index ``tau`` as int64 ``[B, L]`` (0 on padding): one step per text token and per frame,
    the tokens of a frame sharing their frame's."""
    real = _real(frame_ids, attention_mask)
    prev = torch.roll(frame_ids, 1, dims=-1)
    prev_real = torch.roll(real, 1, dims=-1)
    prev_real[..., 0] = False
    starts_step = real & ((frame_ids < 0) | ~prev_real | (frame_ids != prev))
    return (starts_step.long().cumsum(-1) - 1).clamp(min=0) * real


def _real(frame_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(frame_ids, dtype=torch.bool)
    if attention_mask.shape != frame_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected the frame ids' {tuple(frame_ids.shape)}"
        )
    return attention_mask.bool()


@dataclass(frozen=True)
class VideoCoords:
    """Where each token sits: text index, frame, row and column, per ``[B, L]`` token.

    ``start`` is the text index of a sample's first visual token (``[B, 1]``), ``frames``
    its number of frames (``[B, 1]``, 0 without a video) and ``after`` marks text tokens
    that follow the video.
    """

    real: torch.Tensor
    visual: torch.Tensor
    text_index: torch.Tensor  # m minus the visual tokens before: 0, 1, 2, ... over text only
    after: torch.Tensor
    start: torch.Tensor
    frames: torch.Tensor
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor


def video_coords(
    frame_ids: torch.Tensor, attention_mask: torch.Tensor | None, grid: tuple[int, int] | None, rule: str
) -> VideoCoords:
    """Frame/row/column of every visual token of one contiguous video per sample on an ``H x W`` grid."""
    if grid is None or len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"rope={rule!r} needs the per-frame grid (H, W) of the visual tokens, got {grid!r}")
    height, width = int(grid[0]), int(grid[1])
    per_frame = height * width
    real = _real(frame_ids, attention_mask)
    visual = real & (frame_ids >= 0)
    k = visual.long().cumsum(-1) - 1  # index among a sample's visual tokens
    count = visual.sum(-1, keepdim=True)
    if bool((count % per_frame).any()) or bool((frame_ids != k // per_frame)[visual].any()):
        raise ValueError(
            f"rope={rule!r} expects one contiguous video per sample whose frames are {height}x{width} = "
            f"{per_frame} tokens each (frame f holding visual tokens f*{per_frame} ... (f+1)*{per_frame}-1); "
            f"got visual token counts {count.flatten().tolist()}. A CLS token per frame is not supported."
        )
    m = real_token_index(frame_ids, attention_mask)
    before = visual.long().cumsum(-1) - visual.long()  # visual tokens strictly before
    start = torch.where(visual, m, torch.full_like(m, torch.iinfo(m.dtype).max)).amin(-1, keepdim=True)
    within = k.clamp(min=0) % per_frame
    return VideoCoords(
        real=real, visual=visual, text_index=m - before, after=real & ~visual & (before > 0),
        start=torch.where(count > 0, start, torch.zeros_like(start)), frames=count // per_frame,
        frame=frame_ids.clamp(min=0), row=within // width, col=within % width,
    )


def _stack_axes(c: VideoCoords, text: torch.Tensor, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[3, B, L]`` float positions: (t, h, w) on visual tokens, ``text`` on all three axes elsewhere, 0 on padding."""
    axes = [torch.where(c.visual, axis.to(torch.float32), text.to(torch.float32)) for axis in (t, h, w)]
    return torch.stack(axes) * c.real


def scaled_section(num_pairs: int, section: tuple[int, ...] = QWEN2VL_SECTION) -> tuple[int, ...]:
    """``section`` rescaled to ``num_pairs`` frequency pairs (largest remainder, sums exactly)."""
    exact = [s * num_pairs / sum(section) for s in section]
    out = [int(x) for x in exact]
    for i in sorted(range(len(out)), key=lambda i: out[i] - exact[i])[: num_pairs - sum(out)]:
        out[i] += 1
    return tuple(out)


@dataclass
class VanillaRoPE:
    """Plain 1D RoPE: position ``m``, one step per token (the HF model's own behaviour)."""

    name: ClassVar[str] = "vanilla"

    def positions(self, frame_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
        return real_token_index(frame_ids, attention_mask).float()

    def next_positions(self, last: torch.Tensor) -> torch.Tensor:
        return last + 1.0

    def pair_axes(self, num_pairs: int) -> None:
        return None

    def on_model_positions(self, native: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """On a family whose positions are its own (Qwen-VL's M-RoPE): those positions, unchanged."""
        return native.float()


@dataclass
class TADRoPE:
    """Temporal-aware dual RoPE: ``p = m + gamma * tau`` (``gamma = 0`` is vanilla RoPE).

    Every generated (text) token advances both ``m`` and ``tau``, so decoding steps by
    ``1 + gamma``. ``gamma`` must be finite and >= 0. With ``-1 < gamma < 0`` a step across a
    frame boundary or between text tokens (``1 + gamma``) would be shorter than a step inside a
    frame (1), reversing the temporal emphasis the method adds; from ``gamma = -1`` on, text and
    decoding positions would stand still or run backwards. No source uses a negative gamma.
    """

    gamma: float = 1.0
    name: ClassVar[str] = "tad"

    def __post_init__(self) -> None:
        self.gamma = number("rope.gamma", self.gamma)

    def positions(self, frame_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
        return temporal_positions(frame_ids, self.gamma, attention_mask)

    def next_positions(self, last: torch.Tensor) -> torch.Tensor:
        return last + 1.0 + self.gamma

    def pair_axes(self, num_pairs: int) -> None:
        return None

    def on_model_positions(self, native: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """On a family whose positions are its own (``[3, B, L]`` M-RoPE): ``gamma * tau`` added to every axis, so a
        temporal step moves t, h and w alike and ``gamma = 0`` is the family's own positions (docs/families.md)."""
        return native.float() + self.gamma * tau.to(torch.float32)


@dataclass
class MRoPE:
    """Qwen2-VL's multimodal RoPE: three position axes (t, h, w) over split frequency pairs.

    With ``s`` the text index of the video's first token, the visual token at frame ``f``,
    row ``r``, column ``c`` of the ``H x W`` grid sits at ``(s + f, s + r, s + c)``; text
    sits at ``t = h = w = `` its running index, and text after a video continues from the
    video's largest index plus one, ``s + max(T - 1, H - 1, W - 1) + 1`` (Qwen2-VL's
    ``get_rope_index``). Frequency pairs ``0 .. P-1`` (highest frequency first) rotate by
    t, h, w in blocks of ``mrope_section`` (Qwen2-VL: 16/24/24 of 64; ``None`` scales that
    split to the model's ``P = head_dim / 2``). Pure text is exactly 1D RoPE.
    """

    mrope_section: tuple[int, int, int] | None = None
    name: ClassVar[str] = "mrope"

    def __post_init__(self) -> None:
        if self.mrope_section is not None:  # a tuple: a Hydra ListConfig must not reach the saved config
            self.mrope_section = integers("rope.mrope_section", self.mrope_section, ("t", "h", "w"))

    def positions(self, frame_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
        c = video_coords(frame_ids, attention_mask, grid, self.name)
        extent = torch.maximum(c.frames - 1, torch.full_like(c.frames, max(grid) - 1)) + 1
        text = c.text_index + c.after * extent
        return _stack_axes(c, text, c.start + c.frame, c.start + c.row, c.start + c.col)

    def next_positions(self, last: torch.Tensor) -> torch.Tensor:
        """After a text token all axes are equal; after a visual one, Qwen2-VL's max + 1."""
        return last.amax(0, keepdim=True).expand_as(last) + 1.0

    def pair_axes(self, num_pairs: int) -> torch.Tensor:
        section = self.mrope_section if self.mrope_section is not None else scaled_section(num_pairs)
        if sum(section) != num_pairs:
            raise ValueError(
                f"rope.mrope_section={list(section)} must be three counts (t, h, w) summing to the model's "
                f"{num_pairs} frequency pairs (head_dim / 2); null scales Qwen2-VL's 16/24/24"
            )
        return torch.repeat_interleave(torch.arange(3), torch.tensor(section))


@dataclass
class VideoRoPE:
    """VideoRoPE (Wei et al., ICML 2025, arXiv:2502.05173): LTA, diagonal layout, spacing ``delta``.

    Positions, as the authors' ``get_t_scale_rope_index`` computes them (github.com/
    Wiselnn570/VideoRoPE, videorope-transformer/modeling_videorope.py): with ``s`` the text
    index of the video's first token, frame ``f`` sits at ``t = s + delta * f``
    (adjustable temporal spacing) and its token at row ``r``, column ``c`` at
    ``(t, t + r - (H-1)//2, t + c - (W-1)//2)``: the spatial indices are centred on the
    temporal one, so a frame moves along the diagonal (diagonal layout). Text sits at
    ``t = h = w = `` its running index; text after the video continues from the last
    frame's temporal index plus one, ``s + delta * (T - 1) + 1``.
    Frequencies (``apply_m_modify_multimodal_rotary_pos_emb`` there): the
    ``temporal_pairs`` lowest-frequency pairs rotate by t (low-frequency temporal
    allocation, 16 of 64 there; ``None`` scales that); the higher ones alternate h, w.
    ``delta = 0`` puts every frame at the same temporal index; a negative or non-finite
    spacing is refused.
    """

    delta: float = 2.0
    temporal_pairs: int | None = None
    name: ClassVar[str] = "videorope"

    def __post_init__(self) -> None:
        self.delta = number("rope.delta", self.delta)
        if self.temporal_pairs is not None:
            self.temporal_pairs = integer("rope.temporal_pairs", self.temporal_pairs)

    def positions(self, frame_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
        c = video_coords(frame_ids, attention_mask, grid, self.name)
        t = c.start + self.delta * c.frame
        text = c.text_index + c.after * (self.delta * (c.frames - 1) + 1)
        return _stack_axes(c, text, t, t + c.row - (grid[0] - 1) // 2, t + c.col - (grid[1] - 1) // 2)

    def next_positions(self, last: torch.Tensor) -> torch.Tensor:
        """Text continues from the temporal axis (equal to the others after a text token)."""
        return last[:1].expand_as(last) + 1.0

    def pair_axes(self, num_pairs: int) -> torch.Tensor:
        temporal = self.temporal_pairs if self.temporal_pairs is not None else scaled_section(num_pairs)[0]
        if temporal > num_pairs:
            raise ValueError(
                f"rope.temporal_pairs={temporal} must be between 0 and the model's {num_pairs} frequency pairs"
            )
        spatial = 1 + torch.arange(num_pairs - temporal) % 2  # h, w, h, w, ... on the high frequencies
        return torch.cat([spatial, torch.zeros(temporal, dtype=torch.long)])


RopeRule = VanillaRoPE | TADRoPE | MRoPE | VideoRoPE

# Every rope rule under the name that configs and checkpoints know it by: a checkpoint names a
# rule, never a class or a callable.
ROPE_RULES: dict[str, type[RopeRule]] = {rule.name: rule for rule in (VanillaRoPE, TADRoPE, MRoPE, VideoRoPE)}


def multi_axis_cos_sin(
    positions: torch.Tensor, pair_axes: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, L, 2P]`` where pair ``k`` rotates by ``positions[pair_axes[k]] * inv_freq[k]``.

    Same layout and float32 math as HF's rotary modules (``cat(freqs, freqs)``, times the
    module's ``attention_scaling``), so one axis everywhere equals the plain 1D result.
    """
    if positions.ndim != 3 or pair_axes.shape != inv_freq.shape:
        raise ValueError(
            f"multi-axis positions must be [axes, B, L] with one axis per frequency pair ({inv_freq.numel()}); "
            f"got positions {tuple(positions.shape)} and pair_axes {tuple(pair_axes.shape)}"
        )
    per_axis = positions.float()[..., None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    index = pair_axes.to(positions.device).view(1, 1, 1, -1).expand(1, *per_axis.shape[1:])
    freqs = per_axis.gather(0, index)[0]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


class RotaryPositions(nn.Module):
    """Wraps an LLM's rotary module so one forward can hand it float positions.

    The LLM keeps calling ``rotary_emb(x, position_ids)``; inside :meth:`use` the wrapped
    module rotates by the given ``[B, L]`` positions instead, or, for ``[3, B, L]``
    positions with ``pair_axes``, cos/sin are built here from its ``inv_freq`` and
    ``attention_scaling``. It holds no weights, so checkpoints and state dicts are unchanged.
    """

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary
        self.positions: torch.Tensor | None = None
        self.pair_axes: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        """Rotated frequency pairs per head (``head_dim / 2`` unless the rotation is partial)."""
        return self.rotary.inv_freq.numel()

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.positions is None:
            return self.rotary(x, position_ids)
        if self.pair_axes is None:
            return self.rotary(x, self.positions)
        return multi_axis_cos_sin(self.positions, self.pair_axes, self.rotary.inv_freq,
                                  self.rotary.attention_scaling, x.dtype)

    def use(self, positions: torch.Tensor, pair_axes: torch.Tensor | None = None) -> "_Override":
        """Rotate by ``positions`` ([B, L]; or [3, B, L] with ``pair_axes``) inside the ``with`` block."""
        if (positions.ndim == 3) != (pair_axes is not None):
            raise ValueError(
                f"positions of shape {tuple(positions.shape)} need pair_axes exactly when they are [axes, B, L]"
            )
        return _Override(self, positions, pair_axes)


class _Override:
    def __init__(self, module: RotaryPositions, positions: torch.Tensor, pair_axes: torch.Tensor | None) -> None:
        self.module, self.new = module, (positions, pair_axes)

    def __enter__(self) -> None:
        self.old = (self.module.positions, self.module.pair_axes)
        self.module.positions, self.module.pair_axes = self.new

    def __exit__(self, *exc: object) -> None:
        self.module.positions, self.module.pair_axes = self.old
