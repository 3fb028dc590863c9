"""Triton kernels of the selective scan: forward and backward, mamba-ssm's semantics and layouts.

The public entry point is :func:`nnunet_mamba.ops.selective_scan` (``backend="triton"``), which wraps
:func:`scan_forward` and :func:`scan_backward` in autograd-aware ``torch.library`` custom ops; this module only
holds the kernels and their launchers. It imports triton, so :mod:`nnunet_mamba.ops.selective_scan` imports it
lazily: the package works without triton.

The two passes split the work differently, each the faster of the two layouts we measured for it (H100,
``nnunet-mamba benchmark --kernels``; figures in :func:`default_config`).

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
scan). Putting N across the lanes there too (as in the forward) made forward + backward 1.8x slower: three
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
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


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
    both passes in the row layout, 1024-step chunks, one channel and 4 warps per program. Forward + backward on an
    H100 at (2, 64, 262144): 14.2 ms, against 24.1 ms with 512-step chunks, 44.6 ms with 256 and 2 warps, 37.8 ms
    with the tile forward and 68.4 ms with the configuration below (mamba-ssm: 9.3 ms); at (2, 128, 32768): 2.39
    ms against 3.60 ms with 512-step chunks (mamba-ssm: 1.59 ms).

    Forward: 16-step chunks, 16 channels per program at N = 16, 4 warps: the fastest of a sweep on an H100
    (Triton 3.6, fp32, N = 16, G = 4; 32- and 64-step chunks and 8 warps were slower). Backward: 128-step
    chunks, two channels and one warp per program (4 steps per thread). Forward + backward at (12, 768, 6400):
    6.40 ms, against 7.72 ms with one channel, 8.35 / 11.75 ms with 64 / 32-step chunks, 10.27 ms with 2 warps and
    11.8 ms for the forward's layout in the backward too (9.28 ms for mamba-ssm's kernel in the same run).
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


@triton.jit
def _combine_forward(a_early, b_early, a_late, b_late):
    # composition of the affine maps h -> a_early h + b_early, then h -> a_late h + b_late
    return a_early * a_late, a_late * b_early + b_late


@triton.jit
def _combine_adjoint(first_late, rest_late, value_late, first_early, rest_early, value_early):
    # A segment [i..j] of the adjoint recurrence g_t = x_t + a_{t+1} g_{t+1} is (a_i, prod a_{i+1..j}, its g_i
    # from x_i..x_j alone). Keeping a_i apart avoids shifting a by one step inside the tile. The scan runs in
    # reverse, so the later segment comes first.
    bridge = rest_early * first_late
    return first_early, bridge * rest_late, value_early + bridge * value_late


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
def _load_f32(pointers, mask):
    return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _time_step(raw, mask, SOFTPLUS: tl.constexpr):
    # dt from delta (+ bias); 0 outside ``mask`` so that padded steps leave the state unchanged
    dt = _softplus(raw) if SOFTPLUS else raw
    return tl.where(mask, dt, 0.0)


@triton.jit
def _selective_scan_fwd_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, states_ptr,
        dim, length, channels_per_group, n_state, n_chunks, n_saved,
        stride_u_b, stride_u_d, stride_u_l, stride_delta_b, stride_delta_d, stride_delta_l,
        stride_b_b, stride_b_g, stride_b_n, stride_b_l, stride_c_b, stride_c_g, stride_c_n, stride_c_l,
        stride_z_b, stride_z_d, stride_z_l, stride_out_b, stride_out_d, stride_out_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        SAVE_STATES: tl.constexpr, SAVE_EVERY: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_L: tl.constexpr):
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
        if SAVE_STATES:  # at the start of every backward chunk, SAVE_EVERY forward chunks long
            if chunk % SAVE_EVERY == 0:
                tl.store(states_ptr + (batch * n_saved + chunk // SAVE_EVERY) * dim * n_state + state_offsets, h,
                         mask=mask_dn)
        u = _load_f32(u_ptr + u_columns[None, :] + offs[:, None] * stride_u_l, mask)
        raw = _load_f32(delta_ptr + delta_columns[None, :] + offs[:, None] * stride_delta_l, mask)
        if HAS_BIAS:
            raw += bias[None, :]
        dt = _time_step(raw, mask, SOFTPLUS)
        Bt = _load_f32(b_ptr + b_columns[None, :] + offs[:, None] * stride_b_l, mask_ln)
        Ct = _load_f32(c_ptr + c_columns[None, :] + offs[:, None] * stride_c_l, mask_ln)
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
            z = _load_f32(z_ptr + z_columns[None, :] + offs[:, None] * stride_z_l, mask)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + out_columns[None, :] + offs[:, None] * stride_out_l, y.to(out_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(last_ptr + batch * dim * n_state + state_offsets, h, mask=mask_dn)


@triton.jit
def _selective_scan_fwd_rows_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, states_ptr,
        dim, length, channels_per_group, n_chunks,
        stride_u_b, stride_u_d, stride_u_l, stride_delta_b, stride_delta_d, stride_delta_l,
        stride_b_b, stride_b_g, stride_b_n, stride_b_l, stride_c_b, stride_c_g, stride_c_n, stride_c_l,
        stride_z_b, stride_z_d, stride_z_l, stride_out_b, stride_out_d, stride_out_l,
        N_STATE: tl.constexpr, N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    # The forward in the backward kernel's layout: (channel, time) tiles, time across the lanes, the states one
    # after the other; a state is saved at the start of every chunk.
    block, group, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    local = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = local < channels_per_group
    channel = (group * channels_per_group + local).to(tl.int64)
    n_index = tl.arange(0, N)
    D = tl.load(d_ptr + channel, mask=mask_d, other=0.0) if HAS_D else None
    bias = tl.load(bias_ptr + channel, mask=mask_d, other=0.0) if HAS_BIAS else None
    u_rows = batch * stride_u_b + channel * stride_u_d
    delta_rows = batch * stride_delta_b + channel * stride_delta_d
    z_rows = batch * stride_z_b + channel * stride_z_d
    out_rows = batch * stride_out_b + channel * stride_out_d
    b_base = b_ptr + batch * stride_b_b + group * stride_b_g
    c_base = c_ptr + batch * stride_c_b + group * stride_c_g
    state_offsets = channel[:, None] * N_STATE + n_index[None, :]
    mask_dn = mask_d[:, None] & (n_index < N_STATE)[None, :]
    is_last = tl.arange(0, BLOCK_L) == BLOCK_L - 1

    h = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    for chunk in range(n_chunks):
        offs = chunk * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = offs < length
        mask = mask_d[:, None] & mask_l[None, :]
        if SAVE_STATES:
            tl.store(states_ptr + (batch * n_chunks + chunk) * dim * N_STATE + state_offsets, h, mask=mask_dn)
        u = _load_f32(u_ptr + u_rows[:, None] + offs[None, :] * stride_u_l, mask)
        raw = _load_f32(delta_ptr + delta_rows[:, None] + offs[None, :] * stride_delta_l, mask)
        if HAS_BIAS:
            raw += bias[:, None]
        dt = _time_step(raw, mask, SOFTPLUS)
        dtu = dt * u
        y = D[:, None] * u if HAS_D else tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for n in range(N_STATE):
            A_n = tl.load(a_ptr + channel * N_STATE + n, mask=mask_d, other=0.0)
            B_n = tl.load(b_base + n * stride_b_n + offs * stride_b_l, mask=mask_l, other=0.0).to(tl.float32)
            C_n = tl.load(c_base + n * stride_c_n + offs * stride_c_l, mask=mask_l, other=0.0).to(tl.float32)
            decay = tl.exp2(dt * (A_n * 1.4426950408889634)[:, None])
            decay_cum, inject_cum = tl.associative_scan((decay, dtu * B_n[None, :]), 1, _combine_forward)
            states = decay_cum * _state_column(h, n_index, n)[:, None] + inject_cum
            y += states * C_n[None, :]
            # padded steps have dt = 0, so the tile's last step holds the chunk's last real state
            h_n = tl.sum(tl.where(is_last[None, :], states, 0.0), axis=1)
            h = tl.where(n_index[None, :] == n, h_n[:, None], h)
        if HAS_Z:
            z = _load_f32(z_ptr + z_rows[:, None] + offs[None, :] * stride_z_l, mask)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + out_rows[:, None] + offs[None, :] * stride_out_l, y.to(out_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(last_ptr + batch * dim * N_STATE + state_offsets, h, mask=mask_dn)


@triton.jit
def _selective_scan_bwd_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr, dlast_ptr,
        du_ptr, ddelta_ptr, dz_ptr, da_ptr, db_ptr, dc_ptr, dd_ptr, dbias_ptr,
        dim, length, channels_per_group, n_chunks, groups,
        stride_u_b, stride_u_d, stride_u_l, stride_delta_b, stride_delta_d, stride_delta_l,
        stride_b_b, stride_b_g, stride_b_n, stride_b_l, stride_c_b, stride_c_g, stride_c_n, stride_c_l,
        stride_z_b, stride_z_d, stride_z_l, stride_dout_b, stride_dout_d, stride_dout_l,
        N_STATE: tl.constexpr, N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    # du, ddelta, dz are contiguous (batch, dim, L); da (batch, dim, N), dd and dbias (batch, dim) are per-batch
    # partial sums; db, dc are zero-initialised float32 (batch, G, N, L) accumulators. Tiles are (channel, time).
    block, group, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    local = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = local < channels_per_group
    channel = (group * channels_per_group + local).to(tl.int64)
    n_index = tl.arange(0, N)
    D = tl.load(d_ptr + channel, mask=mask_d, other=0.0) if HAS_D else None
    bias = tl.load(bias_ptr + channel, mask=mask_d, other=0.0) if HAS_BIAS else None
    u_rows = batch * stride_u_b + channel * stride_u_d
    delta_rows = batch * stride_delta_b + channel * stride_delta_d
    z_rows = batch * stride_z_b + channel * stride_z_d
    dout_rows = batch * stride_dout_b + channel * stride_dout_d
    grad_rows = (batch * dim + channel) * length  # du, ddelta, dz
    b_base = b_ptr + batch * stride_b_b + group * stride_b_g
    c_base = c_ptr + batch * stride_c_b + group * stride_c_g
    bc_grad_base = (batch * groups + group) * N_STATE * length  # db, dc: (batch, G, N, L) float32
    state_offsets = channel[:, None] * N_STATE + n_index[None, :]
    mask_dn = mask_d[:, None] & (n_index < N_STATE)[None, :]
    is_first = tl.arange(0, BLOCK_L) == 0

    # carry: a_{t+1} g_{t+1} entering the chunk's last step t from the right, per state
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + batch * dim * N_STATE + state_offsets, mask=mask_dn, other=0.0)
    else:
        carry = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    grad_A = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    grad_D = tl.zeros((BLOCK_D,), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step
        offs = chunk * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = offs < length
        mask = mask_d[:, None] & mask_l[None, :]
        u = _load_f32(u_ptr + u_rows[:, None] + offs[None, :] * stride_u_l, mask)
        raw = _load_f32(delta_ptr + delta_rows[:, None] + offs[None, :] * stride_delta_l, mask)
        if HAS_BIAS:
            raw += bias[:, None]
        dt = _time_step(raw, mask, SOFTPLUS)
        dtu = dt * u
        dout = _load_f32(dout_ptr + dout_rows[:, None] + offs[None, :] * stride_dout_l, mask)
        if HAS_Z:
            z = _load_f32(z_ptr + z_rows[:, None] + offs[None, :] * stride_z_l, mask)
            gate_sigmoid = tl.sigmoid(z)
            grad_y = dout * z * gate_sigmoid
            y = D[:, None] * u if HAS_D else tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        else:
            grad_y = dout
        h0_pointers = states_ptr + (batch * n_chunks + chunk) * dim * N_STATE + channel * N_STATE
        grad_dtu = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        grad_exponent_A = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)  # sum_n dL/d(dt A_n) A_n
        for n in range(N_STATE):  # a loop, not unrolled: 16 unrolled states took 20-40 s to compile
            A_n = tl.load(a_ptr + channel * N_STATE + n, mask=mask_d, other=0.0)
            B_n = tl.load(b_base + n * stride_b_n + offs * stride_b_l, mask=mask_l, other=0.0).to(tl.float32)
            C_n = tl.load(c_base + n * stride_c_n + offs * stride_c_l, mask=mask_l, other=0.0).to(tl.float32)
            # the chunk's forward states of state n, recomputed from its saved start state
            decay = tl.exp2(dt * (A_n * 1.4426950408889634)[:, None])
            inject = dtu * B_n[None, :]
            decay_cum, inject_cum = tl.associative_scan((decay, inject), 1, _combine_forward)
            states = decay_cum * tl.load(h0_pointers + n, mask=mask_d, other=0.0)[:, None] + inject_cum
            if HAS_Z:
                y += states * C_n[None, :]
            bc_offsets = bc_grad_base + n * length + offs
            tl.atomic_add(dc_ptr + bc_offsets, tl.sum(grad_y * states, axis=0), mask=mask_l, sem="relaxed")
            # adjoint g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}: a reverse scan within the chunk, plus the carry
            _, decay_after, adjoint = tl.associative_scan(
                (decay, tl.full(decay.shape, 1.0, tl.float32), grad_y * C_n[None, :]), 1, _combine_adjoint,
                reverse=True)
            adjoint += decay_after * _state_column(carry, n_index, n)[:, None]
            tl.atomic_add(db_ptr + bc_offsets, tl.sum(adjoint * dtu, axis=0), mask=mask_l, sem="relaxed")
            grad_dtu += adjoint * B_n[None, :]
            # dL/d(dt A) = g_t a_t h_{t-1}, and a_t h_{t-1} = h_t - b_t
            grad_exponent = adjoint * (states - inject)
            grad_exponent_A += grad_exponent * A_n[:, None]
            carry_n, grad_A_n = tl.reduce((tl.where(is_first[None, :], decay * adjoint, 0.0), grad_exponent * dt),
                                          1, _add_pair)
            carry = tl.where(n_index[None, :] == n, carry_n[:, None], carry)
            grad_A += tl.where(n_index[None, :] == n, grad_A_n[:, None], 0.0)
        grad_pointers = grad_rows[:, None] + offs[None, :]
        if HAS_Z:
            grad_z = dout * y * gate_sigmoid * (1.0 + z * (1.0 - gate_sigmoid))
            tl.store(dz_ptr + grad_pointers, grad_z.to(dz_ptr.dtype.element_ty), mask=mask)
        grad_dt = grad_dtu * u + grad_exponent_A
        grad_u = grad_dtu * dt
        if HAS_D:
            grad_u += grad_y * D[:, None]
            grad_D += tl.sum(grad_y * u, axis=1)
        if SOFTPLUS:
            grad_dt *= tl.sigmoid(raw)
        grad_dt = tl.where(mask, grad_dt, 0.0)
        if HAS_BIAS:
            grad_bias += tl.sum(grad_dt, axis=1)
        tl.store(du_ptr + grad_pointers, grad_u.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + grad_pointers, grad_dt.to(ddelta_ptr.dtype.element_ty), mask=mask)

    tl.store(da_ptr + batch * dim * N_STATE + state_offsets, grad_A, mask=mask_dn)
    if HAS_D:
        tl.store(dd_ptr + batch * dim + channel, grad_D, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + batch * dim + channel, grad_bias, mask=mask_d)


@triton.jit
def _state_column(h, n_index, n):
    # column n of a (block_d, N) tensor
    return tl.sum(tl.where(n_index[None, :] == n, h, 0.0), axis=1)


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


INTERPRETED = isinstance(_selective_scan_fwd_kernel, InterpretedFunction)
"""Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when this module was imported): on CPU
tensors too, slowly."""


def _grouped(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 3 else t


def _strides(t: Optional[torch.Tensor], rank: int) -> Tuple[int, ...]:
    return (0,) * rank if t is None else tuple(t.stride())


def n_saved_states(length: int, config: ScanConfig) -> int:
    """How many chunk start states :func:`scan_forward` saves per (batch, channel): one per backward chunk."""
    return (length + config.bwd_block_l - 1) // config.bwd_block_l


def _check_config(config: ScanConfig) -> None:
    if not config.fwd_rows and config.bwd_block_l % config.block_l:
        raise ValueError(f"bwd_block_l={config.bwd_block_l} must be a multiple of block_l={config.block_l}: the "
                         f"forward saves a state every bwd_block_l steps")


def scan_forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                 delta_softplus: bool, save_states: bool, config: ScanConfig
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, last_state, states)``: out in u's dtype, the final state (batch, dim, N) and the chunk start states
    (batch, n_saved_states, dim, N) in float32 (empty unless ``save_states``). A, D, delta_bias must be float32."""
    _check_config(config)
    batch, dim, length = u.shape
    n_state = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    groups = Bg.shape[1]
    saved = n_saved_states(length, config)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = torch.empty(batch, dim, n_state, dtype=torch.float32, device=u.device)
    states = torch.empty((batch, saved, dim, n_state) if save_states else (0,), dtype=torch.float32,
                         device=u.device)
    if u.numel() == 0:
        return out, last.zero_(), states.zero_()
    grid = (triton.cdiv(dim // groups, config.block_d), groups, batch)
    if config.fwd_rows:
        _selective_scan_fwd_rows_kernel[grid](
            u, delta, A.contiguous(), Bg, Cg, D, z, delta_bias, out, last, states, dim, length, dim // groups, saved,
            *u.stride(), *delta.stride(), *Bg.stride(), *Cg.stride(), *_strides(z, 3), *out.stride(),
            N_STATE=n_state, N=triton.next_power_of_2(n_state), HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, SAVE_STATES=save_states,
            BLOCK_D=config.block_d, BLOCK_L=config.bwd_block_l, num_warps=config.num_warps)
        return out, last, states
    _selective_scan_fwd_kernel[grid](
        u, delta, A.contiguous(), Bg, Cg, D, z, delta_bias, out, last, states,
        dim, length, dim // groups, n_state, triton.cdiv(length, config.block_l), saved,
        *u.stride(), *delta.stride(), *Bg.stride(), *Cg.stride(), *_strides(z, 3), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        SAVE_STATES=save_states, SAVE_EVERY=config.bwd_block_l // config.block_l, BLOCK_D=config.block_d,
        BLOCK_N=triton.next_power_of_2(n_state), BLOCK_L=config.block_l, num_warps=config.num_warps)
    return out, last, states


def scan_backward(grad_out: torch.Tensor, grad_last: Optional[torch.Tensor], u: torch.Tensor, delta: torch.Tensor,
                  A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                  z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], states: torch.Tensor,
                  delta_softplus: bool, config: ScanConfig) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` from :func:`scan_forward`'s saved states;
    each in its input's dtype and shape, None where the input is None."""
    _check_config(config)
    batch, dim, length = u.shape
    n_state = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    groups = Bg.shape[1]
    saved = n_saved_states(length, config)
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
            u, delta, A.contiguous(), Bg, Cg, D, z, delta_bias, states, grad_out,
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
