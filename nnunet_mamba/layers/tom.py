"""Tri-oriented Mamba (ToM, SegMamba's layer, used by SegResMamba) over 3D feature maps.

    ToM(z) = Mamba(z_f) + Mamba(z_r) + Mamba(z_s)

The voxels of a (batch, C, D, H, W) map, flattened in C order (the last axis fastest), are scanned in three
orders: forward, reversed, and inter-slice (the slice axis, the first spatial axis, varying fastest, so
consecutive tokens are the same in-plane position on neighbouring slices; SegMamba's ``nslices`` scan with
``nslices = D``). Each direction has its own SSM parameters (depthwise causal conv1d, x_proj, dt_proj, A_log, D,
with mamba-ssm's initialisation); each direction's output is mapped back to voxel order before the sum.

Design: shared input and output projections, as SegMamba's ToM (``bimamba_type="v3"``).
    Both projections are per-token linear maps, so shared ones are computed once for all three orders
    (x W_in permuted is (x permuted) W_in; out_proj(a) + out_proj(b) + out_proj(c) = out_proj(a + b + c) for
    the bias-free out_proj), and the gate silu(z) is applied once, after the three outputs are back in
    voxel order. Shared versus three full Mamba layers (LayerNorm included; expand 2, d_state 16):
      parameters       C = 48: 31,488 vs 59,136; C = 384: 1,122,816 vs 2,892,288; SegResMamba's eight ToMs
                       (two per width 48, 96, 192, 384): 3,121,920 vs 7,822,080
      matmul MACs      C = 48 on 16^3 voxels: 106M vs 219M; C = 192 on 8^3: 149M vs 375M
    The scan dominates on CPU, so the two run at about the same speed there (docs/measurements.md). Sharing
    saves 60% of SegResMamba's ToM parameters and half the matmul work, which a GPU spends besides the scan. The
    three directions are folded into the channel dimension (3 * d_inner channels,
    direction-major; B and C grouped, one group per direction) by the multi-direction core
    (:func:`nnunet_mamba.ops.cross_scan.folded_selective_scan`), so one ``selective_scan`` call, and on CUDA one
    mamba-ssm kernel launch instead of three, serves all of them.

Design: the scan-order copies stay, :func:`nnunet_mamba.ops.cross_selective_scan` is not used.
    The cross scan reads image-order inputs through order tables, which pays when the inputs exist in image order
    (SS2D's). Here the causal conv1d runs along each scan order, so u, and dt, B and C computed from it, are born
    in scan order, one per direction; handing them to the cross scan would mean scattering these four tensors
    back to image order only for its kernel to gather them again, which would save no more than the final merge.
    The orders themselves are the cross scan's (cached) tables: forward ``dhw``, reverse ``-dhw``, inter-slice
    ``hwd``.

Like :class:`~nnunet_mamba.layers.blocks.MambaLayer`, the layer normalises the tokens (LayerNorm) and has no
residual. Precision: the LayerNorm, the scan (inputs cast to float32, float32 output) and the merge run in float32;
the projections and the depthwise conv follow autocast. SegResMamba's headline is memory, and its first ToM sees
64^3 tokens: in float32 only where precision needs it, this split saves time and memory against all-float32
ToMs; 16-bit scan inputs would save a little more but give up the float32 scan that keeps the originals' fp16
NaNs away (figures in docs/measurements.md).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import folded_selective_scan, inverse_orders, scan_orders
from .ssm import init_mamba_ssm_

DIRECTIONS: tuple[str, ...] = ("forward", "reverse", "inter_slice")
# The directions in nnunet_mamba.ops.cross_scan's names: axes slowest first, "-" for reversed; the inter-slice
# scan has the slice axis d fastest.
ORDER_NAMES = {"forward": "dhw", "reverse": "-dhw", "inter_slice": "hwd"}


def scan_order(spatial_shape: Sequence[int], direction: str,
               device: torch.device | None = None) -> torch.Tensor:
    """Voxel indices (into the C-order flattened 3D map) in the order ``direction`` visits them; read-only.

    ``sequence = flat[..., order]`` gives the scan; :func:`inverse_order` maps it back.
    """
    if direction not in ORDER_NAMES:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return scan_orders(spatial_shape, (ORDER_NAMES[direction],), device)[0]


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The permutation undoing ``order``: ``sequence[..., inverse_order(order)]`` is back in voxel order."""
    return inverse_orders(order)


