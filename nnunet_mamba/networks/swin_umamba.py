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

``load_vmamba_encoder`` copies an ImageNet VMamba-Tiny v0 checkpoint into either network's encoder.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from timm.models import adapt_input_conv
from torch import nn

from ..layers.vss import FinalPatchExpand_X4, PatchExpand, VSSLayer, VSSMEncoder
from .base import SegmentationNetwork, check_positive_ints
from .plans import fixed_plan_strides
from .registry import register_network


def _nest(name: str, module: nn.Module) -> nn.Sequential:
    """``module`` under ``name``: MONAI wraps its convolutions this way, and the state-dict keys record it."""
    return nn.Sequential(OrderedDict([(name, module)]))


def _stage_dims(embed_dim: int, n_stages: int) -> List[int]:
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
        self.conv3: Optional[nn.Module] = None
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
                 deep_supervision_scales: Sequence[float], strides: Optional[Sequence] = None) -> None:
        super().__init__()
        check_positive_ints(input_channels=input_channels, num_classes=num_classes)
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.total_stride = total_stride
        self.deep_supervision_scales = tuple(deep_supervision_scales)
        self.plan_strides = fixed_plan_strides(type(self).__name__, self.deep_supervision_scales,
                                               (total_stride, total_stride), strides)

    def pretrained_encoder_parameters(self) -> List[nn.Parameter]:
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
                 d_state: int = 16, drop_path_rate: float = 0.2, strides: Optional[Sequence] = None) -> None:
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

    def _forward_padded(self, x: torch.Tensor) -> List[torch.Tensor]:
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

    def forward(self, skips: List[torch.Tensor]) -> List[torch.Tensor]:
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
                 strides: Optional[Sequence] = None) -> None:
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

    def _forward_padded(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.decoder(self.vssm_encoder(x))


# Checkpoint keys of VMamba's ImageNet classifier, which the segmentation networks do not have.
_CLASSIFIER_KEYS = ("norm.weight", "norm.bias", "head.weight", "head.bias")


@dataclass
class EncoderLoadReport:
    """What :func:`load_vmamba_encoder` did. Keys of ``loaded``/``adapted``/``missing`` are the network's,
    keys of ``skipped``/``unexpected`` the checkpoint's."""

    loaded: List[str] = field(default_factory=list)
    adapted: List[str] = field(default_factory=list)  # loaded after adapting the input channels (in ``loaded``)
    skipped: Dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it was left out
    unexpected: List[str] = field(default_factory=list)  # checkpoint keys the encoder has no place for
    missing: List[str] = field(default_factory=list)  # encoder keys the checkpoint did not provide


def _encoder_key(checkpoint_key: str) -> str:
    # Swin-UMamba keeps VMamba's layers.i.downsample as vssm_encoder.downsamples.i
    return "vssm_encoder." + re.sub(r"^layers\.(\d+)\.downsample\.", r"downsamples.\1.", checkpoint_key)


def _adaptable_rgb_kernel(checkpoint_shape: torch.Size, network_shape: torch.Size) -> bool:
    """An RGB convolution kernel that fits the network's but for the number of input channels."""
    return (len(checkpoint_shape) == len(network_shape) == 4 and checkpoint_shape[1] == 3 != network_shape[1]
            and checkpoint_shape[0] == network_shape[0] and checkpoint_shape[2:] == network_shape[2:])


# The original Swin-UMamba's skip list (swin_umamba/nnunetv2/nets/SwinUMamba.py load_pretrained_ckpt, JiarunLiu/
# Swin-UMamba) names patch_embed.norm.weight twice and patch_embed.norm.bias not at all, so it loads that bias.
_ORIGINAL_SWIN_UMAMBA_LOADS = frozenset({"patch_embed.norm.bias"})


def load_vmamba_encoder(network: _SwinUMambaBase, checkpoint_state_dict: Mapping[str, torch.Tensor],
                        strict: bool = True, faithful: bool = True) -> EncoderLoadReport:
    """Copy a VMamba v0 ImageNet checkpoint (e.g. VMamba-Tiny, ``vssmtiny_dp01_ckpt_epoch_292.pth``) into the
    encoder of a :class:`SwinUMamba` or :class:`SwinUMambaD`, in place.

    ``checkpoint_state_dict`` is the checkpoint's ``'model'`` dict; a whole training checkpoint holding one under
    ``'model'`` is accepted too (its other entries are ignored). Always left out: the classifier (``norm.*``,
    ``head.*``). The decoders, the stem and the conv skips stay as initialised. The patch embedding:

    - ``faithful=True`` (the default): exactly the original's ``load_pretrained_ckpt``
      (JiarunLiu/Swin-UMamba, ``swin_umamba/nnunetv2/nets/SwinUMamba.py`` and ``SwinUMambaD.py``). Swin-UMamba
      skips ``patch_embed.proj.*`` and ``patch_embed.norm.weight`` but loads ``patch_embed.norm.bias`` (its skip
      list names ``norm.weight`` twice); Swin-UMamba-dagger loads all four ``patch_embed.*`` tensors when the
      checkpoint's kernel has as many input channels as the network, and skips all four otherwise.
    - ``faithful=False``: Swin-UMamba skips all of ``patch_embed.*`` (it reads the 48-channel stem, not an image:
      what the original meant); Swin-UMamba-dagger with other than 3 input channels loads the patch embedding
      with the RGB kernel adapted by timm's ``adapt_input_conv`` (1 channel: the sum of the RGB kernels, i.e. a
      grey image seen as R = G = B; C channels: the RGB kernels cycled and scaled by 3/C to keep the activation
      scale).

    Raises ValueError, before changing anything, when a tensor's shape does not fit, when nothing matches, and
    (``strict``) when the checkpoint has encoder-like keys the network lacks or lacks some of the encoder's.
    """
    if not isinstance(network, _SwinUMambaBase):
        raise TypeError(f"expected a SwinUMamba or SwinUMambaD network, got {type(network).__name__}")
    state = checkpoint_state_dict
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    targets = {k: v for k, v in network.state_dict(keep_vars=True).items() if k.startswith("vssm_encoder.")}
    report = EncoderLoadReport()
    pending: Dict[str, torch.Tensor] = {}
    mismatched = []
    kernel = state.get("patch_embed.proj.weight")
    channels = targets["vssm_encoder.patch_embed.proj.weight"].shape[1]
    # the checkpoint's patch-embedding keys this call loads
    if not network.patch_embed_reads_image:
        embedding_loaded = _ORIGINAL_SWIN_UMAMBA_LOADS if faithful else frozenset()
    elif faithful and torch.is_tensor(kernel) and kernel.dim() == 4 and kernel.shape[1] != channels:
        embedding_loaded = frozenset()
    else:
        embedding_loaded = None  # all of them
    for key, value in state.items():
        if key in _CLASSIFIER_KEYS:
            report.skipped[key] = "ImageNet classifier (final norm and head)"
            continue
        if key.startswith("patch_embed.") and embedding_loaded is not None and key not in embedding_loaded:
            if not network.patch_embed_reads_image:
                report.skipped[key] = ("Swin-UMamba's patch embedding reads the 48-channel stem, not an RGB image"
                                       + (" (the original's skip list)" if faithful else ""))
            else:
                report.skipped[key] = (f"the checkpoint's patch embedding reads {kernel.shape[1]} channels, the "
                                       f"network's {channels} (the original skips it)")
            continue
        target = _encoder_key(key)
        if target not in targets or not torch.is_tensor(value):
            report.unexpected.append(key)
            continue
        expected = targets[target].shape
        if key == "patch_embed.proj.weight" and not faithful and _adaptable_rgb_kernel(value.shape, expected):
            value = adapt_input_conv(expected[1], value)
            report.adapted.append(target)
        if value.shape != expected:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, network {target} {tuple(expected)}")
            continue
        pending[target] = value
    if mismatched:
        raise ValueError(f"{len(mismatched)} checkpoint tensor(s) do not fit {type(network).__name__}'s encoder "
                         "(is this VMamba-Tiny v0?): " + "; ".join(mismatched[:5]))
    if not pending:
        raise ValueError(f"no tensor of the checkpoint matches {type(network).__name__}'s encoder (expected VMamba "
                         f"v0 keys such as 'layers.0.blocks.0.self_attention.x_proj_weight'); first keys: "
                         f"{list(state)[:5]}")
    embedding = "vssm_encoder.patch_embed."
    loadable = [k for k in targets if not k.startswith(embedding) or embedding_loaded is None
                or k[len("vssm_encoder."):] in embedding_loaded]
    report.missing = [k for k in loadable if k not in pending]
    if strict and (report.unexpected or report.missing):
        raise ValueError(f"checkpoint and {type(network).__name__}'s encoder differ (a VMamba other than Tiny v0?): "
                         f"{len(report.unexpected)} unexpected key(s) {report.unexpected[:5]}, "
                         f"{len(report.missing)} missing {report.missing[:5]}; pass strict=False to load the rest")
    with torch.no_grad():
        for target, value in pending.items():
            targets[target].copy_(value)
    report.loaded = list(pending)
    return report
