"""Swin-UMamba and Swin-UMamba-dagger (Liu et al. 2024, "Swin-UMamba: Mamba-based UNet with ImageNet-based
pretraining"), 2D, with the original's state-dict layout; the encoder is VMamba v0 (Vanilla-VMamba-T).

``SwinUMamba``: a 7x7 stride-2 stem (48 channels, instance norm), a 2x2 patch embedding of the stem's features and
four VSS stages (1/4 .. 1/32); residual convolution blocks (MONAI's UnetResBlock: instance norm without affine,
LeakyReLU 0.01) on the raw input, the stem and every stage; transposed-convolution up blocks; heads at 1, 1/2,
1/4 and 1/8. ``SwinUMambaD`` (Swin-UMamba-dagger): a 4x4 patch embedding of the image, a Mamba decoder (patch
expanding, skip concatenation projected back by a linear layer, two VSS blocks per stage), a final x4 patch
expanding; heads at 1, 1/4, 1/8 and 1/16.

Both have a total stride of 32 (with four stages). Other sizes are zero-padded at the bottom and right to the
next multiple of 32 and every output is cropped back to nnU-Net's target size at its scale (why so:
:mod:`.base`; zeros also because the convolutions already see zeros beyond the border, where replicate padding
would copy border structures into the padded band, and the scans carry them across the image). The scales are
``network.deep_supervision_scales``; the original trainers override ``_get_deep_supervision_scales`` with
them, since they do not follow the plans' pooling. nnU-Net's own trainer derives them from the plans' strides
instead: plans for it carry ``network.plan_strides`` (``nnunet-mamba plan``), and the network refuses others.

Their ImageNet encoder weights (VMamba-Tiny v0): :mod:`.vmamba_weights`.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from ..layers.vss import FinalPatchExpand_X4, PatchExpand, VSSLayer, VSSMEncoder
from .base import SegmentationNetwork, check_positive_ints
from .plans import fixed_plan_strides
from .registry import register_network


def _nest(name: str, module: nn.Module) -> nn.Sequential:
    """``module`` under ``name``: MONAI wraps its convolutions this way, and the state-dict keys record it."""
    return nn.Sequential(OrderedDict([(name, module)]))


def _stage_dims(embed_dim: int, n_stages: int) -> list[int]:
    # VMamba doubles the channels at every patch merging
    return [embed_dim * 2 ** i for i in range(n_stages)]


class UnetResBlock(nn.Module):
    """MONAI's UnetResBlock (2D, instance norm): conv-norm-act-conv-norm + (1x1 conv-norm) shortcut, then act."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv1 = _nest("conv", nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                             bias=False))
        self.conv2 = _nest("conv", nn.Conv2d(out_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                             bias=False))
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.norm1 = nn.InstanceNorm2d(out_channels)
        self.norm2 = nn.InstanceNorm2d(out_channels)
        self.conv3: nn.Module | None = None
        if in_channels != out_channels:
            self.conv3 = _nest("conv", nn.Conv2d(in_channels, out_channels, 1, bias=False))
            self.norm3 = nn.InstanceNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(x)))))
        residual = x if self.conv3 is None else self.norm3(self.conv3(x))
        return self.lrelu(out + residual)


