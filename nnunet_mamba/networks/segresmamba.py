"""SegResMamba (Das et al., MIDL 2025): a Mamba encoder of Convolution-Mamba Mixed Blocks and a SegResNet decoder.

Implements the paper, with its Mamba layers in use (the released code builds them but its forward never calls
them). 3D only.

Encoder (widths C, 2C, 4C, 8C; C = ``encoder_width`` = 48):
    stem Conv3d 7x7x7 stride 2 (C) -> CMMB                                             skip at stride 2
    3x [InstanceNorm, Conv3d 3x3x3, InstanceNorm, Conv3d 2x2x2 stride 2 (doubling) -> CMMB]   strides 4, 8, 16
The pre-normalised transition convolutions without activation follow the released code.

CMMB, the paper's Algorithm 1, with every convolution followed by InstanceNorm (affine, nnU-Net's choice; the
released code's is not affine) and ReLU, as in the released code:
    F1 = Conv5(X) stride 2, F2 = Conv3(F1), F3 = ToM(F2), F4 = Conv3(F3),
    F5 = ConvTranspose5(F4) stride 2 back to X's size, F6 = F5 + X, out = ToM(F6)
ToM (:class:`~nnunet_mamba.layers.tom.ToM`): LayerNorm + tri-oriented Mamba, no residual, as written.

Decoder (widths W, 2W, 4W, 8W; W = ``decoder_width`` = 96, so the bottleneck enters with the paper's 768):
    skip adapters  InstanceNorm -> Conv 1x1x1 (c -> 2c) -> GELU -> Conv 1x1x1 (2c -> decoder width), the
                   released code's channel MLP, widened to the decoder
    3 up stages    Conv 1x1x1 halving the channels, trilinear upsampling (not trainable) to the skip's size,
                   + adapted skip, one residual block: GroupNorm, ReLU, Conv 3x3x3, GroupNorm, ReLU, Conv 3x3x3,
                   + identity (MONAI's ResBlock; the released SegResNet decoder's blocks_up = (1, 1, 1))
    output         ConvTranspose3d 2x2x2 stride 2 to full resolution; with deep supervision also 1x1x1 heads
                   on the up stages (strides 2, 4, 8)

Size at 1 x 1 x 128^3, 14 classes (tests/test_segresmamba.py checks the count): 76,805,576 parameters
(encoder 64.77M, of which ToMs 3.12M; adapters 1.18M; decoder 10.86M); 329.64 GMACs without the
deep-supervision heads, counted by torch's FlopCounterMode (convolutions and the Mamba layers' matmuls; not the
selective scan, whose 1.8G state updates would add a few GMAC-equivalents). The paper reports 119.98M and
336.45 GMACs. The MACs agree to 2%, so what runs matches the paper's network in size; the parameters do not: most
of the 43.2M gap is what the released code builds and counts but never runs, a whole SegResNet encoder
(blocks_down (1, 2, 2, 4), 48 filters, 4 inputs: 39.58M); the remaining 3.6M we cannot attribute.
Two residual blocks per up stage would add 10.45M parameters and 228 GMACs, far from the paper's MACs.
Counting that unused encoder, 76.81M + 39.58M = 116.39M is 3.0% below the paper's 119.98M: the paper's figure is
the released code's parameter count, not the size of the network it describes and runs. Both figures cannot hold
for a network that runs all its parameters and is what the paper describes: its layers give 76.8M parameters
and 329.64 GMACs (-2.0%); the other 43.2M would have to be layers it does not describe. We keep the described
network and its MACs, and add no parameters that never run.

Any patch size: the input is zero-padded at the end of every axis to a multiple of 16 (the encoder's stride)
and the outputs are cropped; training needs more than 32 voxels along at least one axis (the deepest CMMB
instance-normalises a map at 1/32 of the patch). The network downsamples isotropically whatever the plans'
pool_op_kernel_sizes say, so its deep-supervision outputs are at strides
``SegResMamba.deep_supervision_strides`` (1, 2, 4, 8 on every axis), and a trainer must return
``SegResMamba.deep_supervision_scales`` (nnU-Net's format) from ``nnUNetTrainer._get_deep_supervision_scales``
instead of the scales nnU-Net derives from the plans (plans for nnU-Net's own trainer carry
``strides = network.plan_strides``, from which it derives the same scales; other strides are refused). Each output
is cropped to exactly the size nnU-Net downsamples its targets to for those scales (``round(size * scale)``, see
:meth:`SegResMamba.output_shapes`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.tom import ToM
from .base import SegmentationNetwork, check_positive_ints, scaled_shapes
from .plans import fixed_plan_strides
from .registry import register_network

ENCODER_STRIDE = 16


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm3d(channels, affine=True), nn.ReLU(inplace=True)]


class CMMB(nn.Module):
    """Convolution-Mamba Mixed Block (Algorithm 1); keeps the input's shape, any spatial size."""

    def __init__(self, channels: int, d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        tom = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        self.down = nn.Sequential(nn.Conv3d(channels, channels, 5, stride=2, padding=2), *_norm_act(channels))
        self.conv1 = nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), *_norm_act(channels))
        self.tom1 = ToM(channels, **tom)
        self.conv2 = nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), *_norm_act(channels))
        self.up = nn.ConvTranspose3d(channels, channels, 5, stride=2, padding=2)
        self.up_norm_act = nn.Sequential(*_norm_act(channels))
        self.tom2 = ToM(channels, **tom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv2(self.tom1(self.conv1(self.down(x))))
        # output_size picks the output padding that restores odd and even sizes alike
        f = self.up_norm_act(self.up(f, output_size=x.shape[2:]))
        return self.tom2(f + x)


class SegResMambaEncoder(nn.Module):
    """Stem + CMMB, then three [conv, strided conv, CMMB] stages; returns the four CMMB outputs."""

    def __init__(self, input_channels: int, widths: Sequence[int], d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        self.stem = nn.Conv3d(input_channels, widths[0], 7, stride=2, padding=3)
        self.transitions = nn.ModuleList([
            nn.Sequential(nn.InstanceNorm3d(c, affine=True), nn.Conv3d(c, c, 3, padding=1),
                          nn.InstanceNorm3d(c, affine=True), nn.Conv3d(c, c_next, 2, stride=2))
            for c, c_next in zip(widths[:-1], widths[1:])])
        self.blocks = nn.ModuleList([CMMB(c, d_state, d_conv, expand) for c in widths])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.blocks[0](self.stem(x))]
        for transition, block in zip(self.transitions, self.blocks[1:]):
            skips.append(block(transition(skips[-1])))
        return skips


class SkipAdapter(nn.Sequential):
    """Channel MLP (1x1x1 convolutions) on an instance-normalised encoder feature map."""

    def __init__(self, channels: int, output_channels: int) -> None:
        super().__init__(nn.InstanceNorm3d(channels, affine=True), nn.Conv3d(channels, 2 * channels, 1), nn.GELU(),
                         nn.Conv3d(2 * channels, output_channels, 1))


class ResBlock(nn.Module):
    """Pre-activation residual block with GroupNorm (MONAI's SegResNet ResBlock)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        groups = math.gcd(8, channels)  # 8 groups as SegResNet, fewer for tiny test widths
        self.body = nn.Sequential(nn.GroupNorm(groups, channels), nn.ReLU(inplace=True),
                                  nn.Conv3d(channels, channels, 3, padding=1, bias=False),
                                  nn.GroupNorm(groups, channels), nn.ReLU(inplace=True),
                                  nn.Conv3d(channels, channels, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SegResMambaDecoder(nn.Module):
    """SegResNet decoder from the adapted bottleneck; ``deep_supervision`` is toggled by nnU-Net."""

    def __init__(self, widths: Sequence[int], num_classes: int, deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        levels = range(len(widths) - 2, -1, -1)  # from the level below the bottleneck up to stride 2
        self.reduce = nn.ModuleList([nn.Conv3d(widths[i + 1], widths[i], 1, bias=False) for i in levels])
        self.blocks = nn.ModuleList([ResBlock(widths[i]) for i in levels])
        # the deep-supervision heads from the deepest level up, then the full-resolution head; called seg_layers
        # as in nnU-Net's networks, so that -pretrained_weights leaves them out
        self.seg_layers = nn.ModuleList([nn.Conv3d(widths[i], num_classes, 1) for i in levels]
                                        + [nn.ConvTranspose3d(widths[0], num_classes, 2, stride=2)])

    def forward(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits, highest resolution first: all levels with deep supervision, else only the full-resolution one."""
        x = skips[-1]
        outputs = []
        for reduce, block, head, skip in zip(self.reduce, self.blocks, self.seg_layers[:-1],
                                           reversed(skips[:-1])):
            x = F.interpolate(reduce(x), size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(x + skip)
            if self.deep_supervision:
                outputs.append(head(x))
        outputs.append(self.seg_layers[-1](x))
        return outputs[::-1]


@register_network("segresmamba", dims=(3,),
                  summary="SegResMamba: CMMB encoder with tri-oriented Mamba, SegResNet decoder (Das et al. 2025)")
class SegResMamba(SegmentationNetwork):
    """SegResMamba for nnU-Net 3D patches of any size; see the module docstring for the architecture."""

    only_dim = dim = 3
    total_stride = ENCODER_STRIDE
    deep_supervision_strides: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8))
    # nnU-Net's format (nnUNetTrainer._get_deep_supervision_scales): one scale per axis and output
    deep_supervision_scales: tuple[tuple[float, ...], ...] = tuple(tuple(1 / s for s in strides)
                                                                  for strides in deep_supervision_strides)

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 encoder_width: int = 48, decoder_width: int = 96, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, strides: Sequence | None = None) -> None:
        super().__init__()
        self.plan_strides = fixed_plan_strides("SegResMamba", self.deep_supervision_scales, (ENCODER_STRIDE,) * 3,
                                               strides)
        check_positive_ints(input_channels=input_channels, num_classes=num_classes, encoder_width=encoder_width,
                            decoder_width=decoder_width)
        self.input_channels = input_channels
        self.num_classes = num_classes
        encoder_widths = [encoder_width * 2 ** i for i in range(4)]
        decoder_widths = [decoder_width * 2 ** i for i in range(4)]
        self.encoder = SegResMambaEncoder(input_channels, encoder_widths, d_state, d_conv, expand)
        self.adapters = nn.ModuleList([SkipAdapter(c, w) for c, w in zip(encoder_widths, decoder_widths)])
        self.decoder = SegResMambaDecoder(decoder_widths, num_classes, deep_supervision)
        self.key_to_encoder = "encoder"  # DNA's hooks (nnssl / OpenMind fine-tuning)
        self.key_to_stem = "encoder.stem"
        self.keys_to_in_proj = ("encoder.stem",)

    @classmethod
    def output_shapes(cls, spatial_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Spatial shapes of the deep-supervision outputs for a patch: nnU-Net's target sizes for our scales."""
        return scaled_shapes(spatial_shape, cls.deep_supervision_scales)

    def _check_spatial(self, spatial: tuple[int, ...]) -> None:
        if self.training and max(spatial) <= 2 * ENCODER_STRIDE:
            # the deepest CMMB instance-normalises a map at 1/32 of the padded patch, one voxel below this size
            raise ValueError(f"SegResMamba trains on patches larger than {2 * ENCODER_STRIDE} voxels along at least "
                             f"one axis, got {spatial}")

    def _forward_padded(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = self.encoder(x)
        return self.decoder([adapter(s) for adapter, s in zip(self.adapters, skips)])
