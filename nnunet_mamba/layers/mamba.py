"""The Mamba (S6) layer, state-dict compatible with ``mamba_ssm.modules.mamba_simple.Mamba``.

Parameter names, shapes and initialisation are mamba-ssm's (in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj), so checkpoints move between the two unchanged. On CUDA with mamba-ssm and causal-conv1d installed the
fused ``mamba_inner_fn`` runs; otherwise the layer runs its convolution in PyTorch and the scan through
:func:`nnunet_mamba.ops.selective_scan`, which picks mamba-ssm's kernel or our pure-PyTorch scan.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import resolve_backend, selective_scan
from .ssm import init_mamba_ssm_


@lru_cache(maxsize=None)
def _fused_mamba_inner():
    """mamba-ssm's fused layer function when both mamba-ssm and causal-conv1d import, else None."""
    try:
        import causal_conv1d  # noqa: F401  (mamba_inner_fn needs its kernels)
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    except Exception:
        return None
    return mamba_inner_fn


class Mamba(nn.Module):
    """Selective state-space layer on sequences of shape (batch, L, d_model)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        # checked here, not in forward: torch.compile's tracing cannot follow the failing import of a missing kernel
        self._fused_available = _fused_mamba_inner() is not None

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, dtype=torch.float32, device=device))
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device))
        init_mamba_ssm_(self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D, dt_scale=dt_scale,
                        dt_init=dt_init, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor)

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _use_fused(self, x: torch.Tensor) -> bool:
        if not self.use_fast_path or not x.is_cuda or not self._fused_available:
            return False
        return resolve_backend(x.device) == "cuda"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba expects (batch, L, d_model={self.d_model}), got {tuple(hidden_states.shape)}")
        batch, length, _ = hidden_states.shape
        # Projections are computed channels-first, (features, batch * L), so that x, z and dt come out with the
        # sequence axis contiguous: the scan kernel and conv1d then need no copies of them (a full-size copy per
        # tensor at 128^3 tokens).
        xz = self._channels_first(self.in_proj, hidden_states.reshape(batch * length, -1), batch)
        A = -torch.exp(self.A_log.float())
        if self._use_fused(xz):
            return _fused_mamba_inner()(
                xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :length])
        x_dbl = self.x_proj(x.transpose(1, 2).reshape(batch * length, self.d_inner))  # (batch * L, dt_rank + 2 N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (self.dt_proj.weight @ dt.t()).view(self.d_inner, batch, length).transpose(0, 1)
        B = B.view(batch, length, self.d_state).transpose(1, 2).contiguous()
        C = C.view(batch, length, self.d_state).transpose(1, 2).contiguous()
        # dt_proj's bias goes into the scan as delta_bias
        y = selective_scan(x, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                           delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))

    @staticmethod
    def _channels_first(linear: nn.Linear, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """``linear`` applied to (batch * L, in) rows, returned as (batch, out, L) with L contiguous."""
        out = linear.weight @ rows.t()  # (out, batch * L)
        if linear.bias is not None:
            out = out + linear.bias[:, None]
        return out.view(out.shape[0], batch, -1).transpose(0, 1)
