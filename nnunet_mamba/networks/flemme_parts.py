"""The modules of Flemme's networks: per encoder family its blocks, patch operations and heads, and the encoder
and decoder that string them together (blocks: :mod:`nnunet_mamba.layers.flemme`).

Module tree (C0 = patch width, C1..Cn = level widths, M = middle width; strides: p = patch, s_i)
    encoder.patch_embed    conv family: conv k=2p-p%2, stride p (C_in -> C0); token family: conv k = stride = p
    encoder.stages[i]      ``num_blocks`` blocks C_{i} -> C_{i+1} at level i (resolution 1 / (p s_1 .. s_i))
    encoder.downsamples[i] conv family: conv k=2s-s%2, stride s_{i+1}; token family: patch merging (+ LayerNorm)
    encoder.middle[j]      ``middle_depth`` groups of ``num_blocks`` blocks at the bottleneck (C_n -> M -> M)
    decoder.upsamples[i]   conv family: transposed conv; token family: patch expanding (+ LayerNorm); into the skip
                           width (U-Nets), keeping the width (resnet)
    decoder.stages[i]      ``num_blocks`` blocks on the concatenation [skip, upsampled] (resnet: the upsampled map)
    decoder.seg_layers.recovery  conv family: transposed conv k=2p-p%2, stride p to the classes; token family: patch
                           expanding by p (width kept, no norm) + 1x1 conv to the classes
    H-SeM only:
    side_blocks[j]         on the bottleneck and every decoder stage: FlemmeResConvBlock (conv family) or MambaBlock
                           (token family, also for swinu, as the original); with the network's norm / LayerNorm
                           (the original passes its side blocks a keyword they ignore: batch norm / no norm)
    decoder.seg_layers.sides[j]  1x1 conv to the classes (the original pads these by 1, growing each side output by 2
                           voxels per axis; here no padding)
    decoder.seg_layers.combination  CombinationLayer (paper Eq. 12): [final prediction, sides] resized to the patch,
                           + learnable position encoding, concatenated, 1x1 conv
    Every layer that depends on the number of classes is under ``decoder.seg_layers``, which nnU-Net's
    ``-pretrained_weights`` leaves out.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..layers.blocks import conv_dim
from ..layers.flemme import (FlemmeConvBlock, MambaBlock, PatchEmbedding, PatchExpanding, PatchMerging, PatchRecovery,
                             FlemmeResConvBlock, ResMambaBlock, ResSwinBlock, SwinBlock, strided_conv)


class ConvParts:
    """Modules of the convolutional encoders (channels-first maps)."""

    channel_axis = 1

    def __init__(self, conv_op: type[_ConvNd], building_block: str, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs,
                 attention_heads: int) -> None:
        self.conv_op = conv_op
        self.block_class = FlemmeConvBlock if building_block == "conv" else FlemmeResConvBlock
        self.norm = {"norm_op": norm_op, "norm_op_kwargs": norm_op_kwargs, "nonlin": nonlin,
                     "nonlin_kwargs": nonlin_kwargs}
        self.attention_heads = attention_heads

    def block(self, input_channels: int, output_channels: int, kernel: Sequence[int], index: int,
              drop_path: float, attention: bool) -> nn.Module:
        return self.block_class(self.conv_op, input_channels, output_channels, kernel, **self.norm,
                                attention_heads=self.attention_heads if attention else 0)

    def embed(self, input_channels: int, output_channels: int, stride: Sequence[int]) -> nn.Module:
        return strided_conv(self.conv_op, input_channels, output_channels, stride)

    def downsample(self, channels: int, stride: Sequence[int]) -> nn.Module:
        return strided_conv(self.conv_op, channels, channels, stride)

    def upsample(self, input_channels: int, output_channels: int, stride: Sequence[int]) -> nn.Module:
        return strided_conv(self.conv_op, input_channels, output_channels, stride, transposed=True)

    def recovery(self, input_channels: int, num_classes: int, stride: Sequence[int]) -> nn.Module:
        return strided_conv(self.conv_op, input_channels, num_classes, stride, transposed=True)

    def side_block(self, channels: int, kernel: Sequence[int]) -> nn.Module:
        return FlemmeResConvBlock(self.conv_op, channels, channels, kernel, **self.norm)


class SwinParts:
    """Modules of Swin-U (channels-last maps inside the encoder and decoder)."""

    channel_axis = -1

    def __init__(self, conv_op: type[_ConvNd], building_block: str, window_size: Sequence[int], num_heads: int,
                 mlp_ratio: float) -> None:
        self.conv_op = conv_op
        self.dim = conv_dim(conv_op)
        self.residual = building_block.startswith("res_")
        self.window_size = tuple(window_size)
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio

    def block(self, input_channels: int, output_channels: int, kernel: Sequence[int], index: int,
              drop_path: float, attention: bool) -> nn.Module:
        # every other block of a stage shifts its windows (the original's kwargs_list)
        if self.residual:
            return ResSwinBlock(input_channels, output_channels, self.window_size, self.num_heads,
                                shifted_first=index % 2 == 1, mlp_ratio=self.mlp_ratio, drop_path=drop_path)
        return SwinBlock(input_channels, output_channels, self.window_size, self.num_heads, shifted=index % 2 == 1,
                         mlp_ratio=self.mlp_ratio, drop_path=drop_path)

    def embed(self, input_channels: int, output_channels: int, stride: Sequence[int]) -> nn.Module:
        return PatchEmbedding(self.conv_op, input_channels, output_channels, stride)

    def downsample(self, channels: int, stride: Sequence[int]) -> nn.Module:
        return PatchMerging(channels, channels, stride)

    def upsample(self, input_channels: int, output_channels: int, stride: Sequence[int]) -> nn.Module:
        return PatchExpanding(input_channels, output_channels, stride)

    def recovery(self, input_channels: int, num_classes: int, stride: Sequence[int]) -> nn.Module:
        return PatchRecovery(self.conv_op, input_channels, num_classes, stride)

    def side_block(self, channels: int, kernel: Sequence[int]) -> nn.Module:
        return MambaBlock(channels, channels, self.dim)


class MambaParts(SwinParts):
    """Modules of Mamba-U: Swin-U's patch operations with Mamba blocks."""

    def __init__(self, conv_op: type[_ConvNd], building_block: str, scan: str, flip_scan: bool,
                 d_state: int | None, mlp_ratio: float) -> None:
        super().__init__(conv_op, building_block, (), 0, mlp_ratio)
        self.mamba = {"scan": scan, "flip_scan": flip_scan, "d_state": d_state, "mlp_ratio": mlp_ratio}

    def block(self, input_channels: int, output_channels: int, kernel: Sequence[int], index: int,
              drop_path: float, attention: bool) -> nn.Module:
        block_class = ResMambaBlock if self.residual else MambaBlock
        return block_class(input_channels, output_channels, self.dim, drop_path=drop_path, **self.mamba)

    def side_block(self, channels: int, kernel: Sequence[int]) -> nn.Module:
        return MambaBlock(channels, channels, self.dim, **self.mamba)


