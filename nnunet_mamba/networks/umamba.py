"""U-Mamba (Ma, Li & Wang, 2024): a residual U-Net with Mamba layers, one implementation for 2D and 3D.

``UMambaBot`` puts one Mamba layer on the bottleneck; ``UMambaEnc`` puts one after encoder stages, switching to
channel tokens where a feature map has no more voxels than channels (so it needs the patch size,
``input_size``; Bot takes it too, to check the patch against the strides when built). Constructor arguments are
nnU-Net's architecture kwargs, so a plans file can name either class.

Faithful to the original, including what its state dicts record (see ``docs`` in the README):
- encoder stages from ceil(n_stages / 2) on and decoder stages from ceil(n_stages / 2) - 1 on (except the
  bottleneck's neighbour) have a single residual block, whatever the plans say;
- the 2D decoder's last stage does not concatenate the full-resolution skip (the 3D one does);
- 2D ``UMambaEnc`` has Mamba layers on every other stage, counted back from the bottleneck; 3D on all stages.
``last_stage_skip`` and ``mamba_stages`` override the last two. ``mamba_residual=True`` (not the original) adds each
Mamba layer's input to its output; ``channel_tokens=False`` (not the original) keeps voxel tokens on every stage.
The caller's lists are never modified.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..layers import MambaLayer, UpsampleConv, conv_dim, stack_residual_blocks
from ..layers.blocks import as_tuple
from .base import SegmentationNetwork, per_stage
from .registry import register_network

IntOrSeq = int | Sequence[int]


class UMambaEncoder(nn.Module):
    """Residual encoder: a stem at full resolution, then ``n_stages`` strided stages; optional Mamba layers."""

    def __init__(self, input_channels: int, features_per_stage: list[int], conv_op: type[_ConvNd],
                 kernel_sizes: list, strides: list, n_blocks_per_stage: list[int], conv_bias: bool, norm_op,
                 norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs,
                 mamba_layers: list[MambaLayer | None] | None = None) -> None:
        super().__init__()
        common = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                      dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        self.stem = stack_residual_blocks(conv_op, input_channels, features_per_stage[0], kernel_sizes[0], 1,
                                          n_blocks_per_stage[0], **common)
        if mamba_layers is not None:
            self.mamba_layers = nn.ModuleList([m if m is not None else nn.Identity() for m in mamba_layers])
        channels = features_per_stage[0]
        stages = []
        for s, features in enumerate(features_per_stage):
            stages.append(stack_residual_blocks(conv_op, channels, features, kernel_sizes[s], strides[s],
                                                n_blocks_per_stage[s], **common))
            channels = features
        self.stages = nn.ModuleList(stages)
        self.output_channels = list(features_per_stage)
        self.strides = [as_tuple(s, conv_dim(conv_op)) for s in strides]
        self.kernel_sizes = kernel_sizes

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if hasattr(self, "mamba_layers"):
                x = self.mamba_layers[s](x)
            skips.append(x)
        return skips


class UMambaDecoder(nn.Module):
    """Nearest upsampling + 1x1 conv, concatenation with the skip, residual blocks, and 1x1 segmentation heads."""

    def __init__(self, encoder: UMambaEncoder, conv_op: type[_ConvNd], num_classes: int,
                 n_blocks_per_stage: list[int], deep_supervision: bool, last_stage_skip: bool, conv_bias: bool,
                 norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.last_stage_skip = last_stage_skip
        channels = encoder.output_channels
        n_stages = len(channels)
        upsample, stages, heads = [], [], []
        for s in range(1, n_stages):
            below, skip = channels[-s], channels[-(s + 1)]
            concatenates = s < n_stages - 1 or last_stage_skip
            upsample.append(UpsampleConv(conv_op, below, skip, encoder.strides[-s]))
            stages.append(stack_residual_blocks(
                conv_op, 2 * skip if concatenates else skip, skip, encoder.kernel_sizes[-(s + 1)], 1,
                n_blocks_per_stage[s - 1], conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs,
                nonlin, nonlin_kwargs))
            heads.append(conv_op(skip, num_classes, kernel_size=1, bias=True))
        self.stages = nn.ModuleList(stages)
        self.upsample_layers = nn.ModuleList(upsample)
        self.seg_layers = nn.ModuleList(heads)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for s, (upsample, stage) in enumerate(zip(self.upsample_layers, self.stages)):
            x = upsample(x)
            if s < last or self.last_stage_skip:
                x = torch.cat((x, skips[-(s + 2)]), dim=1)
            x = stage(x)
            if self.deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        outputs.reverse()  # highest resolution first, as nnU-Net's deep-supervision loss expects
        return outputs if self.deep_supervision else outputs[0]


class UMamba(SegmentationNetwork):
    """U-Mamba with the Mamba layer(s) at the bottleneck (``placement='bottleneck'``) or in the encoder."""

    placement: str = "bottleneck"

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: int | Sequence[int],
                 conv_op: type[_ConvNd], kernel_sizes: IntOrSeq | Sequence[IntOrSeq],
                 strides: IntOrSeq | Sequence[IntOrSeq], n_conv_per_stage: int | Sequence[int],
                 num_classes: int, n_conv_per_stage_decoder: int | Sequence[int], conv_bias: bool = False,
                 norm_op: type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 dropout_op: type[nn.Module] | None = None, dropout_op_kwargs: dict | None = None,
                 nonlin: type[nn.Module] | None = None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, input_size: Sequence[int] | None = None,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, last_stage_skip: bool | None = None,
                 mamba_stages: Sequence[bool] | None = None, mamba_residual: bool = False,
                 channel_tokens: bool = True) -> None:
        super().__init__()
        dim = conv_dim(conv_op)
        if norm_op is None or nonlin is None:
            raise ValueError("U-Mamba needs norm_op and nonlin (its residual blocks always normalise and activate)")
        if n_stages < 2:  # with one stage the decoder would be empty and the network return nothing
            raise ValueError(f"n_stages must be at least 2, got {n_stages}")
        features = per_stage(features_per_stage, n_stages, "features_per_stage")
        kernel_sizes = [as_tuple(k, dim) for k in per_stage(kernel_sizes, n_stages, "kernel_sizes")]
        strides = [as_tuple(s, dim) for s in per_stage(strides, n_stages, "strides")]
        for name, values in (("kernel_sizes", kernel_sizes), ("strides", strides)):
            if any(len(v) != dim for v in values):
                raise ValueError(f"{name} must have {dim} entries per stage for {conv_op.__name__}, got {values}")
        blocks = per_stage(n_conv_per_stage, n_stages, "n_conv_per_stage")
        blocks_dec = per_stage(n_conv_per_stage_decoder, n_stages - 1, "n_conv_per_stage_decoder")
        # The original reduces these in place; we reduce copies.
        for s in range(math.ceil(n_stages / 2), n_stages):
            blocks[s] = 1
        for s in range(math.ceil((n_stages - 1) / 2 + 0.5), n_stages - 1):
            blocks_dec[s] = 1

        self.input_channels = input_channels
        self.num_classes = num_classes
        self.dim = dim
        self.conv_op = conv_op
        self.input_size = None if input_size is None else tuple(int(i) for i in input_size)
        self.total_stride = tuple(int(np.prod([s[d] for s in strides])) for d in range(dim))
        if self.input_size is not None:
            self._check_input_size(dim)
        mamba_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, residual=mamba_residual)
        conv_kwargs = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs,
                           dropout_op=dropout_op, dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin,
                           nonlin_kwargs=nonlin_kwargs)

        encoder_mamba = None
        if self.placement == "encoder":
            encoder_mamba = self._encoder_mamba_layers(features, strides, dim, mamba_stages, channel_tokens,
                                                       mamba_kwargs)
        self._fixed_input_size = any(m is not None and m.channel_token for m in encoder_mamba or [])
        self.encoder = UMambaEncoder(input_channels, features, conv_op, kernel_sizes, strides, blocks,
                                     mamba_layers=encoder_mamba, **conv_kwargs)
        if self.placement == "bottleneck":
            self.mamba_layer = MambaLayer(features[-1], **mamba_kwargs)
        self.decoder = UMambaDecoder(self.encoder, conv_op, num_classes, blocks_dec, deep_supervision,
                                     last_stage_skip=(dim == 3) if last_stage_skip is None else last_stage_skip,
                                     **conv_kwargs)
        self.apply(self.initialize)
        # DNA's hooks (nnssl / OpenMind fine-tuning): the stem's first residual block reads the image twice, in its
        # first convolution and in its 1x1 projection of the skip
        self.key_to_encoder = "encoder"
        self.key_to_stem = "encoder.stem"
        self.keys_to_in_proj = ("encoder.stem.0.conv1", "encoder.stem.0.conv3")

    def _check_input_size(self, dim: int) -> None:
        """Catch a patch size the plans' strides cannot take when the network is built, not at the first batch."""
        if len(self.input_size) != dim:
            raise ValueError(f"input_size must have {dim} entries for {dim}D, got {self.input_size}")
        if any(i % t for i, t in zip(self.input_size, self.total_stride)) or self.input_size == self.total_stride:
            suggestion = [max(2, round(i / t)) * t for i, t in zip(self.input_size, self.total_stride)]
            raise ValueError(f"patch_size (input_size) {list(self.input_size)} does not fit the plans' strides: it "
                             f"must be a multiple of the total stride {list(self.total_stride)} on every axis and "
                             f"larger than it on at least one, e.g. {suggestion}; or change strides/n_stages")

    def _encoder_mamba_layers(self, features, strides, dim, mamba_stages, channel_tokens, mamba_kwargs):
        n_stages = len(features)
        if self.input_size is None:
            raise ValueError(f"{type(self).__name__} needs input_size (the patch size, e.g. the plans' patch_size): "
                             "its channel-token Mamba layers are sized from the feature-map sizes")
        if mamba_stages is None:  # the original: 3D every stage; 2D every other stage, ending at the bottleneck
            mamba_stages = [dim == 3 or (n_stages - 1 - s) % 2 == 0 for s in range(n_stages)]
        elif len(mamba_stages) != n_stages:
            raise ValueError(f"mamba_stages must have {n_stages} entries, got {len(mamba_stages)}")
        layers, size = [], list(self.input_size)
        for s in range(n_stages):
            size = [i // j for i, j in zip(size, strides[s])]
            voxels = int(np.prod(size))
            channel_token = channel_tokens and voxels <= features[s]
            layers.append(MambaLayer(voxels if channel_token else features[s], channel_token=channel_token,
                                     **mamba_kwargs) if mamba_stages[s] else None)
        return layers

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He initialisation of convolutions (nnU-Net's ``InitWeights_He(1e-2)``); Mamba's Conv1d keeps its own."""
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _check_spatial(self, spatial: tuple[int, ...]) -> None:
        # not padded, as in the original: U-Mamba takes multiples of the total stride only
        if any(s % t for s, t in zip(spatial, self.total_stride)):
            raise ValueError(f"spatial size {spatial} must be divisible by the total stride {self.total_stride} "
                             "(the product of the plans' strides)")
        if self.training and all(s == t for s, t in zip(spatial, self.total_stride)):
            raise ValueError(f"spatial size {spatial} leaves a single voxel at the bottleneck (total stride "
                             f"{self.total_stride}); instance normalisation cannot train on that. Use a larger patch "
                             "or fewer stages")
        if self._fixed_input_size and spatial != self.input_size:
            raise ValueError(f"{type(self).__name__} was built for input_size={self.input_size} (its channel-token "
                             f"Mamba layers depend on it), got {spatial}")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input(x)
        skips = self.encoder(x)
        if self.placement == "bottleneck":
            skips[-1] = self.mamba_layer(skips[-1])
        return self.decoder(skips)


@register_network("umamba_bot", dims=(2, 3), sized_by_plans=True,
                  summary="U-Mamba Bot: residual U-Net, one Mamba layer at the bottleneck (Ma et al. 2024)")
class UMambaBot(UMamba):
    placement = "bottleneck"


@register_network("umamba_enc", dims=(2, 3), needs_input_size=True, sized_by_plans=True,
                  summary="U-Mamba Enc: residual U-Net, Mamba layers after encoder stages (Ma et al. 2024)")
class UMambaEnc(UMamba):
    placement = "encoder"

