"""The Triton kernels of the selective scan (launched by :mod:`nnunet_mamba.ops.triton.scan`); the layouts and
why are described there."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import combine_linear, load_f32, time_step


@triton.jit
def _program_channels(channels_per_group, BLOCK_D: tl.constexpr):
    # (group, batch, channel indices, channel mask) of this program: BLOCK_D channels of one group of one batch
    # element; int64 channels, as channel * stride passes 2**31 in large maps
    block, group, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    local = block * BLOCK_D + tl.arange(0, BLOCK_D)
    return group, batch, (group * channels_per_group + local).to(tl.int64), local < channels_per_group


@triton.jit
def _row_starts(batch, channel, stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_z_b, stride_z_d,
                stride_out_b, stride_out_d):
    # offsets of the program's channels in u, delta, z and the output (or its gradient)
    return (batch * stride_u_b + channel * stride_u_d, batch * stride_delta_b + channel * stride_delta_d,
            batch * stride_z_b + channel * stride_z_d, batch * stride_out_b + channel * stride_out_d)


@triton.jit
def _row_program(a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, channels_per_group, stride_u_b, stride_u_d, stride_delta_b,
                 stride_delta_d, stride_z_b, stride_z_d, stride_out_b, stride_out_d, stride_b_b, stride_b_g,
                 stride_c_b, stride_c_g, N_STATE: tl.constexpr, N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Setup of the kernels in the row layout ((channel, time) tiles, the states one after the other): the
    # program's channels, its D and delta_bias (an absent one comes as A's pointer, read but unused), its rows of
    # u, delta, z and the output (or its gradient), its group's B and C, and its (channel, state) offsets and mask.
    group, batch, channel, mask_d = _program_channels(channels_per_group, BLOCK_D)
    n_index = tl.arange(0, N)
    D = tl.load(d_ptr + channel, mask=mask_d, other=0.0)
    bias = tl.load(bias_ptr + channel, mask=mask_d, other=0.0)
    u_rows, delta_rows, z_rows, out_rows = _row_starts(batch, channel, stride_u_b, stride_u_d, stride_delta_b,
                                                       stride_delta_d, stride_z_b, stride_z_d, stride_out_b,
                                                       stride_out_d)
    return (group, batch, channel, mask_d, n_index, D, bias, u_rows, delta_rows, z_rows, out_rows,
            b_ptr + batch * stride_b_b + group * stride_b_g, c_ptr + batch * stride_c_b + group * stride_c_g,
            channel[:, None] * N_STATE + n_index[None, :], mask_d[:, None] & (n_index < N_STATE)[None, :])


@triton.jit
def _row_chunk(u_ptr, delta_ptr, u_rows, delta_rows, offs, mask, stride_u_l, stride_delta_l, bias,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    # one chunk of the row layout: u, delta + delta_bias (before the softplus) and dt, (channel, time) tiles
    u = load_f32(u_ptr + u_rows[:, None] + offs[None, :] * stride_u_l, mask)
    raw = load_f32(delta_ptr + delta_rows[:, None] + offs[None, :] * stride_delta_l, mask)
    if HAS_BIAS:
        raw += bias[:, None]
    return u, raw, time_step(raw, mask, SOFTPLUS)


@triton.jit
def _combine_adjoint(first_late, rest_late, value_late, first_early, rest_early, value_early):
    # A segment [i..j] of the adjoint recurrence g_t = x_t + a_{t+1} g_{t+1} is (a_i, prod a_{i+1..j}, its g_i
    # from x_i..x_j alone). Keeping a_i apart avoids shifting a by one step inside the tile. The scan runs in
    # reverse, so the later segment comes first.
    bridge = rest_early * first_late
    return first_early, bridge * rest_late, value_early + bridge * value_late


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
    group, batch, channel, mask_d = _program_channels(channels_per_group, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mask_n = n < n_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(a_ptr + channel[:, None] * n_state + n[None, :], mask=mask_dn, other=0.0)
    A_log2 = A * 1.4426950408889634  # exp(dt A) = exp2(dt A log2(e)): exp2 is the hardware instruction
    D = tl.load(d_ptr + channel, mask=mask_d, other=0.0) if HAS_D else None
    bias = tl.load(bias_ptr + channel, mask=mask_d, other=0.0) if HAS_BIAS else None
    u_columns, delta_columns, z_columns, out_columns = _row_starts(
        batch, channel, stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_z_b, stride_z_d,
        stride_out_b, stride_out_d)
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
        u = load_f32(u_ptr + u_columns[None, :] + offs[:, None] * stride_u_l, mask)
        raw = load_f32(delta_ptr + delta_columns[None, :] + offs[:, None] * stride_delta_l, mask)
        if HAS_BIAS:
            raw += bias[None, :]
        dt = time_step(raw, mask, SOFTPLUS)
        Bt = load_f32(b_ptr + b_columns[None, :] + offs[:, None] * stride_b_l, mask_ln)
        Ct = load_f32(c_ptr + c_columns[None, :] + offs[:, None] * stride_c_l, mask_ln)
        decay = tl.exp2(dt[:, :, None] * A_log2[None, :, :])
        inject = (dt * u)[:, :, None] * Bt[:, None, :]
        decay_cum, inject_cum = tl.associative_scan((decay, inject), 0, combine_linear)
        states = decay_cum * h[None, :, :] + inject_cum
        y = tl.sum(states * Ct[:, None, :], axis=2)
        # padded steps have dt = 0, so the tile's last step is the state at the chunk's last real step
        h = tl.sum(tl.where(is_last_step[:, None, None], states, 0.0), axis=0)
        if HAS_D:
            y += D[None, :] * u
        if HAS_Z:
            z = load_f32(z_ptr + z_columns[None, :] + offs[:, None] * stride_z_l, mask)
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
    is_last = tl.arange(0, BLOCK_L) == BLOCK_L - 1
    (group, batch, channel, mask_d, n_index, D, bias, u_rows, delta_rows, z_rows, out_rows, b_base, c_base,
     state_offsets, mask_dn) = _row_program(
        a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, channels_per_group, stride_u_b, stride_u_d, stride_delta_b,
        stride_delta_d, stride_z_b, stride_z_d, stride_out_b, stride_out_d, stride_b_b, stride_b_g, stride_c_b,
        stride_c_g, N_STATE, N, BLOCK_D)

    h = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    for chunk in range(n_chunks):
        offs = chunk * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = offs < length
        mask = mask_d[:, None] & mask_l[None, :]
        if SAVE_STATES:
            tl.store(states_ptr + (batch * n_chunks + chunk) * dim * N_STATE + state_offsets, h, mask=mask_dn)
        u, raw, dt = _row_chunk(u_ptr, delta_ptr, u_rows, delta_rows, offs, mask, stride_u_l, stride_delta_l, bias,
                                HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        y = D[:, None] * u if HAS_D else tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for n in range(N_STATE):
            A_n = tl.load(a_ptr + channel * N_STATE + n, mask=mask_d, other=0.0)
            B_n = tl.load(b_base + n * stride_b_n + offs * stride_b_l, mask=mask_l, other=0.0).to(tl.float32)
            C_n = tl.load(c_base + n * stride_c_n + offs * stride_c_l, mask=mask_l, other=0.0).to(tl.float32)
            decay = tl.exp2(dt * (A_n * 1.4426950408889634)[:, None])
            decay_cum, inject_cum = tl.associative_scan((decay, dtu * B_n[None, :]), 1, combine_linear)
            states = decay_cum * _state_column(h, n_index, n)[:, None] + inject_cum
            y += states * C_n[None, :]
            # padded steps have dt = 0, so the tile's last step holds the chunk's last real state
            h_n = tl.sum(tl.where(is_last[None, :], states, 0.0), axis=1)
            h = tl.where(n_index[None, :] == n, h_n[:, None], h)
        if HAS_Z:
            z = load_f32(z_ptr + z_rows[:, None] + offs[None, :] * stride_z_l, mask)
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
    is_first = tl.arange(0, BLOCK_L) == 0
    (group, batch, channel, mask_d, n_index, D, bias, u_rows, delta_rows, z_rows, dout_rows, b_base, c_base,
     state_offsets, mask_dn) = _row_program(
        a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, channels_per_group, stride_u_b, stride_u_d, stride_delta_b,
        stride_delta_d, stride_z_b, stride_z_d, stride_dout_b, stride_dout_d, stride_b_b, stride_b_g, stride_c_b,
        stride_c_g, N_STATE, N, BLOCK_D)
    grad_rows = (batch * dim + channel) * length  # du, ddelta, dz
    bc_grad_base = (batch * groups + group) * N_STATE * length  # db, dc: (batch, G, N, L) float32

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
        u, raw, dt = _row_chunk(u_ptr, delta_ptr, u_rows, delta_rows, offs, mask, stride_u_l, stride_delta_l, bias,
                                HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        dout = load_f32(dout_ptr + dout_rows[:, None] + offs[None, :] * stride_dout_l, mask)
        if HAS_Z:
            z = load_f32(z_ptr + z_rows[:, None] + offs[None, :] * stride_z_l, mask)
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
            decay_cum, inject_cum = tl.associative_scan((decay, inject), 1, combine_linear)
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
