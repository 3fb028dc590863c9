"""VMamba v0 ("Vanilla-VMamba") layers, state-dict compatible with VMamba v0 and Swin-UMamba.

``SS2D`` is VMamba's 2D selective scan: the feature map is read as four sequences (row-major, column-major and
both reversed), each scanned by its own S6 parameters, and the four outputs are summed back in image order.
Two ways to run the four directions, chosen by :func:`nnunet_mamba.ops.cross_scan.cross_scan_backend`:
    fused   (the ``triton`` backend: CUDA without mamba-ssm, or forced) ONE
            :func:`~nnunet_mamba.ops.cross_selective_scan` call reads the map in each direction's order through an
            order table and merges the outputs inside the kernel, so no permuted copy of the map is made;
            ``x_proj`` is per token, so every direction's dt, B and C are computed in image order, in one matmul.
    copied  (mamba-ssm's kernel, our PyTorch scan) the four sequences are written once into one buffer and go
            through ONE :func:`~nnunet_mamba.ops.selective_scan` call, directions folded into channels (B/C
            grouped, G = 4), then are merged back in image order.
Measured on an H100 (Swin-UMamba, batch 12, 320x320, one nnU-Net step): copied with mamba-ssm 151.0 ms / 9.16
GiB, fused 240.9 ms / 7.39 GiB (our Triton backward is the slower part): mamba-ssm where it is installed.
Parameter names and shapes are VMamba v0's (``x_proj_weight`` (4, R + 2N, d_inner), ``dt_projs_weight``
(4, d_inner, R), ``dt_projs_bias`` (4, d_inner), ``A_logs`` (4 d_inner, N), ``Ds`` (4 d_inner)), so ImageNet
checkpoints load unchanged.

As in VMamba, the layers work on channels-last tensors (batch, H, W, C); only ``PatchEmbed2D`` takes a
channels-first image.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ..ops import selective_scan
from ..ops import cross_scan_backend, cross_selective_scan, scan_orders

# VMamba v0's directions and their order (see nnunet_mamba.ops.cross_scan): row-major, column-major, both reversed
SCAN_DIRECTIONS = ("hw", "wh", "-hw", "-wh")


def _inverse_softplus_dt(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """Mamba's dt bias: softplus^-1 of dt drawn log-uniformly in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class SS2D(nn.Module):
    """2D selective scan over channels-last maps (batch, H, W, d_model); four directions, one scan call."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
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

        # Per-direction projections, stacked as VMamba stores them; x_proj like nn.Linear's default init.
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner))
        nn.init.uniform_(self.x_proj_weight, -d_inner ** -0.5, d_inner ** -0.5)
        # dt projections keep dt's variance at initialisation (Mamba's init)
        std = rank ** -0.5 * dt_scale
        if dt_init == "constant":
            self.dt_projs_weight = nn.Parameter(torch.full((k, d_inner, rank), std))
        elif dt_init == "random":
            self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank).uniform_(-std, std))
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.dt_projs_bias = nn.Parameter(
            torch.stack([_inverse_softplus_dt(d_inner, dt_min, dt_max, dt_init_floor) for _ in range(k)]))
        # S4D-real: A = -(1..N) for every channel of every direction, stored as log
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(k * d_inner, 1))
        self.A_logs._no_weight_decay = True
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.Ds._no_weight_decay = True

        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"SS2D expects channels-last (batch, H, W, {self.d_model}), got {tuple(x.shape)}")
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2)))  # (batch, d, H, W)
        if cross_scan_backend(x) == "triton":
            y = self._fused_scan(x)
        else:
            y = self._copied_scan(x)
        y = self.out_norm(y)
        return self.dropout(self.out_proj(y * F.silu(z)))

    def _fused_scan(self, x: torch.Tensor, backend: str = "triton") -> torch.Tensor:
        """The cross scan: every direction read from the image-order map through its order table (fused kernels
        with ``triton``; the tests also run it through the gather/scatter path)."""
        batch, d, height, width = x.shape
        length, k, n = height * width, len(SCAN_DIRECTIONS), self.d_state
        # Tokens in image order, position-major: the depthwise conv of a channels-last map is channels-last, so
        # this is a view, and the scan's gathers read whole channel blocks in every direction.
        tokens = x.permute(0, 2, 3, 1).reshape(batch, length, d)
        # Every direction's dt, B, C in image order, all directions in one matmul: (batch, L, K, R + 2N).
        x_dbl = (tokens @ self.x_proj_weight.reshape(k * (self.dt_rank + 2 * n), d).t()).view(batch, length, k, -1)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, n, n], dim=-1)
        dts = torch.einsum("blkr,kdr->blkd", dts, self.dt_projs_weight).reshape(batch, length, k * d)
        # The scan computes in float32 and returns float32 (float64 stays float64), as VMamba's, so the four
        # directions are summed and normalised at full precision under autocast.
        y = cross_selective_scan(tokens.transpose(1, 2), dts.transpose(1, 2), -torch.exp(self.A_logs.float()),
                                 Bs.permute(0, 2, 3, 1), Cs.permute(0, 2, 3, 1),
                                 scan_orders((height, width), SCAN_DIRECTIONS, device=x.device), self.Ds.float(),
                                 delta_bias=self.dt_projs_bias.float().view(-1), delta_softplus=True,
                                 backend=backend)
        return y.transpose(1, 2).reshape(batch, height, width, d)

    def _copied_scan(self, x: torch.Tensor) -> torch.Tensor:
        """One selective scan over the four sequences written into one buffer, then merged back in image order.

        For mamba-ssm's kernel and our PyTorch scan: the copies are made once, for u only, and x_proj runs on them
        (per token, so equal to projecting in image order and gathering dt, B and C, which would copy three more
        tensors). Measured on an H100 (Swin-UMamba, batch 12, 320x320): 151.0 ms / 9.16 GiB this way against
        189.3 ms / 11.31 GiB through the generic gather/scatter path.
        """
        batch, d, height, width = x.shape
        length, k = height * width, len(SCAN_DIRECTIONS)
        xs = x.new_empty(batch, k, d, length)  # row-major, column-major, then both reversed
        xs[:, 0] = x.flatten(2)
        xs[:, 1].unflatten(-1, (width, height)).copy_(x.transpose(2, 3))
        xs[:, 2:] = xs[:, :2].flip(-1)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        dtype = torch.promote_types(xs.dtype, torch.float32)  # float32 output, as the fused path's
        y = selective_scan(xs.to(dtype).view(batch, k * d, length), dts.to(dtype).reshape(batch, k * d, length),
                           -torch.exp(self.A_logs.float()), Bs.to(dtype), Cs.to(dtype), self.Ds.float(),
                           delta_bias=self.dt_projs_bias.float().view(-1), delta_softplus=True)
        y = y.view(batch, k, d, length)
        rows = (y[:, 0] + y[:, 2].flip(-1)).view(batch, d, height, width)
        cols = (y[:, 1] + y[:, 3].flip(-1)).view(batch, d, width, height).transpose(2, 3)
        return (rows + cols).permute(0, 2, 3, 1)


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

    def __init__(self, dim: int, depth: int, drop_path: Union[float, Sequence[float]] = 0.0, d_state: int = 16) -> None:
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

    def __init__(self, dim: int, scale: int = 2, out_dim: Optional[int] = None) -> None:
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

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.patch_embed(x)
        outputs = []
        for s, layer in enumerate(self.layers):
            x = layer(x)
            outputs.append(x)
            if s < len(self.downsamples):
                x = self.downsamples[s](x)
        return outputs
