"""PLLaVA's adaptive pooling projector: the MLP output pooled over (T, H, W).

PLLaVA runs the checkpoint's 2-layer MLP projector per frame, then ``AdaptiveAvgPool3d``
over the frame axis and the spatial grid, e.g. 16 x 24 x 24 -> 16 x 12 x 12 = 2,304
visual tokens. ``pooling_shape=None`` keeps the MLP output as it is. On the video families
the pooling takes the tokens their own video path gives per frame (NeXT-Video's 12 x 12,
OneVision's 14 x 14). Each sample is pooled over its own frames; one frame (an image) is
pooled in space only.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from tc_llava.model.params import integers


class VideoPooling(nn.Module):
    """Pool per-frame projected features ``[B, T, H*W, D]`` to ``[B, T'*H'*W', D]``."""

    def __init__(self, pooling_shape: tuple[int, int, int] | list[int] | None = None) -> None:
        super().__init__()
        self.pooling_shape = (
            None if pooling_shape is None else integers("projector.pooling_shape", pooling_shape, ("T", "H", "W"), 1)
        )

    @property
    def name(self) -> str:
        return "mlp" if self.pooling_shape is None else "pllava_pool"

    def output_grid(self, num_frames: int, grid: tuple[int, int]) -> tuple[int, int, int]:
        """(frames, height, width) of the visual tokens for ``num_frames`` frames of a ``grid``.

        Pooling never upsamples; a shape it cannot reach is refused naming the axis at fault
        (the vision tower's grid fixes H and W, the data's frame count fixes T). A single frame
        is an image: it keeps its one frame and is pooled in space only.
        """
        if self.pooling_shape is None:
            return num_frames, grid[0], grid[1]
        t, h, w = self.pooling_shape
        problems = []
        if h > grid[0] or w > grid[1]:
            problems.append(f"its {h}x{w} spatial shape exceeds the {grid[0]}x{grid[1]} token grid of the vision "
                            f"tower (valid: H 1..{grid[0]}, W 1..{grid[1]})")
        if num_frames == 1:
            t = 1
        elif t > num_frames:
            problems.append(f"its T={t} exceeds the {num_frames} frames given "
                            f"(valid: T 1..{num_frames}, or use at least {t} frames)")
        if problems:
            raise ValueError(f"projector.pooling_shape={list(self.pooling_shape)} cannot be pooled: "
                             f"{'; '.join(problems)}; pooling never upsamples")
        return t, h, w

    def pool(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """One sample's per-frame features ``[T, H*W, D]`` -> its visual tokens ``[T'*H'*W', D]``."""
        if self.pooling_shape is None:
            return features.flatten(0, 1)
        x = rearrange(features, "t (h w) d -> 1 d t h w", h=grid[0], w=grid[1])
        x = nn.functional.adaptive_avg_pool3d(x, self.output_grid(features.shape[0], grid))
        return rearrange(x, "1 d t h w -> (t h w) d")

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Equal frame counts ``[B, T, H*W, D]`` -> ``[B, T'*H'*W', D]``."""
        return torch.stack([self.pool(sample, grid) for sample in features])


def mlp_projector(model_pooling_shape: list[int] | None = None) -> VideoPooling:
    """``projector=mlp``: the checkpoint's MLP projector as it is (``model_pooling_shape`` unused)."""
    return VideoPooling(None)


def pllava_projector(pooling_shape: list[int] | None = None,
                     model_pooling_shape: list[int] | None = None) -> VideoPooling:
    """``projector=pllava_pool``: MLP, then adaptive 3D pooling to ``pooling_shape``, by default the
    model's own PLLaVA shape (16x12x12 for CLIP ViT-L/336 towers), so every model/projector pair composes."""
    shape = pooling_shape if pooling_shape is not None else model_pooling_shape
    if shape is None:
        raise ValueError("projector=pllava_pool needs projector.pooling_shape (T, H, W): this model has no default")
    return VideoPooling(shape)