def stage(parts, input_channels: int, output_channels: int, kernel: Sequence[int], drop_paths: Sequence[float],
           attention: bool = False) -> nn.Sequential:
    """One block per drop-path rate, the first changing the width."""
    return nn.Sequential(*[parts.block(input_channels if i == 0 else output_channels, output_channels, kernel, i,
                                       rate, attention) for i, rate in enumerate(drop_paths)])


class FlemmeEncoder(nn.Module):
    """Patch embedding; per level its blocks (the skip) and a down-sampling; the middle layers."""

    def __init__(self, patch_embed: nn.Module, stages: Sequence[nn.Module], downsamples: Sequence[nn.Module],
                 middle: nn.Module) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.stages = nn.ModuleList(stages)
        self.downsamples = nn.ModuleList(downsamples)
        self.middle = middle

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The bottleneck features and the skips, highest resolution first."""
        x = self.patch_embed(x)
        skips = []
        for stage, downsample in zip(self.stages, self.downsamples):
            x = stage(x)
            skips.append(x)
            x = downsample(x)
        return self.middle(x), skips


class FlemmeDecoder(nn.Module):
    """The mirrored decoder; ``deep_supervision`` is the switch nnU-Net sets (used by H-SeM)."""

    def __init__(self, upsamples: Sequence[nn.Module], stages: Sequence[nn.Module], recovery: nn.Module,
                 skip_connections: bool, channel_axis: int, deep_supervision: bool) -> None:
        super().__init__()
        self.upsamples = nn.ModuleList(upsamples)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleDict({"recovery": recovery})  # H-SeM adds its heads here
        self.skip_connections = skip_connections
        self.channel_axis = channel_axis
        self.deep_supervision = deep_supervision

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Full-resolution logits (channels-first) and every stage's features, lowest resolution first."""
        features = []
        for upsample, stage, skip in zip(self.upsamples, self.stages, reversed(skips)):
            x = upsample(x)
            if self.skip_connections:
                x = torch.cat((skip, x), dim=self.channel_axis)
            x = stage(x)
            features.append(x)
        return self.seg_layers["recovery"](x), features


