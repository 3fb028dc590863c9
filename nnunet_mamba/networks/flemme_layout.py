"""Flemme's sizes from nnU-Net's U-Net layout (the plans' stages, widths, strides and kernels).

nnU-Net plans -> Flemme sizes (S = n_stages >= 3; sized by the plans' stages and widths, the paper's defaults
for everything the plans do not say)
    patch channels      features_per_stage[0]
    patch stride        strides[0] * strides[1]                 (per axis; the first down-sampling)
    level widths        features_per_stage[1 : S - 1]          (Flemme's down_channels)
    level strides       strides[2:]                             (down-sampling after each level)
    middle widths       [features_per_stage[-1]] * middle_depth (Flemme's middle_channels; middle_depth = 2)
    conv kernels        kernel_sizes[i + 1] at level i, kernel_sizes[-1] in the middle (conv family; default 3)
    norm / nonlin       the plans' norm_op / nonlin in conv blocks (nnU-Net: instance norm, LeakyReLU), else
                        batch norm and ReLU (the paper's); token blocks always use LayerNorm and SiLU (Flemme's)
    num_blocks          2 (per stage, the paper's; nnU-Net's n_conv_per_stage is not used)
    swin                num_heads 3, window 8 per axis in 2D, 4 in 3D (8^3 = 512-token windows are too costly
                        for nnU-Net's 3D patches), mlp_ratio 4; mamba: scan 'single', no flip, d_state ceil(C/6)
    drop_path_rate      0.1 (token blocks), rising linearly over the encoder, falling over the decoder
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..layers.blocks import as_tuple
from .base import per_stage


@dataclass(frozen=True)
class FlemmeLayout:
    """Flemme's sizes from nnU-Net's U-Net layout; see the module docstring for the mapping."""

    patch_channels: int
    patch_stride: tuple[int, ...]
    level_channels: tuple[int, ...]
    level_strides: tuple[tuple[int, ...], ...]
    middle_channels: tuple[int, ...]
    level_kernels: tuple[tuple[int, ...], ...]
    middle_kernel: tuple[int, ...]

    @classmethod
    def from_plans(cls, dim: int, n_stages: int, features_per_stage: Sequence[int], strides: Sequence,
                   kernel_sizes: Sequence | None, middle_depth: int) -> FlemmeLayout:
        if n_stages < 3:
            raise ValueError(f"Flemme networks need n_stages >= 3 (patch embedding, at least one level, the "
                             f"middle layers), got {n_stages}")
        if middle_depth < 1:
            raise ValueError(f"middle_depth must be at least 1, got {middle_depth}")
        features = per_stage(features_per_stage, n_stages, "features_per_stage", broadcast=False)
        if any(not isinstance(f, int) or f < 1 for f in features):
            raise ValueError(f"features_per_stage must be positive integers, got {features}")
        strides = [as_tuple(s, dim) for s in per_stage(strides, n_stages, "strides", broadcast=False)]
        kernels = [as_tuple(k, dim) for k in (per_stage(kernel_sizes, n_stages, "kernel_sizes", broadcast=False)
                                              if kernel_sizes is not None else [3] * n_stages)]
        for name, values in (("strides", strides), ("kernel_sizes", kernels)):
            if any(len(v) != dim or min(v) < 1 for v in values):
                raise ValueError(f"{name} must have {dim} positive entries per stage for {dim}D, got {values}")
        return cls(patch_channels=features[0],
                   patch_stride=tuple(a * b for a, b in zip(strides[0], strides[1])),
                   level_channels=tuple(features[1:-1]),
                   level_strides=tuple(strides[2:]),
                   middle_channels=(features[-1],) * middle_depth,
                   level_kernels=tuple(kernels[1:-1]),
                   middle_kernel=kernels[-1])

    def level_scales(self) -> list[tuple[int, ...]]:
        """Cumulative stride of every level, then of the bottleneck (the total stride)."""
        scales = [self.patch_stride]
        for stride in self.level_strides:
            scales.append(tuple(a * b for a, b in zip(scales[-1], stride)))
        return scales

