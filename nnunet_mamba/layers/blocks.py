"""Convolutional and Mamba blocks shared by the networks; each works in 2D and 3D, chosen by ``conv_op``."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from torch.nn.modules.conv import _ConvNd

from .mamba import Mamba

IntOrSeq = int | Sequence[int]


def conv_dim(conv_op: type[_ConvNd]) -> int:
    """Spatial dimensionality (2 or 3) of a convolution class; raises for anything else."""
    if isinstance(conv_op, type) and issubclass(conv_op, (nn.Conv2d, nn.ConvTranspose2d)):
        return 2
    if isinstance(conv_op, type) and issubclass(conv_op, (nn.Conv3d, nn.ConvTranspose3d)):
        return 3
    raise ValueError(f"conv_op must be torch.nn.Conv2d or torch.nn.Conv3d, got {conv_op!r}")


def as_tuple(value: IntOrSeq, dim: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * dim


class ResidualConvBlock(nn.Module):
    """conv-norm-act-conv-norm plus a 1x1 (strided) projection of the input, then act (U-Mamba's BasicResBlock)."""

    def __init__(self, conv_op: type[_ConvNd], input_channels: int, output_channels: int, kernel_size: IntOrSeq,
                 stride: IntOrSeq, norm_op: type[nn.Module], norm_op_kwargs: dict | None,
                 nonlin: type[nn.Module], nonlin_kwargs: dict | None) -> None:
        super().__init__()
        dim = conv_dim(conv_op)
        kernel_size = as_tuple(kernel_size, dim)
        padding = [k // 2 for k in kernel_size]
        self.conv1 = conv_op(input_channels, output_channels, kernel_size, stride=stride, padding=padding)
        self.norm1 = norm_op(output_channels, **(norm_op_kwargs or {}))
        self.act1 = nonlin(**(nonlin_kwargs or {}))
        self.conv2 = conv_op(output_channels, output_channels, kernel_size, padding=padding)
        self.norm2 = norm_op(output_channels, **(norm_op_kwargs or {}))
        self.act2 = nonlin(**(nonlin_kwargs or {}))
        self.conv3 = conv_op(input_channels, output_channels, kernel_size=1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        y += self.conv3(x)  # in place: saves one full-size activation per block (norm backward needs its input only)
        return self.act2(y)


class UpsampleConv(nn.Module):
    """Nearest-neighbour upsampling by the encoder stride, then a 1x1 convolution."""

    def __init__(self, conv_op: type[_ConvNd], input_channels: int, output_channels: int,
                 scale_factor: IntOrSeq) -> None:
        super().__init__()
        self.conv = conv_op(input_channels, output_channels, kernel_size=1)
        self.scale_factor = tuple(float(s) for s in as_tuple(scale_factor, conv_dim(conv_op)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale_factor, mode="nearest"))


class MambaLayer(nn.Module):
    """LayerNorm + Mamba over a feature map, without residual as in U-Mamba (``residual=True`` adds the input).

    Patch-token mode: every voxel is a token with ``dim`` = channels. Channel-token mode (for feature maps with
    fewer voxels than channels): every channel is a token whose features are the flattened voxels, so ``dim``
    is the number of voxels and the layer only accepts that spatial size. Runs in float32 under autocast.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 channel_token: bool = False, residual: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.channel_token = channel_token
        self.residual = residual
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        spatial = x.shape[2:]
        features = spatial.numel() if self.channel_token else channels
        if features != self.dim:
            what = "voxels per channel (channel tokens)" if self.channel_token else "channels"
            raise ValueError(f"MambaLayer was built for {self.dim} {what}, got a feature map of shape "
                             f"{tuple(x.shape)}; channel-token layers only accept the spatial size they were "
                             f"built for (the network's input_size)")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))  # 16-bit inputs only; float64 stays
            tokens = x.flatten(2) if self.channel_token else x.flatten(2).transpose(1, 2)
            out = self.mamba(self.norm(tokens))
            if not self.channel_token:
                out = out.transpose(1, 2)
            out = out.reshape(batch, channels, *spatial)
            return out + x if self.residual else out


def stack_residual_blocks(conv_op: type[_ConvNd], input_channels: int, output_channels: int, kernel_size: IntOrSeq,
                          stride: IntOrSeq, n_blocks: int, conv_bias: bool, norm_op, norm_op_kwargs, dropout_op,
                          dropout_op_kwargs, nonlin, nonlin_kwargs) -> nn.Sequential:
    """One :class:`ResidualConvBlock` (projection, stride) followed by ``n_blocks - 1`` ResNet-D basic blocks."""
    blocks: list[nn.Module] = [ResidualConvBlock(conv_op, input_channels, output_channels, kernel_size, stride,
                                                 norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)]
    blocks += [BasicBlockD(conv_op, output_channels, output_channels, kernel_size, 1, conv_bias, norm_op,
                           norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs)
               for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)
