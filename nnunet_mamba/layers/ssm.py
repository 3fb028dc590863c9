"""The multi-direction selective-scan core of our Mamba layers: Mamba's parameter initialisation, and the
parameters and scan of layers that read one map in several directions.

:func:`init_mamba_ssm_` is the one place where Mamba's SSM parameters get their initial values (mamba-ssm's
scheme), for one direction (:class:`~nnunet_mamba.layers.mamba.Mamba`) or a stack of them (SS2D, ToM, Flemme's
Mamba block). :class:`DirectionalSSM` holds VMamba's stacked per-direction parameters and runs them through
:func:`nnunet_mamba.ops.cross_scan.projected_cross_scan`, which chooses between the fused kernels and one folded
scan of copies. Layers whose sequences are born in scan order (ToM, the bidirectional Mamba: their causal conv
runs along each order) fold their directions with :func:`nnunet_mamba.ops.cross_scan.folded_selective_scan`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import projected_cross_scan


@torch.no_grad()
def init_mamba_ssm_(dt_proj_weight: Tensor, dt_proj_bias: Tensor, A_log: Tensor, D: Tensor,
                    x_proj_weight: Tensor | None = None, dt_scale: float = 1.0, dt_init: str = "random",
                    dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                    dt_bias_per_direction: bool = False) -> None:
    """Mamba's initialisation, in place, of one direction's SSM parameters or of a stack of them (leading axes).

    x_proj_weight (..., R + 2N, d_inner), when given: nn.Linear's default, U(-d_inner^-0.5, d_inner^-0.5);
    dt_proj_weight (..., d_inner, R): U(-s, s), or the constant s with ``dt_init="constant"``, s = R^-0.5 *
    dt_scale, so dt keeps its variance; dt_proj_bias (..., d_inner): softplus^-1 of dt drawn log-uniformly in
    [dt_min, dt_max] (floored at dt_init_floor), in dt_proj_bias's dtype, marked ``_no_reinit``; A_log (..., N):
    log(1..N), S4D-real; D: ones; both marked ``_no_weight_decay``.

    Random draws, in this order (the layers' original order, so a seed gives the same initial weights as
    before this function was shared): x_proj_weight, dt_proj_weight, dt_proj_bias. The dt bias is one draw over
    the whole tensor, or with ``dt_bias_per_direction`` one draw per index of its first axis (SS2D's and Flemme's
    Mamba block's original loop over directions; on the CPU generator both give the same numbers, on CUDA not).
    A layer whose other random parameters (nn.Linear / nn.Conv defaults, ToM's conv1d) were drawn before these
    keeps drawing them before calling this function.
    """
    if x_proj_weight is not None:
        bound = x_proj_weight.shape[-1] ** -0.5
        x_proj_weight.uniform_(-bound, bound)
    rank = dt_proj_weight.shape[-1]
    std = rank ** -0.5 * dt_scale
    if dt_init == "constant":
        dt_proj_weight.fill_(std)
    elif dt_init == "random":
        dt_proj_weight.uniform_(-std, std)
    else:
        raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
    if dt_bias_per_direction:
        u = torch.stack([torch.rand_like(row) for row in dt_proj_bias])
    else:
        u = torch.rand_like(dt_proj_bias)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    dt_proj_bias._no_reinit = True
    A_log.copy_(torch.log(torch.arange(1, A_log.shape[-1] + 1, dtype=torch.float32, device=A_log.device)))
    D.fill_(1.0)
    A_log._no_weight_decay = True
    D._no_weight_decay = True


class DirectionalSSM(nn.Module):
    """Base of layers that scan one image-order map in K directions, each with its own S6 parameters, stacked as
    VMamba stores them: ``x_proj_weight`` (K, R + 2N, d_inner), ``dt_projs_weight`` (K, d_inner, R),
    ``dt_projs_bias`` (K, d_inner), ``A_logs`` (K d_inner, N), ``Ds`` (K d_inner)."""

    def _add_ssm_parameters(self, directions: int, d_inner: int, dt_rank: int, d_state: int, dt_scale: float = 1.0,
                            dt_init: str = "random", dt_min: float = 0.001, dt_max: float = 0.1,
                            dt_init_floor: float = 1e-4) -> None:
        self.x_proj_weight = nn.Parameter(torch.empty(directions, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(directions, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(directions, d_inner))
        self.A_logs = nn.Parameter(torch.empty(directions * d_inner, d_state, dtype=torch.float32))
        self.Ds = nn.Parameter(torch.empty(directions * d_inner))
        init_mamba_ssm_(self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds, self.x_proj_weight,
                        dt_scale=dt_scale, dt_init=dt_init, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                        dt_bias_per_direction=True)

    def _directional_scan(self, x: Tensor, orders: Tensor, backend: str | None = None) -> Tensor:
        """x (batch, d_inner, L) in image order -> the K directions' scans summed in image order, float32
        (float64 for float64 x), position-major (batch, d_inner, L)."""
        return projected_cross_scan(x, self.x_proj_weight, self.dt_projs_weight, -torch.exp(self.A_logs.float()),
                                    self.Ds.float(), self.dt_projs_bias.float().view(-1), orders, backend=backend)
