"""ViM-UNet (Archit & Pape, MIDL 2024): a Vision Mamba encoder with a UNETR-style convolutional decoder, 2D only.

Reimplements torch-em's ``get_vimunet_model`` (``torch_em/model/vim.py`` + ``UNETR(use_skip_connection=False)``),
whose encoder is Vim's ``VisionMamba`` (hustvl/Vim, ``models_mamba.py``) as torch-em configures it.

Encoder: 16x16 patch embedding (a strided convolution), a class token, a learnable absolute position embedding
for the token grid of ``input_size`` (the class token's entry included; the patch entries bicubically resampled
when an input has another size), ``depth`` Vim blocks (:class:`~nnunet_mamba.layers.bimamba.ViMBlock`: RMSNorm,
bidirectional Mamba, drop path rising linearly from 0 to ``drop_path_rate``, float32 residual stream), rotary
position embedding, a final RMSNorm, and the tokens reshaped to a 1/16 feature map.
Tiny: ``embed_dim=192``, Small: ``embed_dim=384``; 24 blocks, d_state 16, expand 2 for both.
Initialisation as Vim: LeCun-normal patch embedding, truncated-normal (std 0.02) position embedding and class
token, each block's ``out_proj`` scaled by 1/sqrt(depth), mamba-ssm's initialisation elsewhere; the decoder keeps
PyTorch's defaults.

Encoder configurations (``configuration``, :data:`VIM_CONFIGURATIONS`):
- ``"paper"`` (the default): torch-em at paper time (commit 33239758, ``torch_em/model/vim.py``: Vim's
  ``VisionMamba`` with ``if_cls_token=True, if_rope=True, if_rope_residual=True``, ``if_devide_out`` left at
  False). The class token is prepended (position 0) and gets position-embedding entry 0; it runs through all
  blocks, so through the bidirectional scans it shapes every patch token, and is removed after the final norm.
  Before every block the residual stream is rotated (Vim rotates both the block input and the running residual,
  whose sum the block adds) by Vim's ``VisionRotaryEmbeddingFast(embed_dim // 2, pt_seq_len=14,
  ft_seq_len=grid)`` (``vim/rope.py``; :func:`rope_angles`): the first half of the channels by the token's row,
  the second by its column, each position scaled to a 14-token grid, token 0 (the class token) not rotated.
  The two scan directions are summed (not averaged). Vim builds the rotation table for one square grid; here it
  is built for the grid of each input (each axis scaled to 14 by its own length), so any patch size works.
- ``"later"``: torch-em from commit 00c72189 on (``get_vim_encoder``: ``if_rope=False``, ``if_divide_out=True``,
  ``use_middle_cls_token=True``): the class token is inserted at position M // 2 of the M patch tokens, no rotary
  embedding, the directions averaged; its ``forward`` still removes the FIRST token, so patch token 0 is dropped
  and the class token's output takes a patch's place in the feature map. Reproduced as is.
- ``"later_no_cls"``: the same with ``with_cls_token=False`` (no class token, nothing removed); what this
  package built before the paper configuration became the default.

Decoder (UNETR without encoder skips, channels 512, 256, 128, 64 as torch-em's):
- a side chain from the final embedding, each step a 2x2 stride-2 transposed convolution + 3x3 convolution +
  BatchNorm + ReLU, gives features at 1/8 (512 ch), 1/4 (256), 1/2 (128) and full resolution (64);
- a base block (two InstanceNorm -> 3x3 conv -> ReLU, torch-em's ``ConvBlock2d``) maps the embedding to 512 ch;
- four stages, each a transposed-convolution upsampling and such a block on the concatenation with the side-chain
  feature of that resolution. As in torch-em, whose decoder centre-crops every axis of the skip to the upsampled
  tensor's shape, channels included, a stage concatenates the *middle* half of the side chain's channels at 1/8,
  1/4 and 1/2 (e.g. channels 128..383 of the 512) and all 64 at full resolution;
- 1x1 segmentation heads after each stage (1/8, 1/4, 1/2, full resolution); the last is torch-em's ``out_conv``.
  Outputs are logits (torch-em appends a sigmoid; nnU-Net's losses expect logits).

Patch sizes that are not multiples of 16 are zero-padded (bottom/right) inside the network and the outputs
cropped back, so any patch size works; a 3D configuration raises ``ValueError``.

Deep supervision and nnU-Net. With ``deep_supervision`` the network returns four outputs, highest resolution
first, at scales 1, 1/2, 1/4, 1/8 of the input, sized ``round(size * scale)`` per axis (Python's round, as
batchgeneratorsv2's ``DownsampleSegForDSTransform`` sizes the targets); otherwise one full-resolution tensor.
These scales do not follow the plans: nnU-Net 2.8's ``nnUNetTrainer._get_deep_supervision_scales`` derives the
scales from ``pool_op_kernel_sizes`` of a convolutional U-Net (one per stage but the last, possibly anisotropic),
which would not match. A trainer for this network must override it to return
``[list(s) for s in ViMUNet.deep_supervision_scales]`` when ``self.enable_deep_supervision`` and ``None``
otherwise. nnU-Net then weights the four outputs 1, 1/2, 1/4 and 0 (it always zeroes the lowest), normalised.
Plans for nnU-Net's own trainer (``nnunet-mamba plan``) instead carry ``strides = network.plan_strides``, from
which that formula gives exactly these scales; the network refuses other strides.

Parameter parity with the paper's models (torch-em at paper time, ``out_channels=2``): 18,499,690 (Tiny) and
39,175,018 (Small). Those counts decompose exactly into: VisionMamba with its defaults ``channels=3`` (torch-em
does not override them, so 3 input channels) and ``num_classes=1000``, a class token, a position embedding of
64 * 64 + 1 tokens (``img_size=1024``), and a decoder whose every upsampling (side chain, decoder stages, final
``deconv_out``) is a 2x2 transposed convolution (torch-em's later default, bilinear + 1x1 convolution, would
count 17,160,298 and 37,540,714). Built for the same configuration (``input_channels=3, num_classes=2,
input_size=(1024, 1024)``) ours has 18,307,592 (Tiny) and 38,790,920 (Small) parameters:

    difference (ours minus paper)                                   Tiny       Small
    no ImageNet classification head Linear(dim, 1000)           -193,000    -385,000
    deep-supervision heads at 1/8, 1/4, 1/2 (256/128/64 ch -> 2)    +902        +902

Everything else (patch embedding, class token, position embedding, the 24 bidirectional blocks, final norm,
side chain, base, stages, output head) has the original's shapes; the rotary embedding has no parameters. The
head is unused by ViM-UNet. ``"later_no_cls"`` has 2 * dim fewer (no class token, no entry for it: 18,307,208
and 38,790,152). The deep-supervision heads exist whatever ``deep_supervision`` says, so one state dict serves
training and inference. With 1 input channel the patch embedding has 2 * 256 * dim fewer weights (Tiny
18,209,288, Small 38,594,312).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import lecun_normal_, trunc_normal_
from torch import nn

from ..layers.bimamba import RMSNorm, ViMBlock
from ..layers.blocks import conv_dim
from .base import SegmentationNetwork
from .plans import fixed_plan_strides
from .registry import register_network

PATCH_SIZE = 16
# Decoder channels from 1/16 to full resolution: torch-em's UNETR with initial_features=64, gain=2, depth=3.
DECODER_FEATURES = (512, 256, 128, 64)
# Vim's VisionMamba default pt_hw_seq_len: the grid the rotary positions are scaled to
ROPE_PRETRAIN_GRID = 14

# Encoder configurations (see the module docstring): where the class token goes, rotary embedding, Vim's
# if_divide_out (the two scan directions averaged rather than summed).
VIM_CONFIGURATIONS = {
    "paper": {"cls_token": "first", "rope": True, "divide_out": False},
    "later": {"cls_token": "middle", "rope": False, "divide_out": True},
    "later_no_cls": {"cls_token": None, "rope": False, "divide_out": True},
}


def rope_angles(grid: Sequence[int], dim: int, pretrain_grid: int = ROPE_PRETRAIN_GRID,
                dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Rotation angles (gh * gw, dim) of Vim's ``VisionRotaryEmbeddingFast(dim // 2, pt_seq_len=pretrain_grid,
    ft_seq_len=grid)`` (hustvl/Vim ``vim/rope.py``, EVA-02's): the first dim / 2 channels rotate by the token's
    row, the rest by its column, positions scaled to the pretraining grid (t = i / g * pretrain_grid), channel
    pairs (2k, 2k + 1) at frequency 10000^(-2k / (dim / 2)); tokens in row-major order. Vim builds it for a square
    grid; a rectangular one scales each axis by its own length."""
    half = dim // 2
    freqs = 10000.0 ** -(torch.arange(0, half, 2, dtype=dtype, device=device)[:half // 2] / half)
    per_axis = [(torch.arange(g, dtype=dtype, device=device) / g * pretrain_grid)[:, None] * freqs for g in grid]
    per_axis = [a.repeat_interleave(2, dim=-1) for a in per_axis]  # (g, half): each frequency for a channel pair
    rows = per_axis[0][:, None].expand(-1, grid[1], -1)
    cols = per_axis[1][None].expand(grid[0], -1, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid[0] * grid[1], 2 * half)


def apply_rope(tokens: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin, rotate_half taking each channel pair (a, b) to (-b, a) (Vim's rope)."""
    pairs = tokens.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return tokens * angles.cos() + rotated * angles.sin()


class ViMEncoder(nn.Module):
    """Patch embedding + absolute position embedding (+ class token) + Vim blocks (+ rotary embedding) + final
    RMSNorm; returns a (b, dim, H/16, W/16) map. ``configuration``: a key of :data:`VIM_CONFIGURATIONS`.

    Attribute names follow Vim's ``VisionMamba`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
    ``layers.i.mixer``, ``layers.i.norm``, ``norm_f``), and ``pos_embed`` holds the class token's entry where the
    token sits in the sequence, as Vim's; so a Vim checkpoint of the same configuration maps key for key once
    ``head`` is dropped (and ``pos_embed`` is resampled if its grid differs).
    """

    def __init__(self, input_channels: int, embed_dim: int, depth: int, grid_size: tuple[int, int],
                 drop_path_rate: float, configuration: str = "paper") -> None:
        super().__init__()
        if configuration not in VIM_CONFIGURATIONS:
            raise ValueError(f"configuration must be one of {sorted(VIM_CONFIGURATIONS)}, got {configuration!r}")
        options = VIM_CONFIGURATIONS[configuration]
        if options["rope"] and embed_dim % 4:
            raise ValueError(f"rotary position embedding needs embed_dim divisible by 4, got {embed_dim}")
        self.configuration = configuration
        self.cls_position = options["cls_token"]
        self.rope = options["rope"]
        self.embed_dim = embed_dim
        self.grid_size = tuple(grid_size)
        self.patch_embed = nn.Sequential(OrderedDict(
            proj=nn.Conv2d(input_channels, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)))
        extra = 0
        if self.cls_position is not None:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            trunc_normal_(self.cls_token, std=0.02)
            extra = 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1] + extra, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.layers = nn.ModuleList([ViMBlock(embed_dim, drop_path=rate, divide_out=options["divide_out"])
                                     for rate in rates])
        self.norm_f = RMSNorm(embed_dim)

        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        with torch.no_grad():  # GPT-2 style: each residual branch's output projection scaled by 1/sqrt(depth)
            for layer in self.layers:
                layer.mixer.out_proj.weight /= math.sqrt(depth)

    def cls_index(self, patches: int) -> int | None:
        """Where the class token sits in a sequence of ``patches`` patch tokens (torch-em: 0, or M // 2)."""
        return {None: None, "first": 0, "middle": patches // 2}[self.cls_position]

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """The position embedding (1, gh * gw [+ 1], dim) for a token grid, the class token's entry (if any) at
        its position; the patch entries bicubically resampled if the grid is not the built one."""
        grid = tuple(grid)
        if grid == self.grid_size:
            return self.pos_embed
        built = self.cls_index(self.grid_size[0] * self.grid_size[1])
        table = self.pos_embed
        if built is not None:
            cls_entry = table[:, built:built + 1]
            table = torch.cat([table[:, :built], table[:, built + 1:]], dim=1)
        table = table.reshape(1, *self.grid_size, self.embed_dim).permute(0, 3, 1, 2)
        dtype = torch.promote_types(table.dtype, torch.float32)
        table = F.interpolate(table.to(dtype), size=grid, mode="bicubic", align_corners=False)
        table = table.flatten(2).transpose(1, 2)
        index = self.cls_index(grid[0] * grid[1])
        if index is None:
            return table
        return torch.cat([table[:, :index], cls_entry.to(dtype), table[:, index:]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        grid = x.shape[2:]
        tokens = x.flatten(2).transpose(1, 2)  # row-major token order
        tokens = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
        index = self.cls_index(tokens.shape[1])
        if index is not None:
            cls_token = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :index], cls_token, tokens[:, index:]], dim=1)
        tokens = tokens + self.position_embedding(grid)
        if self.rope:
            # Vim rotates the residual stream before every block (if_rope_residual: the block's input and the
            # running residual, whose sum is the stream) and leaves token 0, the class token here, unrotated
            angles = rope_angles(grid, self.embed_dim, dtype=tokens.dtype, device=tokens.device)
            angles = torch.cat([angles.new_zeros(1, self.embed_dim), angles])
        for layer in self.layers:
            if self.rope:
                tokens = apply_rope(tokens, angles)
            tokens = layer(tokens)
        tokens = self.norm_f(tokens)
        if index is not None:
            # torch-em removes the FIRST token, which is the class token only when it was put first
            tokens = tokens[:, 1:]
        return tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *grid)


class InstanceNormConvBlock(nn.Sequential):
    """torch-em's ``ConvBlock2d``: (InstanceNorm -> 3x3 conv -> ReLU) twice; the norms have no affine parameters."""

    def __init__(self, input_channels: int, output_channels: int) -> None:
        super().__init__(
            nn.InstanceNorm2d(input_channels), nn.Conv2d(input_channels, output_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.InstanceNorm2d(output_channels), nn.Conv2d(output_channels, output_channels, 3, padding=1),
            nn.ReLU(inplace=True))


class UpConvBlock(nn.Sequential):
    """torch-em's ``Deconv2DBlock``: 2x2 stride-2 transposed conv -> 3x3 conv -> BatchNorm -> ReLU."""

    def __init__(self, input_channels: int, output_channels: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(input_channels, output_channels, kernel_size=2, stride=2),
            nn.Conv2d(output_channels, output_channels, 3, padding=1), nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True))


class ViMUNetDecoder(nn.Module):
    """UNETR decoder fed by the final embedding only; see the module docstring for the layout."""

    def __init__(self, embed_dim: int, num_classes: int, deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        side_channels = DECODER_FEATURES
        up_channels = DECODER_FEATURES[1:] + DECODER_FEATURES[-1:]  # the last upsampling keeps 64 channels
        self.side_blocks = nn.ModuleList([UpConvBlock(i, o) for i, o in zip((embed_dim,) + side_channels[:-1],
                                                                             side_channels)])
        self.base = InstanceNormConvBlock(embed_dim, DECODER_FEATURES[0])
        self.upsample_layers = nn.ModuleList([nn.ConvTranspose2d(i, o, kernel_size=2, stride=2)
                                              for i, o in zip(DECODER_FEATURES, up_channels)])
        self.stages = nn.ModuleList([InstanceNormConvBlock(2 * c, c) for c in up_channels])
        self.seg_layers = nn.ModuleList([nn.Conv2d(c, num_classes, kernel_size=1) for c in up_channels])

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Segmentations of the padded input, highest resolution first (only the full-resolution one without DS)."""
        side, skips = embedding, []
        for block in self.side_blocks:
            side = block(side)
            skips.append(side)
        x = self.base(embedding)
        outputs = []
        last = len(self.stages) - 1
        for s, (upsample, stage, skip) in enumerate(zip(self.upsample_layers, self.stages, skips)):
            x = upsample(x)
            start = (skip.shape[1] - x.shape[1]) // 2  # torch-em's centre crop of the skip's channels
            x = stage(torch.cat([x, skip[:, start:start + x.shape[1]]], dim=1))
            if self.deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        outputs.reverse()
        return outputs


@register_network("vim_unet_small", dims=(2,), needs_input_size=True, embed_dim=384,
                  summary="ViM-UNet Small: Vision Mamba (dim 384) encoder + UNETR decoder (Archit & Pape 2024)")
@register_network("vim_unet_tiny", dims=(2,), needs_input_size=True, embed_dim=192,
                  summary="ViM-UNet Tiny: Vision Mamba (dim 192) encoder + UNETR decoder (Archit & Pape 2024)")
class ViMUNet(SegmentationNetwork):
    """ViM-UNet for 2D inputs (batch, input_channels, x, y); ``input_size`` is the patch size the position
    embedding is built for. ``depth`` and ``drop_path_rate`` default to the original's (24, Vim's 0.1);
    ``configuration`` picks the encoder's (:data:`VIM_CONFIGURATIONS`; ``"paper"``: the paper's)."""

    # Output scales under deep supervision, highest resolution first; what a trainer's
    # ``_get_deep_supervision_scales`` must return for this network (see the module docstring).
    deep_supervision_scales: tuple[tuple[float, float], ...] = ((1.0, 1.0), (0.5, 0.5), (0.25, 0.25), (0.125, 0.125))
    only_dim = dim = 2
    total_stride = PATCH_SIZE

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 input_size: Sequence[int] | None = None, embed_dim: int = 192, depth: int = 24,
                 drop_path_rate: float = 0.1, conv_op: type[nn.Module] | None = None,
                 strides: Sequence | None = None, configuration: str = "paper") -> None:
        super().__init__()
        if conv_op is not None and conv_dim(conv_op) != 2:
            raise ValueError(f"ViM-UNet is 2D only (Vision Mamba patch embedding and 2D decoder); got conv_op="
                             f"{conv_op.__name__}. Use a 2D configuration.")
        if input_size is None:
            raise ValueError("ViM-UNet needs input_size (the patch size, e.g. the plans' patch_size): its position "
                             "embedding is sized from it")
        if len(input_size) != 2:
            raise ValueError(f"ViM-UNet is 2D only; input_size must have 2 entries, got {tuple(input_size)}")
        if any(int(s) < 1 for s in input_size):
            raise ValueError(f"input_size must be positive, got {tuple(input_size)}")
        self.plan_strides = fixed_plan_strides("ViMUNet", self.deep_supervision_scales, (PATCH_SIZE, PATCH_SIZE),
                                               strides)
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.input_size = tuple(int(s) for s in input_size)
        grid = tuple(math.ceil(s / PATCH_SIZE) for s in self.input_size)
        self.encoder = ViMEncoder(input_channels, embed_dim, depth, grid, drop_path_rate, configuration)
        self.decoder = ViMUNetDecoder(embed_dim, num_classes, deep_supervision)
        self.key_to_encoder = "encoder"  # DNA's hooks (nnssl / OpenMind fine-tuning)
        self.key_to_stem = "encoder.patch_embed"
        self.keys_to_in_proj = ("encoder.patch_embed.proj",)
        self.key_to_lpe = "encoder.pos_embed"

    def _check_spatial(self, spatial: tuple[int, ...]) -> None:
        if math.ceil(spatial[0] / PATCH_SIZE) * math.ceil(spatial[1] / PATCH_SIZE) < 2:
            raise ValueError(f"spatial size {spatial} gives a single {PATCH_SIZE}x{PATCH_SIZE} patch; the decoder's "
                             "instance norms need at least two")

    def _forward_padded(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decoder(self.encoder(x))
