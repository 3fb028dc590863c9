"""Flemme's vision Mamba blocks on channels-last maps (paper Eq. 5).

Flemme's scan modes are named as direction tuples (:func:`flemme_directions`, e.g. 3D ``simplified`` =
("dhw", "whd")), turned into order tables by :func:`nnunet_mamba.ops.scan_orders` and scanned, every direction
with its own parameters, in one call of the multi-direction core (:class:`~nnunet_mamba.layers.ssm.DirectionalSSM`),
which returns the directions' outputs summed in image order."""
from __future__ import annotations

import math

import torch
from timm.layers import DropPath
from torch import nn

from ...ops import scan_orders
from ..ssm import DirectionalSSM
from .tokens import TokenMLP


SCAN_MODES = {2: ("single", "cross"), 3: ("single", "simplified", "cross")}
# Flemme's scan modes as ops.cross_scan direction names: the axes from the slowest- to the fastest-varying (h, w in
# 2D; d, h, w in 3D), as the original's permutation tables; a '-' prefix reads the sequence backwards (its flip).
_SCAN_DIRECTIONS = {
    (2, "single"): ("hw",),
    (2, "cross"): ("hw", "wh"),
    (3, "single"): ("dhw",),
    (3, "simplified"): ("dhw", "whd"),
    (3, "cross"): ("dhw", "dwh", "hdw", "hwd", "wdh", "whd"),
}

def flemme_directions(dim: int, mode: str = "single", flip: bool = False) -> tuple[str, ...]:
    """The scan directions of a Flemme scan ``mode``: 2D ``single`` (row-major) or ``cross`` (row- and
    column-major); 3D ``single``, ``simplified`` (dhw, whd) or ``cross`` (all six axis orders). ``flip`` adds every
    direction reversed (the original's flip_scan doubles K)."""
    if mode not in SCAN_MODES.get(dim, ()):
        raise ValueError(f"scan mode for {dim}D maps must be one of {SCAN_MODES.get(dim)}, got {mode!r}")
    directions = _SCAN_DIRECTIONS[dim, mode]
    return directions + tuple("-" + d for d in directions) if flip else directions


class MambaBlock(DirectionalSSM):
    """Flemme's vision Mamba block (paper Eq. 5) on channels-last maps (B, *S, C_in) -> (B, *S, C_out).

    Per direction k (of ``scan_orders(mode, flip)``) its own x_proj / dt_proj / A / D, stored stacked as in the
    original: ``x_proj_weight`` (K, R + 2N, E), ``dt_projs_weight`` (K, E, R), ``dt_projs_bias`` (K, E),
    ``A_logs`` (K E, N), ``Ds`` (K E), with E = ``expand`` C_in, N = ``d_state`` (default ceil(C_in / 6)),
    R = ceil(C_in / 16) (:class:`~nnunet_mamba.layers.ssm.DirectionalSSM`). The scan and the merge of the
    directions run in float32.
    """

    def __init__(self, input_channels: int, output_channels: int, dim: int, scan: str = "single",
                 flip_scan: bool = False, d_state: int | None = None, expand: float = 2.0, d_conv: int = 3,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, nonlin: type[nn.Module] = nn.SiLU,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        self.directions = flemme_directions(dim, scan, flip_scan)
        directions = len(self.directions)
        inner = int(expand * input_channels)
        self.d_state = d_state or math.ceil(input_channels / 6)
        self.dt_rank = math.ceil(input_channels / 16)
        conv_op = {2: nn.Conv2d, 3: nn.Conv3d}[dim]

        self.norm1 = nn.LayerNorm(input_channels)
        self.in_proj = nn.Linear(input_channels, 2 * inner, bias=False)
        self.conv = conv_op(inner, inner, d_conv, padding=(d_conv - 1) // 2, groups=inner)
        self.act = nonlin()
        self._add_ssm_parameters(directions, inner, self.dt_rank, self.d_state, dt_min=dt_min, dt_max=dt_max,
                                 dt_init_floor=dt_init_floor)
        self.norm2 = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, input_channels, bias=False)
        self.mlp = TokenMLP(input_channels, output_channels, mlp_ratio, nonlin)
        self.fc = nn.Linear(input_channels, output_channels) if input_channels != output_channels else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[1:-1]
        h, z = self.in_proj(self.norm1(x)).chunk(2, dim=-1)
        h = h.movedim(-1, 1)
        if h.dim() == 5:
            # cuDNN's weight gradient of a channels-last depthwise Conv3d runs group by group, several times slower
            # than with a contiguous (N, C, D, H, W) input (docs/measurements.md)
            h = h.contiguous()
        h = self.act(self.conv(h))
        y = self._directional_scan(h.flatten(2), scan_orders(tuple(spatial), self.directions, x.device))
        y = self.norm2(y.transpose(1, 2).reshape(x.shape[0], *spatial, -1)).to(z.dtype)
        x = x + self.drop_path(self.out_proj(y * self.act(z)))
        return self.fc(x) + self.drop_path(self.mlp(x))


class ResMambaBlock(nn.Module):
    """Two Mamba blocks with a residual around the pair (a linear shortcut when the width changes), activation."""

    def __init__(self, input_channels: int, output_channels: int, dim: int, nonlin: type[nn.Module] = nn.SiLU,
                 **block_kwargs) -> None:
        super().__init__()
        self.block1 = MambaBlock(input_channels, output_channels, dim, nonlin=nonlin, **block_kwargs)
        self.block2 = MambaBlock(output_channels, output_channels, dim, nonlin=nonlin, **block_kwargs)
        self.shortcut = (nn.Linear(input_channels, output_channels) if input_channels != output_channels
                         else nn.Identity())
        self.act = nonlin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.block2(self.block1(x)) + self.shortcut(x))