class ToM(nn.Module):
    """LayerNorm + tri-oriented Mamba on (batch, dim, D, H, W) maps; returns the same shape, no residual."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        self.dim = dim
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16)
        n_dir, d_inner = len(DIRECTIONS), self.d_inner

        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        # Per-direction SSM parameters, stacked on a leading direction axis (order of DIRECTIONS).
        self.conv1d_weight = nn.Parameter(torch.empty(n_dir, d_inner, d_conv))
        self.conv1d_bias = nn.Parameter(torch.empty(n_dir, d_inner))
        self.x_proj_weight = nn.Parameter(torch.empty(n_dir, self.dt_rank + 2 * d_state, d_inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(n_dir, d_inner, self.dt_rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(n_dir, d_inner))
        self.A_log = nn.Parameter(torch.empty(n_dir, d_inner, d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(n_dir, d_inner))
        # the conv1d first, then the SSM parameters: ToM's original draw order
        with torch.no_grad():  # nn.Conv1d's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = d_conv
            nn.init.uniform_(self.conv1d_weight, -d_conv ** -0.5, d_conv ** -0.5)
            nn.init.uniform_(self.conv1d_bias, -d_conv ** -0.5, d_conv ** -0.5)
        init_mamba_ssm_(self.dt_proj_weight, self.dt_proj_bias, self.A_log, self.D, self.x_proj_weight,
                        dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.dim:
            raise ValueError(f"ToM expects a 3D feature map (batch, {self.dim}, D, H, W), got {tuple(x.shape)}")
        batch, spatial = x.shape[0], x.shape[2:]
        length = spatial.numel()
        n_dir, d_inner, n = len(DIRECTIONS), self.d_inner, self.d_state
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))  # 16-bit inputs only; float64 stays
            tokens = self.norm(x.flatten(2).transpose(1, 2))  # (batch, L, dim)
        # projections and the depthwise conv follow autocast; the scan and the merge run in float32 (see above)
        u, z = self.in_proj(tokens).transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, L) each
        orders = scan_orders(spatial, [ORDER_NAMES[d] for d in DIRECTIONS], device=x.device)
        # directions folded into channels: (batch, 3 * d_inner, L), direction-major
        u = torch.cat([u.index_select(2, order) for order in orders], dim=1)
        u = F.conv1d(u, self.conv1d_weight.reshape(n_dir * d_inner, 1, self.d_conv),
                     self.conv1d_bias.reshape(-1), padding=self.d_conv - 1, groups=n_dir * d_inner)
        u = F.silu(u[..., :length]).unflatten(1, (n_dir, d_inner))  # (batch, 3, d_inner, L), a view
        x_dbl = torch.einsum("bgil,gji->bgjl", u, self.x_proj_weight)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, n, n], dim=2)  # B, C: (batch, 3, N, L), grouped
        dt = torch.einsum("bgrl,gir->bgil", dt, self.dt_proj_weight)
        scan_dtype = torch.promote_types(u.dtype, torch.float32)
        y = folded_selective_scan(u.to(scan_dtype), dt.to(scan_dtype), -torch.exp(self.A_log.reshape(-1, n)),
                                  B.to(scan_dtype), C.to(scan_dtype), D=self.D.reshape(-1),
                                  delta_bias=self.dt_proj_bias.reshape(-1), delta_softplus=True)
        merged = sum(y[:, g].index_select(2, inverse) for g, inverse in enumerate(inverse_orders(orders)))
        out = self.out_proj((merged * F.silu(z)).transpose(1, 2))  # (batch, L, dim)
        return out.transpose(1, 2).reshape(batch, self.dim, *spatial)
