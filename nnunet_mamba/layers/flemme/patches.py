"""Flemme's patch operations on channels-last maps (token networks): embedding (strided conv), merging
(neighbours concatenated in the original's order, linear, LN), expanding (linear, depth-to-space, LN) and recovery
(expanding, 1x1 conv to the classes)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd



def _space_to_depth(x: torch.Tensor, factor: Sequence[int], first_axis_fastest: bool = False) -> torch.Tensor:
    """(B, *S, C) -> (B, *S / f, prod(f) * C): each output token holds its f-neighbourhood, offsets outermost.

    The neighbours are concatenated in C order of their offsets (the last axis' offset varies fastest), or, with
    ``first_axis_fastest``, with the first axis' offset varying fastest (Flemme's patch merging)."""
    dim = len(factor)
    spatial = x.shape[1:-1]
    split = [n for size, f in zip(spatial, factor) for n in (size // f, f)]
    x = x.reshape(x.shape[0], *split, x.shape[-1])
    coarse = [1 + 2 * a for a in range(dim)]
    offsets = [2 + 2 * a for a in range(dim)]
    if first_axis_fastest:
        offsets.reverse()
    x = x.permute(0, *coarse, *offsets, 2 * dim + 1)
    return x.reshape(x.shape[0], *(size // f for size, f in zip(spatial, factor)), -1)


def _depth_to_space(x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`_space_to_depth`: (B, *S, prod(f) * C) -> (B, *S * f, C)."""
    dim = len(factor)
    spatial = x.shape[1:-1]
    x = x.reshape(x.shape[0], *spatial, *factor, -1)
    order = [i for a in range(dim) for i in (1 + a, 1 + dim + a)]
    x = x.permute(0, *order, 2 * dim + 1)
    return x.reshape(x.shape[0], *(size * f for size, f in zip(spatial, factor)), x.shape[-1])


class PatchEmbedding(nn.Module):
    """Non-overlapping patches: a convolution with kernel = stride = ``patch``; channels-first in, channels-last out."""

    def __init__(self, conv_op: type[_ConvNd], input_channels: int, output_channels: int,
                 patch: Sequence[int]) -> None:
        super().__init__()
        self.proj = conv_op(input_channels, output_channels, tuple(patch), stride=tuple(patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).movedim(1, -1)


class PatchMerging(nn.Module):
    """Swin's down-sampling: the ``factor`` neighbourhood concatenated, a bias-free linear map, LayerNorm.

    The neighbours are concatenated as the original's ``PatchMergingBlock`` (``flemme/block/swin.py``, commit
    0be9dade) orders them, the first spatial axis' offset fastest: 2D [x(0::2, 0::2), x(1::2, 0::2),
    x(0::2, 1::2), x(1::2, 1::2)], 3D x0..x7 with offsets (0,0,0), (1,0,0), (0,1,0), (1,1,0), (0,0,1), ...
    The original merges by 2 on every axis (a factor 2^k is k such merges); other factors (an anisotropic stride
    from the plans) extend that order: the first axis' offset fastest, the last's slowest.
    """

    def __init__(self, input_channels: int, output_channels: int, factor: Sequence[int]) -> None:
        super().__init__()
        self.factor = tuple(factor)
        self.reduction = nn.Linear(math.prod(self.factor) * input_channels, output_channels, bias=False)
        self.norm = nn.LayerNorm(output_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(_space_to_depth(x, self.factor, first_axis_fastest=True)))


class PatchExpanding(nn.Module):
    """Up-sampling by ``factor``: a bias-free linear map to prod(factor) * out channels (none when that is already
    the input width, as in the original), depth-to-space, then LayerNorm (``norm``)."""

    def __init__(self, input_channels: int, output_channels: int, factor: Sequence[int], norm: bool = True) -> None:
        super().__init__()
        self.factor = tuple(factor)
        expanded = math.prod(self.factor) * output_channels
        self.expand = nn.Linear(input_channels, expanded, bias=False) if expanded != input_channels else nn.Identity()
        self.norm = nn.LayerNorm(output_channels) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_depth_to_space(self.expand(x), self.factor))


class PatchRecovery(nn.Module):
    """Back to the image grid: patch expanding by ``patch`` (width kept, no norm), then a 1x1 convolution;
    channels-last in, channels-first out."""

    def __init__(self, conv_op: type[_ConvNd], input_channels: int, output_channels: int,
                 patch: Sequence[int]) -> None:
        super().__init__()
        self.expand = PatchExpanding(input_channels, input_channels, patch, norm=False)
        self.proj = conv_op(input_channels, output_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.expand(x).movedim(-1, 1))
