"""Bidirectional Mamba and the Vision Mamba block (Zhu et al. 2024, hustvl/Vim, ``models_mamba.py``).

:class:`BiMamba` is Vim's ``bimamba_type="v2"`` mixer: one shared ``in_proj``/``out_proj`` around two selective
scans, one over the token sequence and one over the reversed sequence, each with its own ``conv1d``, ``x_proj``,
``dt_proj``, ``A_log`` and ``D`` (the reversed branch's are Vim's ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``,
``A_b_log``, ``D_b``). The reversed branch's output is flipped back and the two are summed, halved when
``divide_out`` (Vim's ``if_divide_out``), then projected. Parameter names, shapes and initialisation are Vim's.

Both directions run as a single selective scan (:func:`nnunet_mamba.ops.cross_scan.folded_selective_scan`): the
reversed branch is stacked onto the channel axis (2 * d_inner channels) with grouped B/C (group 0 forward, group 1
reversed), so the two directions cost one kernel launch (one chunked scan on the PyTorch backend) instead of two.

:class:`ViMBlock` is Vim's block with ``rms_norm=True, residual_in_fp32=True``. Vim writes it as
``Add -> RMSNorm -> Mixer`` (to fuse the add with the norm), which is the usual pre-norm residual block
``x + DropPath(Mixer(RMSNorm(x)))`` with the sums regrouped; we write it the usual way. The residual stream is
float32 whatever the autocast state (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..ops import folded_selective_scan
from .mamba import Mamba


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, computed in float32 (mamba-ssm's RMSNorm).

    Written out rather than ``torch.nn.RMSNorm`` for mamba-ssm's numerics: the norm in float32 whatever the input
    dtype (float64 stays float64), the result cast back.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays float64
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x32.dtype)
        return out.to(x.dtype)


class BiMamba(Mamba):
    """Vim's bidirectional ("v2") Mamba on sequences (batch, L, d_model); see the module docstring.

    Vim's fused bidirectional layer function is not part of mamba-ssm, so ``use_fast_path`` has no effect here;
    the scan itself still runs on mamba-ssm's CUDA kernel when :func:`selective_scan` picks it.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 divide_out: bool = True, **mamba_kwargs) -> None:
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand, **mamba_kwargs)
        self.divide_out = divide_out
        # The reversed branch is initialised exactly as the forward one (Vim repeats the same code), so take the
        # freshly initialised branch parameters of a second Mamba; its in_proj/out_proj are dropped (shared).
        backward = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, **mamba_kwargs)
        self.A_b_log = backward.A_log
        self.conv1d_b = backward.conv1d
        self.x_proj_b = backward.x_proj
        self.dt_proj_b = backward.dt_proj
        self.D_b = backward.D

    def _branch_projections(self, u: torch.Tensor, x_proj: nn.Linear, dt_proj: nn.Linear):
        """delta (batch, d_inner, L) without bias, and B, C (batch, N, L) of one direction from its conv output u."""
        dt, B, C = torch.split(x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt_proj.weight @ dt.transpose(1, 2)  # the bias goes into the scan as delta_bias
        return delta, B.transpose(1, 2), C.transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"BiMamba expects (batch, L, d_model={self.d_model}), got {tuple(hidden_states.shape)}")
        length = hidden_states.shape[1]
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # each (batch, d_inner, L)
        # Channels [0, d_inner) carry the sequence, [d_inner, 2 d_inner) the reversed sequence, from here to the scan.
        x2 = torch.cat([x, x.flip(-1)], dim=1)
        z2 = torch.cat([z, z.flip(-1)], dim=1)
        conv_weight = torch.cat([self.conv1d.weight, self.conv1d_b.weight])
        conv_bias = None if self.conv1d.bias is None else torch.cat([self.conv1d.bias, self.conv1d_b.bias])
        u = F.silu(F.conv1d(x2, conv_weight, conv_bias, padding=self.d_conv - 1,
                            groups=2 * self.d_inner)[..., :length])
        u_f, u_b = u.chunk(2, dim=1)
        delta_f, B_f, C_f = self._branch_projections(u_f, self.x_proj, self.dt_proj)
        delta_b, B_b, C_b = self._branch_projections(u_b, self.x_proj_b, self.dt_proj_b)
        y = folded_selective_scan(
            u.unflatten(1, (2, self.d_inner)), torch.stack([delta_f, delta_b], dim=1),
            -torch.exp(torch.cat([self.A_log, self.A_b_log]).float()),
            torch.stack([B_f, B_b], dim=1), torch.stack([C_f, C_b], dim=1),  # grouped: (batch, 2, N, L)
            torch.cat([self.D, self.D_b]).float(), z=z2.unflatten(1, (2, self.d_inner)),
            delta_bias=torch.cat([self.dt_proj.bias, self.dt_proj_b.bias]).float(), delta_softplus=True)
        y = y[:, 0] + y[:, 1].flip(-1)
        if self.divide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))


class ViMBlock(nn.Module):
    """Pre-norm residual block ``x + DropPath(BiMamba(RMSNorm(x)))`` on float32 (or float64) tokens (batch, L, dim)."""

    def __init__(self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **mamba_kwargs) -> None:
        super().__init__()
        self.mixer = BiMamba(dim, **mamba_kwargs)
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        return residual + self.drop_path(self.mixer(self.norm(residual))).to(residual.dtype)
