"""Triton kernels of the selective scan: forward and backward, mamba-ssm's semantics and layouts.

The public entry point is :func:`nnunet_mamba.ops.selective_scan` (``backend="triton"``), which wraps
:func:`scan_forward` and :func:`scan_backward` in autograd-aware ``torch.library`` custom ops; this module only
holds the kernels and their launchers. It imports triton, so :mod:`nnunet_mamba.ops.selective_scan` imports it
lazily: the package works without triton.

Work split: one program per (channel block, group, batch). A program owns ``block_d`` channels of one group of
B/C and keeps their (block_d, N) states in registers, in float32, whatever the input dtype. It walks the sequence
in chunks of ``block_l`` steps; inside a chunk the recurrence ``h_t = a_t h_{t-1} + b_t`` (a = exp(dt A),
b = dt u B) is solved for all (channel, state) pairs at once by ``tl.associative_scan`` over a
(block_l, block_d, N) tile. Time is the tile's first axis on purpose: Triton spreads the last axes over the
lanes, so each thread holds a whole chunk of one (channel, state) pair and the scan is a sequential loop in its
registers; the sums over N (``y = <C, h>``) are the only warp shuffles. Loads and stores of u, delta, z, out and
their gradients are contiguous ``block_l``-long row segments.

What is stored for the backward pass: the state at the start of every chunk, float32, (batch, n_chunks, dim, N)
with n_chunks = ceil(L / block_l), i.e. ``4 * N / block_l`` bytes per element of u (2 bytes at N = 16,
block_l = 32), besides the inputs themselves. The backward pass walks the chunks from last to first, recomputes
the chunk's states from its stored start state, and solves the adjoint recurrence
``g_t = C_t dy_t + a_{t+1} g_{t+1}`` by a scan of the time-reversed tile (reversed in registers: Triton's
``reverse=True`` scans move every element across the warp twice).

Gradient reductions: dA, dD and d(delta_bias) are summed over the chunks in registers and written per batch
element (summed over the batch afterwards, deterministically); dB and dC are summed over the program's channels
and then added with float32 atomics into a (batch, G, N, L) buffer, one atomic per element per channel block
(mamba-ssm adds one per channel), so their summation order, and their last bits, vary from run to run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@dataclass(frozen=True)
class ScanConfig:
    """Launch parameters; ``block_l`` is shared by both passes because it is the interval of the saved states."""

    block_l: int  # time steps per chunk (power of 2)
    block_d: int  # channels per program in the forward pass (power of 2)
    num_warps: int
    bwd_block_d: int  # channels per program in the backward pass (power of 2)
    bwd_num_warps: int


# Programs run 4 warps, and a tile holds (about) one (channel, state) pair per thread: (128 / N) channels.
_NUM_WARPS = 4
_PAIRS_PER_PROGRAM = _NUM_WARPS * 32
_MAX_BLOCK_L = 16


def default_config(channels_per_group: int, length: int, n_state: int) -> ScanConfig:
    """Block sizes for a problem shape: 16-step chunks, 16 channels per program at N = 16, 4 warps.

    The fastest of :func:`nnunet_mamba.ops._scan_bench.triton_tuning_configs` on an H100 (Triton 3.6, fp32,
    N = 16, G = 4), forward + backward: 11.5 ms at (12, 768, 6400) against 13.5 ms for 32-step chunks with 8
    channels, and 2.9 ms against 4.2 ms at (12, 3072, 400); 8 warps and 64-step chunks were slower everywhere
    (the backward kernel is register-bound: ptxas gives it the maximum 255 registers and spills).
    """
    block_n = triton.next_power_of_2(n_state)
    block_l = max(8, min(_MAX_BLOCK_L, triton.next_power_of_2(length)))
    block_d = max(1, min(2 * _PAIRS_PER_PROGRAM // block_n, triton.next_power_of_2(channels_per_group)))
    return ScanConfig(block_l=block_l, block_d=block_d, num_warps=_NUM_WARPS, bwd_block_d=block_d,
                      bwd_num_warps=_NUM_WARPS)


@triton.jit
def _combine_forward(a_early, b_early, a_late, b_late):
    # composition of the affine maps h -> a_early h + b_early, then h -> a_late h + b_late
    return a_early * a_late, a_late * b_early + b_late


@triton.jit
def _combine_adjoint(first_late, rest_late, value_late, first_early, rest_early, value_early):
    # A segment [i..j] of the adjoint recurrence g_t = x_t + a_{t+1} g_{t+1} is (a_i, prod a_{i+1..j}, its g_i
    # from x_i..x_j alone). Keeping a_i apart avoids shifting a by one step inside the tile. The scan runs over
    # the time-reversed tile, so the later segment comes first.
    bridge = rest_early * first_late
    return first_early, bridge * rest_late, value_early + bridge * value_late


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _flip_time(x, LOG2_BLOCK_L: tl.constexpr):
    # x reversed along its first axis (time, 2**LOG2_BLOCK_L long): that axis split into LOG2_BLOCK_L axes of
    # length 2, the two halves of each swapped with an exact integer xor. Time lies in each thread's registers,
    # so this compiles to register moves (tl.flip takes only the last axis before Triton 3.4).
    bits = tl.reshape(x.to(tl.int32, bitcast=True), [2] * LOG2_BLOCK_L + [x.shape[1], x.shape[2]])
    for axis in tl.static_range(LOG2_BLOCK_L):
        bits = bits ^ tl.reduce(bits, axis, _xor, keep_dims=True)
    return tl.reshape(bits, x.shape).to(tl.float32, bitcast=True)


@triton.jit
def _softplus(x):
    # log1p(exp(x)) as torch computes it (identity above 20); log1p(e) = log(w) e / (w - 1), w = 1 + e, is
    # accurate where log(1 + e) alone would round e away
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    exact_one = w == 1.0
    log1p = tl.where(exact_one, e, tl.log(w) * (e / tl.where(exact_one, 1.0, w - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _load_tile(ptr, columns, offs, stride_l, mask):
    # (block_l, columns) tile, time first, of a (..., L) tensor as float32; ``columns`` are each row's offset
    return tl.load(ptr + columns[None, :] + offs[:, None] * stride_l, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _time_step(delta_ptr, delta_columns, offs, stride_delta_l, mask, bias,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    # dt and its pre-softplus value; dt is 0 outside ``mask`` so that padded steps leave the state unchanged
    raw = _load_tile(delta_ptr, delta_columns, offs, stride_delta_l, mask)
    if HAS_BIAS:
        raw += bias[None, :]
    dt = _softplus(raw) if SOFTPLUS else raw
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _selective_scan_fwd_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, states_ptr,
        dim, length, channels_per_group, n_state, n_chunks,
        stride_u_b, stride_u_d, stride_u_l, stride_delta_b, stride_delta_d, stride_delta_l,
        stride_b_b, stride_b_g, stride_b_n, stride_b_l, stride_c_b, stride_c_g, stride_c_n, stride_c_l,
        stride_z_b, stride_z_d, stride_z_l, stride_out_b, stride_out_d, stride_out_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        SAVE_STATES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    # Tiles are (time, channel, state): Triton spreads a tensor's last axes over the lanes first, so each thread
    # holds a whole chunk of one (channel, state) pair and the scan over time runs in registers, without shuffles.
    block, group, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    local = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = local < channels_per_group
    channel = (group * channels_per_group + local).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    mask_n = n < n_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(a_ptr + channel[:, None] * n_state + n[None, :], mask=mask_dn, other=0.0)
    A_log2 = A * 1.4426950408889634  # exp(dt A) = exp2(dt A log2(e)): exp2 is the hardware instruction
    D = tl.load(d_ptr + channel, mask=mask_d, other=0.0) if HAS_D else None
    bias = tl.load(bias_ptr + channel, mask=mask_d, other=0.0) if HAS_BIAS else None
    u_columns = batch * stride_u_b + channel * stride_u_d
    delta_columns = batch * stride_delta_b + channel * stride_delta_d
    z_columns = batch * stride_z_b + channel * stride_z_d
    out_columns = batch * stride_out_b + channel * stride_out_d
    b_columns = batch * stride_b_b + group * stride_b_g + n * stride_b_n
    c_columns = batch * stride_c_b + group * stride_c_g + n * stride_c_n
    state_offsets = channel[:, None] * n_state + n[None, :]
    is_last_step = tl.arange(0, BLOCK_L) == BLOCK_L - 1

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for chunk in range(n_chunks):
        offs = chunk * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = offs < length
        mask = mask_l[:, None] & mask_d[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        if SAVE_STATES:
            tl.store(states_ptr + (batch * n_chunks + chunk) * dim * n_state + state_offsets, h, mask=mask_dn)
        u = _load_tile(u_ptr, u_columns, offs, stride_u_l, mask)
        dt, _ = _time_step(delta_ptr, delta_columns, offs, stride_delta_l, mask, bias, HAS_BIAS, SOFTPLUS)
        Bt = _load_tile(b_ptr, b_columns, offs, stride_b_l, mask_ln)
        Ct = _load_tile(c_ptr, c_columns, offs, stride_c_l, mask_ln)
        decay = tl.exp2(dt[:, :, None] * A_log2[None, :, :])
        inject = (dt * u)[:, :, None] * Bt[:, None, :]
        decay_cum, inject_cum = tl.associative_scan((decay, inject), 0, _combine_forward)
        states = decay_cum * h[None, :, :] + inject_cum
        y = tl.sum(states * Ct[:, None, :], axis=2)
        # padded steps have dt = 0, so the tile's last step is the state at the chunk's last real step
        h = tl.sum(tl.where(is_last_step[:, None, None], states, 0.0), axis=0)
        if HAS_D:
            y += D[None, :] * u
        if HAS_Z:
            z = _load_tile(z_ptr, z_columns, offs, stride_z_l, mask)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + out_columns[None, :] + offs[:, None] * stride_out_l, y.to(out_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(last_ptr + batch * dim * n_state + state_offsets, h, mask=mask_dn)


@triton.jit
def _selective_scan_bwd_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr, dlast_ptr,
        du_ptr, ddelta_ptr, dz_ptr, da_ptr, db_ptr, dc_ptr, dd_ptr, dbias_ptr,
        dim, length, channels_per_group, n_state, n_chunks, groups,
        stride_u_b, stride_u_d, stride_u_l, stride_delta_b, stride_delta_d, stride_delta_l,
        stride_b_b, stride_b_g, stride_b_n, stride_b_l, stride_c_b, stride_c_g, stride_c_n, stride_c_l,
        stride_z_b, stride_z_d, stride_z_l, stride_dout_b, stride_dout_d, stride_dout_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_DLAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
        LOG2_BLOCK_L: tl.constexpr):
    # du, ddelta, dz are contiguous (batch, dim, L); da (batch, dim, N), dd and dbias (batch, dim) are per-batch
    # partial sums; db, dc are zero-initialised float32 (batch, G, N, L) accumulators. Tiles as in the forward.
    block, group, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    local = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = local < channels_per_group
    channel = (group * channels_per_group + local).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    mask_n = n < n_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(a_ptr + channel[:, None] * n_state + n[None, :], mask=mask_dn, other=0.0)
    A_log2 = A * 1.4426950408889634
    D = tl.load(d_ptr + channel, mask=mask_d, other=0.0) if HAS_D else None
    bias = tl.load(bias_ptr + channel, mask=mask_d, other=0.0) if HAS_BIAS else None
    u_columns = batch * stride_u_b + channel * stride_u_d
    delta_columns = batch * stride_delta_b + channel * stride_delta_d
    z_columns = batch * stride_z_b + channel * stride_z_d
    dout_columns = batch * stride_dout_b + channel * stride_dout_d
    grad_columns = (batch * dim + channel) * length  # du, ddelta, dz
    b_columns = batch * stride_b_b + group * stride_b_g + n * stride_b_n
    c_columns = batch * stride_c_b + group * stride_c_g + n * stride_c_n
    bc_grad_columns = ((batch * groups + group) * n_state + n) * length
    state_offsets = channel[:, None] * n_state + n[None, :]
    is_first_step = tl.arange(0, BLOCK_L) == 0

    # adjoint entering the chunk from the right: a_{t+1} g_{t+1} for the chunk's last step t
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + batch * dim * n_state + state_offsets, mask=mask_dn, other=0.0)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    grad_A = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    grad_D = tl.zeros((BLOCK_D,), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step
        offs = chunk * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = offs < length
        mask = mask_l[:, None] & mask_d[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        u = _load_tile(u_ptr, u_columns, offs, stride_u_l, mask)
        dt, raw = _time_step(delta_ptr, delta_columns, offs, stride_delta_l, mask, bias, HAS_BIAS, SOFTPLUS)
        Bt = _load_tile(b_ptr, b_columns, offs, stride_b_l, mask_ln)
        Ct = _load_tile(c_ptr, c_columns, offs, stride_c_l, mask_ln)
        dout = _load_tile(dout_ptr, dout_columns, offs, stride_dout_l, mask)
        h0 = tl.load(states_ptr + (batch * n_chunks + chunk) * dim * n_state + state_offsets, mask=mask_dn,
                     other=0.0)

        # the chunk's forward states, recomputed from its saved start state
        dtu = dt * u
        decay = tl.exp2(dt[:, :, None] * A_log2[None, :, :])
        inject = dtu[:, :, None] * Bt[:, None, :]
        decay_cum, inject_cum = tl.associative_scan((decay, inject), 0, _combine_forward)
        states = decay_cum * h0[None, :, :] + inject_cum

        grad_pointers = grad_columns[None, :] + offs[:, None]
        if HAS_Z:
            z = _load_tile(z_ptr, z_columns, offs, stride_z_l, mask)
            gate_sigmoid = tl.sigmoid(z)
            y = tl.sum(states * Ct[:, None, :], axis=2)
            if HAS_D:
                y += D[None, :] * u
            grad_z = dout * y * gate_sigmoid * (1.0 + z * (1.0 - gate_sigmoid))
            tl.store(dz_ptr + grad_pointers, grad_z.to(dz_ptr.dtype.element_ty), mask=mask)
            grad_y = dout * z * gate_sigmoid
        else:
            grad_y = dout

        # B and C are shared by the group's channels: sum this block's channels, then one atomic per element.
        # dC first, and h_t - b_t = a_t h_{t-1} right after, so that the states need no register past this point.
        bc_pointers = bc_grad_columns[None, :] + offs[:, None]
        tl.atomic_add(dc_ptr + bc_pointers, tl.sum(grad_y[:, :, None] * states, axis=1), mask=mask_ln,
                      sem="relaxed")
        decayed_previous = states - inject

        # adjoint g_t = dL/dh_t: within the chunk by the reverse scan, plus the carry decayed to step t
        # (a forward scan of the time-reversed tile: reverse=True would shuffle every element across the warp)
        source = grad_y[:, :, None] * Ct[:, None, :]
        _, decay_after, adjoint = tl.associative_scan(
            (_flip_time(decay, LOG2_BLOCK_L), tl.full(source.shape, 1.0, tl.float32),
             _flip_time(source, LOG2_BLOCK_L)), 0, _combine_adjoint)
        adjoint = _flip_time(adjoint, LOG2_BLOCK_L) + _flip_time(decay_after, LOG2_BLOCK_L) * carry[None, :, :]
        carry = tl.sum(tl.where(is_first_step[:, None, None], decay * adjoint, 0.0), axis=0)
        tl.atomic_add(db_ptr + bc_pointers, tl.sum(adjoint * dtu[:, :, None], axis=1), mask=mask_ln,
                      sem="relaxed")

        grad_dtu = tl.sum(adjoint * Bt[:, None, :], axis=2)
        # dL/d(dt A) = g_t a_t h_{t-1}: a_t h_{t-1} = h_t - b_t needs no states shifted by one step
        grad_decay_exponent = adjoint * decayed_previous
        grad_A += tl.sum(grad_decay_exponent * dt[:, :, None], axis=0)
        grad_dt = grad_dtu * u + tl.sum(grad_decay_exponent * A[None, :, :], axis=2)
        grad_u = grad_dtu * dt
        if HAS_D:
            grad_u += grad_y * D[None, :]
            grad_D += tl.sum(grad_y * u, axis=0)
        if SOFTPLUS:
            grad_dt *= tl.sigmoid(raw)
        grad_dt = tl.where(mask, grad_dt, 0.0)
        if HAS_BIAS:
            grad_bias += tl.sum(grad_dt, axis=0)
        tl.store(du_ptr + grad_pointers, grad_u.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + grad_pointers, grad_dt.to(ddelta_ptr.dtype.element_ty), mask=mask)

    tl.store(da_ptr + batch * dim * n_state + state_offsets, grad_A, mask=mask_dn)
    if HAS_D:
        tl.store(dd_ptr + batch * dim + channel, grad_D, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + batch * dim + channel, grad_bias, mask=mask_d)


INTERPRETED = isinstance(_selective_scan_fwd_kernel, InterpretedFunction)
"""Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when this module was imported): on CPU
tensors too, slowly."""


def _grouped(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 3 else t


def _strides(t: Optional[torch.Tensor], rank: int) -> Tuple[int, ...]:
    return (0,) * rank if t is None else tuple(t.stride())


def n_chunks(length: int, config: ScanConfig) -> int:
    """How many chunk start states :func:`scan_forward` saves per (batch, channel)."""
    return (length + config.block_l - 1) // config.block_l


def scan_forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                 delta_softplus: bool, save_states: bool, config: ScanConfig
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, last_state, states)``: out in u's dtype, the final state (batch, dim, N) and the chunk start states
    (batch, n_chunks, dim, N) in float32 (empty unless ``save_states``). A, D, delta_bias must be float32."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    groups = Bg.shape[1]
    chunks = n_chunks(length, config)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = torch.empty(batch, dim, n_state, dtype=torch.float32, device=u.device)
    states = torch.empty((batch, chunks, dim, n_state) if save_states else (0,), dtype=torch.float32,
                         device=u.device)
    if u.numel() == 0:
        return out, last.zero_(), states.zero_()
    grid = (triton.cdiv(dim // groups, config.block_d), groups, batch)
    _selective_scan_fwd_kernel[grid](
        u, delta, A.contiguous(), Bg, Cg, D, z, delta_bias, out, last, states,
        dim, length, dim // groups, n_state, chunks,
        *u.stride(), *delta.stride(), *Bg.stride(), *Cg.stride(), *_strides(z, 3), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        SAVE_STATES=save_states, BLOCK_D=config.block_d, BLOCK_N=triton.next_power_of_2(n_state),
        BLOCK_L=config.block_l, num_warps=config.num_warps)
    return out, last, states


def scan_backward(grad_out: torch.Tensor, grad_last: Optional[torch.Tensor], u: torch.Tensor, delta: torch.Tensor,
                  A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                  z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], states: torch.Tensor,
                  delta_softplus: bool, config: ScanConfig) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` from :func:`scan_forward`'s saved states;
    each in its input's dtype and shape, None where the input is None."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    groups = Bg.shape[1]
    chunks = n_chunks(length, config)
    if states.shape != (batch, chunks, dim, n_state):
        raise ValueError(f"saved states {tuple(states.shape)} do not match block_l={config.block_l} "
                         f"(expected {(batch, chunks, dim, n_state)})")
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
            u, delta, A.contiguous(), Bg, Cg, D, z, delta_bias, states, grad_out,
            None if grad_last is None else grad_last.contiguous(),
            grad_u, grad_delta, grad_z, grad_A, grad_B, grad_C, grad_D, grad_bias,
            dim, length, dim // groups, n_state, chunks, groups,
            *u.stride(), *delta.stride(), *Bg.stride(), *Cg.stride(), *_strides(z, 3), *grad_out.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_DLAST=grad_last is not None, BLOCK_D=config.bwd_block_d, BLOCK_N=triton.next_power_of_2(n_state),
            BLOCK_L=config.block_l, LOG2_BLOCK_L=config.block_l.bit_length() - 1, num_warps=config.bwd_num_warps)
    else:
        for t in (grad_u, grad_delta, grad_z, grad_A, grad_D, grad_bias):
            if t is not None:
                t.zero_()
    return (grad_u, grad_delta, grad_A.sum(0), grad_B.to(B.dtype).reshape(B.shape),
            grad_C.to(C.dtype).reshape(C.shape), None if D is None else grad_D.sum(0), grad_z,
            None if delta_bias is None else grad_bias.sum(0))