class UnetrUpBlock(nn.Module):
    """MONAI's UnetrUpBlock: 2x2 transposed convolution, concatenation with the skip, UnetResBlock."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.transp_conv = _nest("conv", nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False))
        self.conv_block = UnetResBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class SwinUMambaHeads(nn.Module):
    """Swin-UMamba's output convolutions (``seg_layers``, highest resolution first) and nnU-Net's deep-supervision
    switch. The original's are ``out_layers.i.conv.conv``; named ``decoder.seg_layers`` here, as in nnU-Net's own
    networks, so that ``-pretrained_weights`` leaves them out (:func:`nnunet_mamba.checkpoints.convert_checkpoint`
    renames the original's keys)."""

    def __init__(self, channels: Sequence[int], num_classes: int, deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.seg_layers = nn.ModuleList([_nest("conv", _nest("conv", nn.Conv2d(c, num_classes, 1)))
                                         for c in channels])


class _SwinUMambaBase(SegmentationNetwork):
    """What both networks share: their scales and plan strides, encoder freezing."""

    only_dim = dim = 2
    # the cropped outputs are copied into contiguous memory
    contiguous_outputs = True

    # Whether ``vssm_encoder.patch_embed`` reads the image (so ImageNet's RGB patch embedding can be adapted).
    patch_embed_reads_image: bool

    def __init__(self, input_channels: int, num_classes: int, total_stride: int,
                 deep_supervision_scales: Sequence[float], strides: Sequence | None = None) -> None:
        super().__init__()
        check_positive_ints(input_channels=input_channels, num_classes=num_classes)
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.total_stride = total_stride
        self.deep_supervision_scales = tuple(deep_supervision_scales)
        self.plan_strides = fixed_plan_strides(type(self).__name__, self.deep_supervision_scales,
                                               (total_stride, total_stride), strides)

    def pretrained_encoder_parameters(self) -> list[nn.Parameter]:
        """The ImageNet-initialised encoder parameters that the original trainers keep frozen in the first epochs
        (all of the VMamba encoder except its patch embedding)."""
        return [p for name, p in self.vssm_encoder.named_parameters() if not name.startswith("patch_embed.")]


@register_network("swin_umamba", dims=(2,),
                  summary="Swin-UMamba: VMamba-T encoder after a conv stem, residual conv decoder (Liu et al. 2024)")
class SwinUMamba(_SwinUMambaBase):
    """Swin-UMamba (2D). Heads at 1, 1/2, 1/4, 1/8; ``deep_supervision`` returns all four, highest first.

    The original keeps its decoder modules at the top level (``decoder6`` .. ``decoder1``, ``out_layers``); ours too,
    but for the heads, which are ``decoder.seg_layers`` (:class:`SwinUMambaHeads`) beside the deep-supervision switch
    nnU-Net sets, ``network.decoder.deep_supervision``.
    The original's ``drop_path_rate`` argument was never used: its encoder always ran with 0.2, our default.
    """

    patch_embed_reads_image = False

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 depths: Sequence[int] = (2, 2, 9, 2), embed_dim: int = 96, stem_channels: int = 48,
                 d_state: int = 16, drop_path_rate: float = 0.2, strides: Sequence | None = None) -> None:
        if len(depths) != 4:
            raise ValueError(f"Swin-UMamba has four VSS stages; depths must have 4 entries, got {list(depths)}")
        super().__init__(input_channels, num_classes, total_stride=32, deep_supervision_scales=(1, 1 / 2, 1 / 4, 1 / 8),
                         strides=strides)
        feat = [stem_channels] + _stage_dims(embed_dim, 4)  # the original's feat_size; feat[4] is hidden_size
        self.stem = nn.Sequential(nn.Conv2d(input_channels, feat[0], kernel_size=7, stride=2, padding=3),
                                  nn.InstanceNorm2d(feat[0], affine=True))
        self.vssm_encoder = VSSMEncoder(feat[0], patch_size=2, depths=depths, dims=feat[1:], d_state=d_state,
                                        drop_path_rate=drop_path_rate)
        # skip paths: raw input (1), stem (1/2), VSS stages 0..2 (1/4 .. 1/16); names as in the original
        self.encoder1 = _nest("layer", UnetResBlock(input_channels, feat[0]))
        self.encoder2 = _nest("layer", UnetResBlock(feat[0], feat[1]))
        self.encoder3 = _nest("layer", UnetResBlock(feat[1], feat[2]))
        self.encoder4 = _nest("layer", UnetResBlock(feat[2], feat[3]))
        self.encoder5 = _nest("layer", UnetResBlock(feat[3], feat[4]))
        self.decoder6 = UnetrUpBlock(feat[4], feat[4])
        self.decoder5 = UnetrUpBlock(feat[4], feat[3])
        self.decoder4 = UnetrUpBlock(feat[3], feat[2])
        self.decoder3 = UnetrUpBlock(feat[2], feat[1])
        self.decoder2 = UnetrUpBlock(feat[1], feat[0])
        self.decoder1 = _nest("layer", UnetResBlock(feat[0], feat[0]))
        self.decoder = SwinUMambaHeads(feat[:4], num_classes, deep_supervision)
        # DNA's hooks (nnssl / OpenMind fine-tuning): the conv stem and the first skip path read the image
        self.key_to_encoder = "vssm_encoder"
        self.key_to_stem = "stem"
        self.keys_to_in_proj = ("stem.0", "encoder1.layer.conv1.conv", "encoder1.layer.conv3.conv")

    def _forward_padded(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.stem(x)
        stages = [s.permute(0, 3, 1, 2) for s in self.vssm_encoder(stem)]  # 1/4 .. 1/32, channels-first
        skip1, skip2 = self.encoder1(x), self.encoder2(stem)
        skip3, skip4, skip5 = self.encoder3(stages[0]), self.encoder4(stages[1]), self.encoder5(stages[2])
        up16 = self.decoder6(stages[3], skip5)
        up8 = self.decoder5(up16, skip4)
        up4 = self.decoder4(up8, skip3)
        up2 = self.decoder3(up4, skip2)
        full = self.decoder1(self.decoder2(up2, skip1))
        features = [full, up2, up4, up8] if self.decoder.deep_supervision else [full]
        return [head(f) for head, f in zip(self.decoder.seg_layers, features)]


class MambaDecoder(nn.Module):
    """Swin-UMamba-dagger's decoder on channels-last encoder stages (highest resolution first).

    Per stage, from the bottleneck up: patch expanding (x2), concatenation with the skip and a linear layer back
    to the skip's width, two VSS blocks; finally a x4 patch expanding to the input resolution. Every stage has a
    1x1 head; ``forward`` returns the computed heads' outputs highest resolution first (all of them with
    ``deep_supervision``, else only the full-resolution one).
    """

    def __init__(self, num_classes: int, dims: Sequence[int], deep_supervision: bool, drop_path_rate: float = 0.2,
                 d_state: int = 16) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        n_up = len(dims) - 1
        # stochastic depth falls linearly from drop_path_rate at the bottleneck to 0
        rates = torch.linspace(drop_path_rate, 0, 2 * n_up).tolist()
        stages, expand_layers, seg_layers, concat_back_dim = [], [], [], []
        for s in range(n_up):
            below, skip = dims[-1 - s], dims[-2 - s]
            expand_layers.append(PatchExpand(below))
            stages.append(VSSLayer(skip, 2, rates[2 * s:2 * s + 2], d_state))
            seg_layers.append(nn.Conv2d(skip, num_classes, 1))
            concat_back_dim.append(nn.Linear(2 * skip, skip))
        expand_layers.append(FinalPatchExpand_X4(dims[0]))
        stages.append(nn.Identity())
        seg_layers.append(nn.Conv2d(dims[0], num_classes, 1))
        self.stages = nn.ModuleList(stages)
        self.expand_layers = nn.ModuleList(expand_layers)
        self.seg_layers = nn.ModuleList(seg_layers)
        self.concat_back_dim = nn.ModuleList(concat_back_dim)

    def forward(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        x = skips[-1]
        last = len(self.stages) - 1
        outputs = []
        for s, (expand, stage, head) in enumerate(zip(self.expand_layers, self.stages, self.seg_layers)):
            x = expand(x)
            if s < last:
                x = self.concat_back_dim[s](torch.cat((x, skips[-2 - s]), dim=-1))
            x = stage(x)
            if self.deep_supervision or s == last:
                outputs.append(head(x.permute(0, 3, 1, 2)))
        outputs.reverse()
        return outputs


@register_network("swin_umamba_d", dims=(2,),
                  summary="Swin-UMamba-dagger: VMamba-T encoder, Mamba (VSS) decoder (Liu et al. 2024)")
class SwinUMambaD(_SwinUMambaBase):
    """Swin-UMamba-dagger (2D). Heads at 1, 1/4, 1/8, 1/16 (for four stages); ``deep_supervision`` returns all."""

    patch_embed_reads_image = True

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 depths: Sequence[int] = (2, 2, 9, 2), embed_dim: int = 96, d_state: int = 16,
                 drop_path_rate: float = 0.2, decoder_drop_path_rate: float = 0.2,
                 strides: Sequence | None = None) -> None:
        if len(depths) < 2:
            raise ValueError(f"Swin-UMamba-dagger needs at least two VSS stages, got depths={list(depths)}")
        n = len(depths)
        super().__init__(input_channels, num_classes, total_stride=4 * 2 ** (n - 1),
                         deep_supervision_scales=[1] + [1 / (4 * 2 ** i) for i in range(n - 1)], strides=strides)
        dims = _stage_dims(embed_dim, n)
        self.vssm_encoder = VSSMEncoder(input_channels, patch_size=4, depths=depths, dims=dims, d_state=d_state,
                                        drop_path_rate=drop_path_rate)
        self.decoder = MambaDecoder(num_classes, dims, deep_supervision, decoder_drop_path_rate, d_state)
        self.apply(InitWeights_He(1e-2))  # as the original: every convolution, the encoder's included
        self.key_to_encoder = "vssm_encoder"  # DNA's hooks (nnssl / OpenMind fine-tuning)
        self.key_to_stem = "vssm_encoder.patch_embed"
        self.keys_to_in_proj = ("vssm_encoder.patch_embed.proj",)

    def _forward_padded(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decoder(self.vssm_encoder(x))
