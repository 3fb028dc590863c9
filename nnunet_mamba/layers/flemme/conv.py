"""Flemme's convolution blocks on channels-first maps (batch, C, *spatial), 2D or 3D by ``conv_op``:
FlemmeConvBlock (conv, norm, activation [, CAtten-U's voxel self-attention]) and FlemmeResConvBlock (paper Eq. 3),
and the strided (transposed) convolutions of the down- and up-sampling paths."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..blocks import as_tuple, conv_dim
from .tokens import MultiHeadAttention



def transposed_conv(conv_op: type[_ConvNd]) -> type[nn.Module]:
    """The transposed convolution of ``conv_op``'s dimensionality."""
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[conv_dim(conv_op)]


def strided_conv(conv_op: type[_ConvNd], input_channels: int, output_channels: int,
                 stride: int | Sequence[int], transposed: bool = False) -> nn.Module:
    """Flemme's down/up-sampling convolution: kernel 2s - s % 2, padding s // 2, stride s (per axis), so that it
    divides (or multiplies) every size that is a multiple of s exactly; a stride of 1 gives a 1x1 convolution."""
    stride = as_tuple(stride, conv_dim(conv_op))
    kernel = tuple(2 * s - s % 2 for s in stride)
    padding = tuple(s // 2 for s in stride)
    op = transposed_conv(conv_op) if transposed else conv_op
    return op(input_channels, output_channels, kernel, stride=stride, padding=padding)


class VoxelSelfAttention(MultiHeadAttention):
    """CAtten-U's attention: self-attention over all voxels of a channels-first map, added to the map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        return x + super().forward(tokens).transpose(1, 2).reshape(x.shape)


class FlemmeConvBlock(nn.Module):
    """Convolution (same padding, bias), normalisation, activation; optionally then voxel self-attention."""

    def __init__(self, conv_op: type[_ConvNd], input_channels: int, output_channels: int,
                 kernel_size: int | Sequence[int], norm_op: type[nn.Module], norm_op_kwargs: dict | None,
                 nonlin: type[nn.Module] | None, nonlin_kwargs: dict | None, attention_heads: int = 0) -> None:
        super().__init__()
        kernel_size = as_tuple(kernel_size, conv_dim(conv_op))
        self.conv = conv_op(input_channels, output_channels, kernel_size, padding=[k // 2 for k in kernel_size])
        self.norm = norm_op(output_channels, **(norm_op_kwargs or {}))
        self.act = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()
        self.attention = VoxelSelfAttention(output_channels, attention_heads) if attention_heads else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.act(self.norm(self.conv(x))))


class FlemmeResConvBlock(nn.Module):
    """Paper Eq. 3: act(norm(conv(FlemmeConvBlock(x))) + shortcut(x)); the shortcut is a 1x1 conv iff widths differ."""

    def __init__(self, conv_op: type[_ConvNd], input_channels: int, output_channels: int,
                 kernel_size: int | Sequence[int], norm_op: type[nn.Module], norm_op_kwargs: dict | None,
                 nonlin: type[nn.Module], nonlin_kwargs: dict | None, attention_heads: int = 0) -> None:
        super().__init__()
        self.conv1 = FlemmeConvBlock(conv_op, input_channels, output_channels, kernel_size, norm_op, norm_op_kwargs,
                                     nonlin, nonlin_kwargs, attention_heads)
        self.conv2 = FlemmeConvBlock(conv_op, output_channels, output_channels, kernel_size, norm_op, norm_op_kwargs,
                                     None, None, attention_heads)
        self.shortcut = (conv_op(input_channels, output_channels, 1) if input_channels != output_channels
                         else nn.Identity())
        self.act = nonlin(**(nonlin_kwargs or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))
