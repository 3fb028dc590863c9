"""VMamba v0 ("Vanilla-VMamba") layers, state-dict compatible with VMamba v0 and Swin-UMamba.

``SS2D`` is VMamba's 2D selective scan: the feature map is read as four sequences (row-major, column-major and
both reversed), each scanned by its own S6 parameters, and the four outputs are summed back in image order.
All four run in ONE call of :func:`nnunet_mamba.ops.cross_scan.projected_cross_scan` (the layer's
parameters and scan are :class:`~nnunet_mamba.layers.ssm.DirectionalSSM`'s), which picks the fused cross-scan
kernels or one folded scan of the map's copies, whichever the backend makes faster.
Parameter names and shapes are VMamba v0's (``x_proj_weight`` (4, R + 2N, d_inner), ``dt_projs_weight``
(4, d_inner, R), ``dt_projs_bias`` (4, d_inner), ``A_logs`` (4 d_inner, N), ``Ds`` (4 d_inner)), so ImageNet
checkpoints load unchanged.

As in VMamba, the layers work on channels-last tensors (batch, H, W, C); only ``PatchEmbed2D`` takes a
channels-first image.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ..ops import scan_orders
from .ssm import DirectionalSSM

# VMamba v0's directions and their order (see nnunet_mamba.ops.cross_scan): row-major, column-major, both reversed
SCAN_DIRECTIONS = ("hw", "wh", "-hw", "-wh")


class SS2D(DirectionalSSM):
    """2D selective scan over channels-last maps (batch, H, W, d_model); four directions, one scan call."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4, dropout: float = 0.0,
                 conv_bias: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        k, d_inner, rank = len(SCAN_DIRECTIONS), self.d_inner, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                bias=conv_bias)
        self.act = nn.SiLU()

        self._add_ssm_parameters(k, d_inner, rank, d_state, dt_scale=dt_scale, dt_init=dt_init, dt_min=dt_min,
                                 dt_max=dt_max, dt_init_floor=dt_init_floor)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"SS2D expects channels-last (batch, H, W, {self.d_model}), got {tuple(x.shape)}")
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2)))  # (batch, d, H, W), channels-last in memory
        batch, d, height, width = x.shape
        # The scan computes in float32 and returns float32 (float64 stays float64), as VMamba's, so the four
        # directions are summed and normalised at full precision under autocast.
        y = self._directional_scan(x.flatten(2), scan_orders((height, width), SCAN_DIRECTIONS, device=x.device))
        y = self.out_norm(y.transpose(1, 2).reshape(batch, height, width, d))
        return self.dropout(self.out_proj(y * F.silu(z)))


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LayerNorm(x))) on channels-last maps."""

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, d_state: int = 16, attn_drop_rate: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)
        self.self_attention = SS2D(d_model=hidden_dim, d_state=d_state, dropout=attn_drop_rate)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.self_attention(self.ln_1(x)))


class VSSLayer(nn.Module):
    """A stage of ``depth`` VSS blocks (Swin-UMamba keeps the patch merging outside, in ``downsamples``)."""

    def __init__(self, dim: int, depth: int, drop_path: float | Sequence[float] = 0.0, d_state: int = 16) -> None:
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        if len(rates) != depth:
            raise ValueError(f"drop_path needs {depth} rates (one per block), got {rates}")
        self.blocks = nn.ModuleList([VSSBlock(dim, drop_path=rate, d_state=d_state) for rate in rates])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PatchEmbed2D(nn.Module):
    """Non-overlapping ``patch_size`` convolution, then LayerNorm; (batch, C, H, W) -> (batch, H/p, W/p, E)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging2D(nn.Module):
    """Swin's patch merging: 2x2 neighbours concatenated (4C), LayerNorm, linear to 2C; halves H and W."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        if height % 2 or width % 2:
            raise ValueError(f"PatchMerging2D needs even H and W, got a map of shape {tuple(x.shape)}")
        # VMamba concatenates x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]: column offset outer,
        # row offset inner. One permuted copy gives the same channel order.
        x = x.view(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.reshape(batch, height // 2, width // 2, 4 * channels)))


class PatchExpand(nn.Module):
    """Swin-Unet's patch expanding: linear to scale^2 * out_dim, pixel shuffle by ``scale``, LayerNorm(out_dim)."""

    def __init__(self, dim: int, scale: int = 2, out_dim: int | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.out_dim = dim // scale if out_dim is None else out_dim
        self.expand = nn.Linear(dim, scale * scale * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        p = self.scale
        x = self.expand(x).view(batch, height, width, p, p, self.out_dim)  # channels are (p1 p2 c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * p, width * p, self.out_dim)
        return self.norm(x)


class FinalPatchExpand_X4(PatchExpand):  # noqa: N801  (the original's name)
    """The last expansion of Swin-UMamba's decoder: x4 in H and W, channels kept."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, scale=4, out_dim=dim)


class VSSMEncoder(nn.Module):
    """VMamba v0 backbone without its classifier: patch embedding, VSS stages, patch merging between stages.

    ``forward`` takes a channels-first map and returns every stage's output, channels-last, highest resolution
    first. Keys: ``patch_embed``, ``layers.i.blocks.j``, ``downsamples.i`` (VMamba's ``layers.i.downsample``).
    """

    def __init__(self, in_chans: int = 3, patch_size: int = 4, depths: Sequence[int] = (2, 2, 9, 2),
                 dims: Sequence[int] = (96, 192, 384, 768), d_state: int = 16, drop_path_rate: float = 0.2) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {list(depths)} and dims {list(dims)} must have one entry per stage")
        self.dims = list(dims)
        self.patch_embed = PatchEmbed2D(patch_size, in_chans, dims[0])
        # stochastic depth grows linearly over all blocks of all stages
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList([VSSLayer(dim, depth, rates[start:start + depth], d_state)
                                     for dim, depth, start in zip(dims, depths, starts)])
        self.downsamples = nn.ModuleList([PatchMerging2D(dim) for dim in dims[:-1]])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # VMamba's init: only Linear and LayerNorm (convolutions and the S6 parameters keep their own init)
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        outputs = []
        for s, layer in enumerate(self.layers):
            x = layer(x)
            outputs.append(x)
            if s < len(self.downsamples):
                x = self.downsamples[s](x)
        return outputs
