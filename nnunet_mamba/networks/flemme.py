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

Sizes from the plans: :mod:`.flemme_layout`; the module tree: :mod:`.flemme_parts`. So nnU-Net's 2D default
[32, 64, 128, 256, 512, 512, 512] with strides 2 gives patch 32 at 1/2, levels [64, 128, 256, 512, 512], middle
[512, 512], total stride 64. The paper's Table III configuration (features
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

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..layers.blocks import as_tuple, conv_dim
from ..layers.flemme import CombinationLayer
from .base import SegmentationNetwork, check_positive_ints
from .flemme_layout import FlemmeLayout
from .flemme_parts import ConvParts, FlemmeDecoder, FlemmeEncoder, MambaParts, SwinParts, stage
from .registry import create_network, register_network

ENCODERS = ("resnet", "unet", "cattenu", "swinu", "mambau")
ARCHITECTURES = ("sem", "hsem")
# the encoder's building blocks, its default first
BUILDING_BLOCKS = {"resnet": ("res_conv", "conv"), "unet": ("conv", "res_conv"), "cattenu": ("conv", "res_conv"),
                   "swinu": ("swin", "res_swin"), "mambau": ("mamba", "res_mamba")}
# Table III of the paper, counted on the original (first public release; see the module docstring).
TABLE3_PARAMETERS = {"unet": 3_884_193, "swinu": 4_383_570, "mambau": 5_536_289}


class FlemmeNet(SegmentationNetwork):
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
        check_positive_ints(input_channels=input_channels, num_classes=num_classes, num_blocks=num_blocks,
                            position_grid=position_grid)
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
            return SwinParts(conv_op, building_block, window, num_heads or 3, mlp_ratio)
        if self.encoder_name == "mambau":
            return MambaParts(conv_op, building_block, scan or "single", bool(flip_scan), d_state, mlp_ratio)
        # the paper's experiments: batch norm, ReLU
        norm_op = norm_op or {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[self.dim]
        return ConvParts(conv_op, building_block, norm_op, norm_op_kwargs, nonlin or nn.ReLU, nonlin_kwargs,
                          attention_heads=(num_heads or 1) if self.encoder_name == "cattenu" else 0)

    def _build_encoder(self, parts, num_blocks: int, middle_depth: int, drop_path_rate: float) -> FlemmeEncoder:
        layout = self.layout
        n_levels = len(layout.level_channels)
        rates = torch.linspace(0, drop_path_rate, (n_levels + middle_depth) * num_blocks).tolist()
        groups = [rates[i * num_blocks:(i + 1) * num_blocks] for i in range(n_levels + middle_depth)]
        channels = [layout.patch_channels, *layout.level_channels]
        stages = [stage(parts, channels[i], channels[i + 1], layout.level_kernels[i], groups[i])
                  for i in range(n_levels)]
        downsamples = [parts.downsample(c, s) for c, s in zip(layout.level_channels, layout.level_strides)]
        middle_channels = [layout.level_channels[-1], *layout.middle_channels]
        attention = self.encoder_name == "cattenu"
        middle = nn.Sequential(*[stage(parts, middle_channels[j], middle_channels[j + 1], layout.middle_kernel,
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
            stages.append(stage(parts, 2 * width if skip_connections else below, width, layout.level_kernels[level],
                                 rates[j * num_blocks:(j + 1) * num_blocks],
                                 attention=self.encoder_name == "cattenu" and j == 0))
            below = width
        return FlemmeDecoder(upsamples, stages, parts.recovery(below, self.num_classes, layout.patch_stride),
                             skip_connections, parts.channel_axis, deep_supervision)

    def _returns_all(self) -> bool:
        # SeM has one output, returned as a tensor whatever deep_supervision says
        return self.architecture == "hsem" and self.decoder.deep_supervision

    def _forward_padded(self, x: torch.Tensor) -> list[torch.Tensor]:
        bottleneck, skips = self.encoder(x)
        logits, features = self.decoder(bottleneck, skips)
        if self.architecture == "sem":
            return [logits]
        sides = []
        for block, head, feature in zip(self.side_blocks, self.decoder.seg_layers["sides"], [bottleneck, *features]):
            feature = block(feature)
            sides.append(head(feature.movedim(-1, 1) if self.decoder.channel_axis == -1 else feature))
        sides.reverse()  # highest resolution first
        return [self.decoder.seg_layers["combination"]([logits, *sides], x.shape[2:]), *sides]


def _summary(encoder: str, architecture: str) -> str:
    what = {"resnet": "ResNet encoder (residual conv blocks, no skips)", "unet": "U-Net encoder (conv blocks)",
            "cattenu": "CAtten-U encoder (conv blocks + self-attention at the bottleneck)",
            "swinu": "Swin-U encoder (shifted-window attention)", "mambau": "Mamba-U encoder (Mamba cross scans)"}
    arch = "H-SeM: side predictions fused (pyramid loss)" if architecture == "hsem" else "SeM"
    return f"Flemme {what[encoder]}, {arch} (Zhang et al. 2024)"


_CLASS_STEMS = {"resnet": "FlemmeResNet", "unet": "FlemmeUNet", "cattenu": "FlemmeCAttenU", "swinu": "FlemmeSwinU",
                "mambau": "FlemmeMambaU"}


def _define(encoder: str) -> tuple[type[FlemmeNet], type[FlemmeNet]]:
    """The registered SeM and H-SeM classes of ``encoder``: one class per network, so that a plans file's
    ``network_class_name`` (``nnunet_mamba.networks.flemme.<class>``) says which one it describes."""
    classes = []
    for architecture, suffix in (("sem", ""), ("hsem", "HSeM")):
        class_name = _CLASS_STEMS[encoder] + suffix
        cls = type(class_name, (FlemmeNet,), {"__module__": __name__, "__qualname__": class_name,
                                             "__doc__": _summary(encoder, architecture) + ".",
                                             "encoder_name": encoder, "architecture": architecture})
        name = f"flemme_{encoder}" + ("_hsem" if architecture == "hsem" else "")
        classes.append(register_network(name, dims=(2, 3), sized_by_plans=True,
                                        summary=_summary(encoder, architecture))(cls))
    return classes[0], classes[1]


FlemmeResNet, FlemmeResNetHSeM = _define("resnet")
FlemmeUNet, FlemmeUNetHSeM = _define("unet")
FlemmeCAttenU, FlemmeCAttenUHSeM = _define("cattenu")
FlemmeSwinU, FlemmeSwinUHSeM = _define("swinu")
FlemmeMambaU, FlemmeMambaUHSeM = _define("mambau")


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
           "FlemmeMambaU", "FlemmeMambaUHSeM", "FlemmeNet",
           "FlemmeResNet", "FlemmeResNetHSeM", "FlemmeSwinU", "FlemmeSwinUHSeM", "FlemmeUNet", "FlemmeUNetHSeM",
           "flemme_table3"]
