"""PLLaVA's adaptive pooling projector: the MLP output pooled over (T, H, W).

PLLaVA runs the checkpoint's 2-layer MLP projector per frame, then ``AdaptiveAvgPool3d``
over the frame axis and the spatial grid, e.g. 16 x 24 x 24 -> 16 x 12 x 12 = 2,304
visual tokens. ``pooling_shape=None`` keeps the MLP output as it is.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


class VideoPooling(nn.Module):
    """Pool per-frame projected features ``[B, T, H*W, D]`` to ``[B, T'*H'*W', D]``."""

    def __init__(self, pooling_shape: tuple[int, int, int] | list[int] | None = None) -> None:
        super().__init__()
        if pooling_shape is not None and (len(pooling_shape) != 3 or min(pooling_shape) < 1):
            raise ValueError(f"projector.pooling_shape must be three positive ints (T, H, W), got {pooling_shape}")
        self.pooling_shape = tuple(int(s) for s in pooling_shape) if pooling_shape is not None else None

    @property
    def name(self) -> str:
        return "mlp" if self.pooling_shape is None else "pllava_pool"

    def output_grid(self, num_frames: int, grid: tuple[int, int]) -> tuple[int, int, int]:
        """(frames, height, width) of the visual tokens for ``num_frames`` frames of a ``grid``."""
        if self.pooling_shape is None:
            return num_frames, grid[0], grid[1]
        t, h, w = self.pooling_shape
        if t > num_frames or h > grid[0] or w > grid[1]:
            raise ValueError(
                f"projector.pooling_shape={list(self.pooling_shape)} cannot pool {num_frames} frames of a "
                f"{grid[0]}x{grid[1]} grid: pooling never upsamples (use at least {t} frames or a smaller shape)"
            )
        return t, h, w

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.pooling_shape is None:
            return rearrange(features, "b t n d -> b (t n) d")
        self.output_grid(features.shape[1], grid)
        x = rearrange(features, "b t (h w) d -> b d t h w", h=grid[0], w=grid[1])
        x = nn.functional.adaptive_avg_pool3d(x, self.pooling_shape)
        return rearrange(x, "b d t h w -> b (t h w) d")
