"""Triton kernels of the selective scan: forward and backward, mamba-ssm's semantics and layouts.

The public entry point is :func:`nnunet_mamba.ops.selective_scan` (``backend="triton"``), which wraps
:func:`scan_forward` and :func:`scan_backward` in autograd-aware ``torch.library`` custom ops
(:mod:`nnunet_mamba.ops.compiled_scans`); this module holds the launchers, :mod:`.scan_kernels` the kernels.

The two passes split the work differently, each the faster of the two layouts we measured for it (H100,
``nnunet-mamba benchmark --kernels``; figures in docs/measurements.md).

Forward: one program per (channel block, group, batch) keeps the (block_d, N) states of ``block_d`` channels in
registers, in float32 whatever the input dtype, and walks the sequence in chunks of ``block_l`` steps; inside a
chunk the recurrence ``h_t = a_t h_{t-1} + b_t`` (a = exp(dt A), b = dt u B) is solved for all (channel, state)
pairs at once by ``tl.associative_scan`` over a (block_l, block_d, N) tile. Time is the tile's first axis on
purpose: Triton spreads the last axes over the lanes, so each thread holds a whole chunk of one (channel, state)
pair and the scan is a sequential loop in its registers; the sum over N (``y = <C, h>``) is the only shuffle.

For few independent sequences (batch x channels) over long ones the forward takes the backward's layout instead
(``ScanConfig.fwd_rows``): 16-step chunks of few programs would leave most of the GPU idle.

Backward: one program per (channel block, group, batch) as well, but the time axis lies across the lanes
((bwd_block_d, bwd_block_l) tiles, a few consecutive steps per thread) and the N states are visited one after the
other in an unrolled loop. So no gradient needs a sum over N across lanes (they accumulate in registers over the
loop), and each (channel block, state) pair costs two scans along the lanes: the chunk's forward states,
recomputed from the state saved at its start, and the adjoint ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` (a reverse
scan). Putting N across the lanes there too (as in the forward) was slower (docs/measurements.md): three
sums over N per step.

What is stored for the backward pass: the state at the start of every backward chunk, float32,
(batch, n_saved, dim, N) with n_saved = ceil(L / bwd_block_l), i.e. ``4 * N / bwd_block_l`` bytes per element of
u (0.5 bytes at N = 16, bwd_block_l = 128), besides the inputs themselves.

Gradient reductions: dA, dD and d(delta_bias) are summed over the chunks in registers and written per batch
element (summed over the batch afterwards, deterministically); dB and dC are summed over the program's channels
and then added with float32 atomics into a (batch, G, N, L) buffer, one atomic per element per channel block
(as mamba-ssm does per channel), so their summation order, and their last bits, vary from run to run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..custom_ops import grouped
from .scan_kernels import _selective_scan_bwd_kernel, _selective_scan_fwd_kernel, _selective_scan_fwd_rows_kernel


@dataclass(frozen=True)
class ScanConfig:
    """Launch parameters of the two kernels."""

    block_l: int  # forward: time steps per chunk (power of 2)
    block_d: int  # forward: channels per program (power of 2)
    num_warps: int  # forward
    bwd_block_l: int  # backward: time steps per chunk, the interval of the saved states (multiple of block_l)
    bwd_block_d: int  # backward: channels per program (power of 2)
    bwd_num_warps: int  # backward
    # forward in the backward's layout (time across the lanes, bwd_block_l-step chunks, block_d channels and
    # num_warps per program): for few (batch, channel) rows and long sequences, where the (time, channel, state)
    # tile's 16-step chunks leave most of the GPU idle
    fwd_rows: bool = False


# The forward runs 4 warps, and its tile holds (about) one (channel, state) pair per thread: (128 / N) channels.
_NUM_WARPS = 4
_PAIRS_PER_PROGRAM = _NUM_WARPS * 32
_MAX_BLOCK_L = 16
_MAX_BWD_BLOCK_L = 128
# fewer rows than this over sequences at least this long: the row layout in both passes (a few programs per SM)
_FEW_ROWS = 1024
_LONG = 8192


def default_config(channels_per_group: int, length: int, n_state: int, batch_groups: int = 1) -> ScanConfig:
    """Block sizes for a problem shape; ``batch_groups`` is batch x groups, so that ``channels_per_group *
    batch_groups`` is the number of independent sequences (rows).

    Few rows over long sequences (U-Mamba Enc 3D's first stages: 64 channels x batch 2 over 64^3 to 128^3 steps):
    both passes in the row layout, 1024-step chunks, one channel and 4 warps per program. Otherwise the forward
    takes 16-step chunks, 16 channels per program at N = 16 and 4 warps, the backward 128-step chunks, two
    channels and one warp per program (4 steps per thread): the fastest of sweeps on an H100
    (docs/measurements.md).
    """
    block_n = triton.next_power_of_2(n_state)
    block_l = max(8, min(_MAX_BLOCK_L, triton.next_power_of_2(length)))
    block_d = max(1, min(2 * _PAIRS_PER_PROGRAM // block_n, triton.next_power_of_2(channels_per_group)))
    bwd_block_l = max(block_l, min(_MAX_BWD_BLOCK_L, triton.next_power_of_2(length)))
    if channels_per_group * batch_groups < _FEW_ROWS and length >= _LONG:
        return ScanConfig(block_l=block_l, block_d=1, num_warps=4, bwd_block_l=1024, bwd_block_d=1,
                          bwd_num_warps=4, fwd_rows=True)
    return ScanConfig(block_l=block_l, block_d=block_d, num_warps=_NUM_WARPS, bwd_block_l=bwd_block_l,
                      bwd_block_d=min(2, triton.next_power_of_2(channels_per_group)), bwd_num_warps=1)


def _strides(t: torch.Tensor | None, rank: int) -> tuple[int, ...]:
    return (0,) * rank if t is None else tuple(t.stride())


def n_saved_states(length: int, config: ScanConfig) -> int:
    """How many chunk start states :func:`scan_forward` saves per (batch, channel): one per backward chunk."""
    return (length + config.bwd_block_l - 1) // config.bwd_block_l


def _problem(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, config: ScanConfig) -> tuple:
    """(batch, dim, L, N, grouped B, grouped C, groups, saved states per row) of a scan, ``config`` checked."""
    if not config.fwd_rows and config.bwd_block_l % config.block_l:
        raise ValueError(f"bwd_block_l={config.bwd_block_l} must be a multiple of block_l={config.block_l}: the "
                         f"forward saves a state every bwd_block_l steps")
    batch, dim, length = u.shape
    Bg, Cg = grouped(B), grouped(C)
    return batch, dim, length, A.shape[1], Bg, Cg, Bg.shape[1], n_saved_states(length, config)


def scan_forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                 delta_softplus: bool, save_states: bool, config: ScanConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, last_state, states)``: out in u's dtype, the final state (batch, dim, N) and the chunk start states
    (batch, n_saved_states, dim, N) in float32 (empty unless ``save_states``). A, D, delta_bias must be float32."""
    batch, dim, length, n_state, Bg, Cg, groups, saved = _problem(u, A, B, C, config)
    A = A.contiguous()  # the kernels index it as (dim, N)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = torch.empty(batch, dim, n_state, dtype=torch.float32, device=u.device)
    states = torch.empty((batch, saved, dim, n_state) if save_states else (0,), dtype=torch.float32,
                         device=u.device)
    if u.numel() == 0:
        return out, last.zero_(), states.zero_()
    grid = (triton.cdiv(dim // groups, config.block_d), groups, batch)
    if config.fwd_rows:
        _selective_scan_fwd_rows_kernel[grid](
            u, delta, A, Bg, Cg, A if D is None else D, z, A if delta_bias is None else delta_bias, out, last, states,
            dim, length, dim // groups, saved,
            *u.stride(), *delta.stride(), *Bg.stride(), *Cg.stride(), *_strides(z, 3), *out.stride(),
            N_STATE=n_state, N=triton.next_power_of_2(n_state), HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, SAVE_STATES=save_states,
            BLOCK_D=config.block_d, BLOCK_L=config.bwd_block_l, num_warps=config.num_warps)
        return out, last, states
    _selective_scan_fwd_kernel[grid](
        u, delta, A, Bg, Cg, D, z, delta_bias, out, last, states,
        dim, length, dim // groups, n_state, triton.cdiv(length, config.block_l), saved,
        *u.stride(), *delta.stride(), *Bg.stride(), *Cg.stride(), *_strides(z, 3), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        SAVE_STATES=save_states, SAVE_EVERY=config.bwd_block_l // config.block_l, BLOCK_D=config.block_d,
        BLOCK_N=triton.next_power_of_2(n_state), BLOCK_L=config.block_l, num_warps=config.num_warps)
    return out, last, states


def scan_backward(grad_out: torch.Tensor, grad_last: torch.Tensor | None, u: torch.Tensor, delta: torch.Tensor,
                  A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
                  z: torch.Tensor | None, delta_bias: torch.Tensor | None, states: torch.Tensor,
                  delta_softplus: bool, config: ScanConfig) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` from :func:`scan_forward`'s saved states;
    each in its input's dtype and shape, None where the input is None."""
    batch, dim, length, n_state, Bg, Cg, groups, saved = _problem(u, A, B, C, config)
    A = A.contiguous()  # the kernels index it as (dim, N)
    if states.shape != (batch, saved, dim, n_state):
        raise ValueError(f"saved states {tuple(states.shape)} do not match bwd_block_l={config.bwd_block_l} "
                         f"(expected {(batch, saved, dim, n_state)})")
    grad_u = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    grad_delta = torch.empty(delta.shape, dtype=delta.dtype, device=u.device)
    grad_z = None if z is None else torch.empty(z.shape, dtype=z.dtype, device=u.device)
    partial = dict(dtype=torch.float32, device=u.device)
    grad_A = torch.empty(batch, dim, n_state, **partial)
    grad_D = None if D is None else torch.empty(batch, dim, **partial)
    grad_bias = None if delta_bias is None else torch.empty(batch, dim, **partial)
    grad_B = torch.zeros(batch, groups, n_state, length, **partial)
    grad_C = torch.zeros(batch, groups, n_state, length, **partial)
    if u.numel() > 0:
        grid = (triton.cdiv(dim // groups, config.bwd_block_d), groups, batch)
        _selective_scan_bwd_kernel[grid](
            u, delta, A, Bg, Cg, A if D is None else D, z, A if delta_bias is None else delta_bias, states, grad_out,
            None if grad_last is None else grad_last.contiguous(),
            grad_u, grad_delta, grad_z, grad_A, grad_B, grad_C, grad_D, grad_bias,
            dim, length, dim // groups, saved, groups,
            *u.stride(), *delta.stride(), *Bg.stride(), *Cg.stride(), *_strides(z, 3), *grad_out.stride(),
            N_STATE=n_state, N=triton.next_power_of_2(n_state), HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_DLAST=grad_last is not None,
            BLOCK_D=config.bwd_block_d, BLOCK_L=config.bwd_block_l, num_warps=config.bwd_num_warps)
    else:
        for t in (grad_u, grad_delta, grad_z, grad_A, grad_D, grad_bias):
            if t is not None:
                t.zero_()
    return (grad_u, grad_delta, grad_A.sum(0), grad_B.to(B.dtype).reshape(B.shape),
            grad_C.to(C.dtype).reshape(C.shape), None if D is None else grad_D.sum(0), grad_z,
            None if delta_bias is None else grad_bias.sum(0))
