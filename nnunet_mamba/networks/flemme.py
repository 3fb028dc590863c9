"""Flemme's segmentation networks (Zhang, Yang & Li, "Flemme: A Flexible and Modular Learning Platform for Medical
Images", 2024): any of five encoders combined with either architecture, 2D and 3D, sized by nnU-Net's plans.

Registered names (one class each, so a plans file's ``network_class_name`` says which network it describes):
``flemme_{resnet,unet,cattenu,swinu,mambau}`` (SeM) and ``flemme_{...}_hsem`` (H-SeM).

Encoders (blocks: :mod:`nnunet_mamba.layers.flemme`; ``building_block`` picks the plain or residual variant)
    resnet   FlemmeResConvBlock (or FlemmeConvBlock); strided-conv down-sampling; decoder WITHOUT skip connections
    unet     FlemmeConvBlock (or FlemmeResConvBlock); U-Net skips
    cattenu  unet + multi-head self-attention over all voxels after every conv block of the middle layers and
             of the deepest decoder stage (the original's configs put it on the highest-resolution decoder stage,
             which at nnU-Net patch sizes would be global attention over 10^4..10^5 tokens)
    swinu    SwinBlock (or ResSwinBlock, a W-MSA + SW-MSA pair): patch embedding, patch merging / expanding
    mambau   MambaBlock (or ResMambaBlock): as swinu, with Mamba cross scans instead of window attention

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
So nnU-Net's 2D default [32, 64, 128, 256, 512, 512, 512] with strides 2 gives patch 32 at 1/2, levels
[64, 128, 256, 512, 512], middle [512, 512], total stride 64. The paper's Table III configuration (features
[32, 64, 128, 256], strides 2: patch embedding x2 with 32 channels, down [64, 128], middle [256, 256]) is
:func:`flemme_table3`; its SeM parameter counts equal the original's exactly (``TABLE3_PARAMETERS``; the
per-module breakdown, with the original's module names, is in tests/reference/flemme_table3.json). The original
counted is the first public release of wlsdzyzl/flemme, commit 0be9dade2b24244249b4cfc52e8a5dbf218be872.

Outputs. Any patch size works: the input is zero-padded at the end of every axis to a multiple of the total
stride (the product of all strides) and the outputs are cropped back (as in :mod:`.swin_umamba`). SeM returns one
tensor (batch, classes, *patch), whatever ``deep_supervision`` says. H-SeM with ``decoder.deep_supervision``
(nnU-Net's switch) returns ``[fused, side_1, ..., side_n]``: the fused full-resolution prediction, then the side
predictions of the decoder stages (highest resolution first) and of the bottleneck, each cropped to
``round(size * scale)``, the size nnU-Net's ``DownsampleSegForDSTransform`` gives the targets at the scales in
``network.deep_supervision_scales`` (nnU-Net's format, one list per output; a trainer returns them from
``_get_deep_supervision_scales``). Without deep supervision H-SeM returns the fused prediction only. SeM's
``deep_supervision_scales`` lists its single output; a SeM trainer must run without deep supervision.

H-SeM's position encodings: the original learns one per prediction at the full patch size (classes x patch
voxels each; 44M parameters for its 120 x 192 x 120 BraTS patch with 4 classes). Here each is an 8^dim grid
(``position_grid``) upsampled to the patch: 4 x 4 x 512 = 8,192 parameters for the same network, independent of
the patch size, so H-SeM trains on nnU-Net's patches and predicts on any size. The combination runs on the padded
grid, where every side upsamples exactly (nearest) to the full resolution.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..layers.blocks import as_tuple, conv_dim
from ..layers.flemme import (CombinationLayer, FlemmeConvBlock, MambaBlock, PatchEmbedding, PatchExpanding,
                             PatchMerging, PatchRecovery, FlemmeResConvBlock, ResMambaBlock, ResSwinBlock, SwinBlock,
                             strided_conv)
from .registry import create_network, register_network

ENCODERS = ("resnet", "unet", "cattenu", "swinu", "mambau")
ARCHITECTURES = ("sem", "hsem")
# the encoder's building blocks, its default first
BUILDING_BLOCKS = {"resnet": ("res_conv", "conv"), "unet": ("conv", "res_conv"), "cattenu": ("conv", "res_conv"),
                   "swinu": ("swin", "res_swin"), "mambau": ("mamba", "res_mamba")}
# Table III of the paper, counted on the original (first public release; see the module docstring).
TABLE3_PARAMETERS = {"unet": 3_884_193, "swinu": 4_383_570, "mambau": 5_536_289}

Output = torch.Tensor | list[torch.Tensor]


def _per_stage(value, n_stages: int, name: str) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != n_stages:
        raise ValueError(f"{name} must have one entry per stage (n_stages={n_stages}), got {value!r}")
    return list(value)


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
        features = _per_stage(features_per_stage, n_stages, "features_per_stage")
        if any(not isinstance(f, int) or f < 1 for f in features):
            raise ValueError(f"features_per_stage must be positive integers, got {features}")
        strides = [as_tuple(s, dim) for s in _per_stage(strides, n_stages, "strides")]
        kernels = [as_tuple(k, dim) for k in (_per_stage(kernel_sizes, n_stages, "kernel_sizes")
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


class _ConvParts:
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


class _SwinParts:
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


class _MambaParts(_SwinParts):
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


def _stage(parts, input_channels: int, output_channels: int, kernel: Sequence[int], drop_paths: Sequence[float],
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


class FlemmeNet(AbstractDynamicNetworkArchitectures):
    """A Flemme encoder in the SeM or H-SeM architecture; subclasses fix ``encoder_name`` and ``architecture``.

    Constructor arguments are nnU-Net's architecture kwargs (``n_stages``, ``features_per_stage``, ``conv_op``,
    ``strides``, ``kernel_sizes``, ``norm_op``/``nonlin`` and their kwargs) plus the paper's options:
    ``building_block`` (see ``BUILDING_BLOCKS``), ``num_blocks`` per stage, ``middle_depth`` (groups of blocks at
    the bottleneck); Swin-U and CAtten-U ``num_heads``; Swin-U ``window_size``; Mamba-U ``scan`` (2D: single,
    cross; 3D: single, simplified, cross), ``flip_scan``, ``d_state``; token encoders ``mlp_ratio``,
    ``drop_path_rate``; H-SeM ``position_grid``. Options of another encoder raise.
    """

    encoder_name: str = ""
    architecture: str = ""

    def __init__(self, input_channels: int, num_classes: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: type[_ConvNd], strides: Sequence, kernel_sizes: Sequence | None = None,
                 deep_supervision: bool = False, building_block: str | None = None, num_blocks: int = 2,
                 middle_depth: int = 2, norm_op: type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 nonlin: type[nn.Module] | None = None, nonlin_kwargs: dict | None = None,
                 num_heads: int | None = None, window_size: int | Sequence[int] | None = None,
                 scan: str | None = None, flip_scan: bool | None = None, d_state: int | None = None,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, position_grid: int = 8) -> None:
        super().__init__()
        if self.encoder_name not in ENCODERS or self.architecture not in ARCHITECTURES:
            raise TypeError(f"{type(self).__name__} is abstract: build a registered flemme_* network")
        for name, value in (("input_channels", input_channels), ("num_classes", num_classes),
                            ("num_blocks", num_blocks), ("position_grid", position_grid)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self._check_options(building_block, num_heads=num_heads, window_size=window_size, scan=scan,
                            flip_scan=flip_scan, d_state=d_state)
        dim = conv_dim(conv_op)
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.dim = dim
        self.layout = FlemmeLayout.from_plans(dim, n_stages, features_per_stage, strides, kernel_sizes, middle_depth)
        scales = self.layout.level_scales()
        self.total_stride = scales[-1]
        parts = self._parts(conv_op, building_block or BUILDING_BLOCKS[self.encoder_name][0], norm_op,
                            norm_op_kwargs, nonlin, nonlin_kwargs, num_heads, window_size, scan, flip_scan, d_state,
                            mlp_ratio)
        self.encoder = self._build_encoder(parts, num_blocks, middle_depth, drop_path_rate)
        self.decoder = self._build_decoder(parts, num_blocks, drop_path_rate, deep_supervision)
        # DNA's hooks (nnssl / OpenMind fine-tuning); the token family's patch embedding holds its convolution
        self.key_to_encoder = "encoder"
        self.key_to_stem = "encoder.patch_embed"
        self.keys_to_in_proj = ("encoder.patch_embed" if isinstance(self.encoder.patch_embed, _ConvNd)
                                else "encoder.patch_embed.proj",)
        if self.architecture == "hsem":
            layout = self.layout
            # bottleneck first, then the decoder stages: the order the features come in
            side_channels = [layout.middle_channels[-1], *reversed(layout.level_channels)]
            side_kernels = [layout.middle_kernel, *reversed(layout.level_kernels)]
            self.side_blocks = nn.ModuleList([parts.side_block(c, k) for c, k in zip(side_channels, side_kernels)])
            self.decoder.seg_layers["sides"] = nn.ModuleList([conv_op(c, num_classes, 1) for c in side_channels])
            self.decoder.seg_layers["combination"] = CombinationLayer(conv_op, len(side_channels) + 1, num_classes,
                                                                      position_grid)
            # the fused prediction, then the sides from the highest resolution (level 0) to the bottleneck
            self.deep_supervision_scales = [[1.0] * dim] + [[1 / s for s in scale] for scale in scales]
        else:
            self.deep_supervision_scales = [[1.0] * dim]

    def _check_options(self, building_block: str | None, **options) -> None:
        allowed = BUILDING_BLOCKS[self.encoder_name]
        if building_block is not None and building_block not in allowed:
            raise ValueError(f"building_block for {self.encoder_name} must be one of {allowed}, got {building_block!r}")
        owners = {"num_heads": ("swinu", "cattenu"), "window_size": ("swinu",), "scan": ("mambau",),
                  "flip_scan": ("mambau",), "d_state": ("mambau",)}
        wrong = [name for name, value in options.items()
                 if value is not None and self.encoder_name not in owners[name]]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not an option of the {self.encoder_name} encoder")

    def _parts(self, conv_op, building_block, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, num_heads,
               window_size, scan, flip_scan, d_state, mlp_ratio):
        if self.encoder_name == "swinu":
            window = as_tuple(window_size if window_size is not None else (8 if self.dim == 2 else 4), self.dim)
            return _SwinParts(conv_op, building_block, window, num_heads or 3, mlp_ratio)
        if self.encoder_name == "mambau":
            return _MambaParts(conv_op, building_block, scan or "single", bool(flip_scan), d_state, mlp_ratio)
        # the paper's experiments: batch norm, ReLU
        norm_op = norm_op or {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[self.dim]
        return _ConvParts(conv_op, building_block, norm_op, norm_op_kwargs, nonlin or nn.ReLU, nonlin_kwargs,
                          attention_heads=(num_heads or 1) if self.encoder_name == "cattenu" else 0)

    def _build_encoder(self, parts, num_blocks: int, middle_depth: int, drop_path_rate: float) -> FlemmeEncoder:
        layout = self.layout
        n_levels = len(layout.level_channels)
        rates = torch.linspace(0, drop_path_rate, (n_levels + middle_depth) * num_blocks).tolist()
        groups = [rates[i * num_blocks:(i + 1) * num_blocks] for i in range(n_levels + middle_depth)]
        channels = [layout.patch_channels, *layout.level_channels]
        stages = [_stage(parts, channels[i], channels[i + 1], layout.level_kernels[i], groups[i])
                  for i in range(n_levels)]
        downsamples = [parts.downsample(c, s) for c, s in zip(layout.level_channels, layout.level_strides)]
        middle_channels = [layout.level_channels[-1], *layout.middle_channels]
        attention = self.encoder_name == "cattenu"
        middle = nn.Sequential(*[_stage(parts, middle_channels[j], middle_channels[j + 1], layout.middle_kernel,
                                        groups[n_levels + j], attention) for j in range(middle_depth)])
        return FlemmeEncoder(parts.embed(self.input_channels, layout.patch_channels, layout.patch_stride), stages,
                             downsamples, middle)

    def _build_decoder(self, parts, num_blocks: int, drop_path_rate: float, deep_supervision: bool) -> FlemmeDecoder:
        layout = self.layout
        n_levels = len(layout.level_channels)
        skip_connections = self.encoder_name != "resnet"
        rates = torch.linspace(drop_path_rate, 0, n_levels * num_blocks).tolist()
        below = layout.middle_channels[-1]
        upsamples, stages = [], []
        for j, level in enumerate(reversed(range(n_levels))):
            width, stride = layout.level_channels[level], layout.level_strides[level]
            # U-Nets: up into the skip's width, blocks on [skip, up]; resnet: up keeping the width, blocks narrow
            upsamples.append(parts.upsample(below, width if skip_connections else below, stride))
            stages.append(_stage(parts, 2 * width if skip_connections else below, width, layout.level_kernels[level],
                                 rates[j * num_blocks:(j + 1) * num_blocks],
                                 attention=self.encoder_name == "cattenu" and j == 0))
            below = width
        return FlemmeDecoder(upsamples, stages, parts.recovery(below, self.num_classes, layout.patch_stride),
                             skip_connections, parts.channel_axis, deep_supervision)

    def output_shapes(self, spatial_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Spatial shapes of the outputs with deep supervision: nnU-Net's target sizes at our scales."""
        return [tuple(round(n * s) for n, s in zip(spatial_shape, scales)) for scales in self.deep_supervision_scales]

    def check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.dim() != self.dim + 2:
            axes = "x, y, z" if self.dim == 3 else "x, y"
            raise ValueError(f"{name} was built for {self.dim}D (conv_op): it expects input (batch, channels, {axes}),"
                             f" got shape {tuple(x.shape)}")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"{name} was built for {self.input_channels} input channels, got {x.shape[1]}")

    def forward(self, x: torch.Tensor) -> Output:
        self.check_input(x)
        size = tuple(x.shape[2:])
        pad = [-n % t for n, t in zip(size, self.total_stride)]
        if any(pad):  # at the end of every axis, so that every output grid stays anchored at the origin
            x = F.pad(x, [p for amount in reversed(pad) for p in (0, amount)])
        bottleneck, skips = self.encoder(x)
        logits, features = self.decoder(bottleneck, skips)
        if self.architecture == "sem":
            return self._crop(logits, size)
        sides = []
        for block, head, feature in zip(self.side_blocks, self.decoder.seg_layers["sides"], [bottleneck, *features]):
            feature = block(feature)
            sides.append(head(feature.movedim(-1, 1) if self.decoder.channel_axis == -1 else feature))
        sides.reverse()  # highest resolution first
        fused = self.decoder.seg_layers["combination"]([logits, *sides], x.shape[2:])
        if not self.decoder.deep_supervision:
            return self._crop(fused, size)
        return [self._crop(o, shape) for o, shape in zip([fused, *sides], self.output_shapes(size))]

    @staticmethod
    def _crop(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return x[(..., *(slice(0, n) for n in shape))]


def _summary(encoder: str, architecture: str) -> str:
    what = {"resnet": "ResNet encoder (residual conv blocks, no skips)", "unet": "U-Net encoder (conv blocks)",
            "cattenu": "CAtten-U encoder (conv blocks + self-attention at the bottleneck)",
            "swinu": "Swin-U encoder (shifted-window attention)", "mambau": "Mamba-U encoder (Mamba cross scans)"}
    arch = "H-SeM: side predictions fused (pyramid loss)" if architecture == "hsem" else "SeM"
    return f"Flemme {what[encoder]}, {arch} (Zhang et al. 2024)"


def _register(encoder: str, architecture: str):
    name = f"flemme_{encoder}" + ("_hsem" if architecture == "hsem" else "")
    return register_network(name, dims=(2, 3), sized_by_plans=True, summary=_summary(encoder, architecture))


@_register("resnet", "sem")
class FlemmeResNet(FlemmeNet):
    encoder_name, architecture = "resnet", "sem"


@_register("resnet", "hsem")
class FlemmeResNetHSeM(FlemmeNet):
    encoder_name, architecture = "resnet", "hsem"


@_register("unet", "sem")
class FlemmeUNet(FlemmeNet):
    encoder_name, architecture = "unet", "sem"


@_register("unet", "hsem")
class FlemmeUNetHSeM(FlemmeNet):
    encoder_name, architecture = "unet", "hsem"


@_register("cattenu", "sem")
class FlemmeCAttenU(FlemmeNet):
    encoder_name, architecture = "cattenu", "sem"


@_register("cattenu", "hsem")
class FlemmeCAttenUHSeM(FlemmeNet):
    encoder_name, architecture = "cattenu", "hsem"


@_register("swinu", "sem")
class FlemmeSwinU(FlemmeNet):
    encoder_name, architecture = "swinu", "sem"


@_register("swinu", "hsem")
class FlemmeSwinUHSeM(FlemmeNet):
    encoder_name, architecture = "swinu", "hsem"


@_register("mambau", "sem")
class FlemmeMambaU(FlemmeNet):
    encoder_name, architecture = "mambau", "sem"


@_register("mambau", "hsem")
class FlemmeMambaUHSeM(FlemmeNet):
    encoder_name, architecture = "mambau", "hsem"


def flemme_table3(encoder: str, architecture: str = "sem", dim: int = 2, num_blocks: int = 2,
                  num_classes: int = 1) -> FlemmeNet:
    """The paper's Table III configuration: 1 input channel, 1 class, patch embedding x2 with 32 channels,
    down channels [64, 128], middle [256, 256], 2 blocks per stage, batch norm; Swin-U 3 heads and 8 x 8 windows,
    Mamba-U a single scan without flip. Its 2D SeM parameter counts are ``TABLE3_PARAMETERS``. ``dim``,
    ``num_blocks`` and ``num_classes`` vary it for the paper's scaling study (3D, deeper stages)."""
    if encoder not in ENCODERS or architecture not in ARCHITECTURES:
        raise ValueError(f"encoder must be one of {ENCODERS} and architecture one of {ARCHITECTURES}, got "
                         f"{encoder!r}, {architecture!r}")
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")
    kwargs = {"input_channels": 1, "num_classes": num_classes, "n_stages": 4, "features_per_stage": [32, 64, 128, 256],
              "conv_op": nn.Conv2d if dim == 2 else nn.Conv3d, "strides": [[1] * dim] + [[2] * dim] * 3,
              "num_blocks": num_blocks}
    if encoder in ("resnet", "unet", "cattenu"):
        kwargs.update(norm_op=nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d, nonlin=nn.ReLU)
    return create_network(f"flemme_{encoder}" + ("_hsem" if architecture == "hsem" else ""), **kwargs)


__all__ = ["ARCHITECTURES", "BUILDING_BLOCKS", "ENCODERS", "TABLE3_PARAMETERS", "FlemmeCAttenU", "FlemmeCAttenUHSeM",
           "FlemmeDecoder", "FlemmeEncoder", "FlemmeLayout", "FlemmeMambaU", "FlemmeMambaUHSeM", "FlemmeNet",
           "FlemmeResNet", "FlemmeResNetHSeM", "FlemmeSwinU", "FlemmeSwinUHSeM", "FlemmeUNet", "FlemmeUNetHSeM",
           "flemme_table3"]
