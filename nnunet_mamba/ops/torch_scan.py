"""The ``torch`` backend of the selective scan: pure PyTorch on any device, and the step-by-step reference.

The sequence is cut into chunks; inside a chunk the linear recurrence is solved by a log-depth (Hillis-Steele)
scan, so there is no Python loop per time step. Only chunk-boundary states are kept for the backward pass, which
recomputes each chunk, so memory is O(batch * dim * L) plus one chunk's (chunk, N) states. Computes in float32
(float64 stays float64). Semantics and layouts: :mod:`nnunet_mamba.ops.selective_scan`.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from .custom_ops import ScanOutput, as_op_outputs, fake_input_grads, grouped, register_scan_autograd

# Elements of one chunk's (batch, dim, chunk, N) state tensor; about 8 such tensors are alive in the backward pass.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK = 16


def _chunk_length(per_step_elements: int, length: int) -> int:
    return max(_MIN_CHUNK, min(length, _CHUNK_ELEMENTS // max(per_step_elements, 1)))


def _linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Solve h_t = a_t * h_{t-1} + b_t along dim -2 (Hillis-Steele, log2(T) steps), h_{-1} = h0."""
    length = a.shape[-2]
    step = 1
    while step < length:
        b = torch.cat([b[..., :step, :], b[..., step:, :] + a[..., step:, :] * b[..., :-step, :]], dim=-2)
        a = torch.cat([a[..., :step, :], a[..., step:, :] * a[..., :-step, :]], dim=-2)
        step *= 2
    return b + a * h0.unsqueeze(-2)


def _torch_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Chunked scan: ``(out, last state, chunk start states)``; all tensors float32 (or float64), B/C grouped."""
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    dt = _delta(delta, delta_bias, delta_softplus)
    chunk = _chunk_length(batch * dim * n, length)
    h = u.new_zeros(batch, groups, dim // groups, n)
    y = torch.empty_like(u)
    chunk_states = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        chunk_states.append(h)
        dA, dBu = _chunk_terms(u, dt, A, B, start, stop, groups)
        states = _linear_scan(dA, dBu, h)
        y[..., start:stop] = _readout(states, C, start, stop).reshape(batch, dim, stop - start)
        h = states[..., -1, :]
    out = y if D is None else y + u * D[:, None]
    gated = out * F.silu(z) if z is not None else out
    return gated.contiguous(), h.reshape(batch, dim, n).contiguous(), torch.stack(chunk_states)


def _torch_backward(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus):
    """Gradients of :func:`_torch_forward`'s inputs (None for absent ones), recomputing each chunk's states."""
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    chunk = _chunk_length(batch * dim * n, length)
    per_group = dim // groups
    dt_raw = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = F.softplus(dt_raw) if delta_softplus else dt_raw
    grad_y = grad_out * F.silu(z) if z is not None else grad_out
    grad_y = grad_y.reshape(batch, groups, per_group, length)
    A_view = A.reshape(1, groups, per_group, 1, n)

    grad_u = torch.zeros_like(u).reshape(batch, groups, per_group, length)
    grad_dt = torch.zeros_like(grad_u)
    grad_A = torch.zeros(groups, per_group, n, dtype=u.dtype, device=u.device)
    grad_B = torch.zeros_like(B)
    grad_C = torch.zeros_like(C)
    y = torch.empty_like(grad_u) if z is not None else None
    carry = torch.zeros(batch, groups, per_group, n, dtype=u.dtype, device=u.device)
    if grad_last_state is not None:
        carry = carry + grad_last_state.reshape(batch, groups, per_group, n)
    u_g = u.reshape(batch, groups, per_group, length)
    dt_g = dt.reshape(batch, groups, per_group, length)

    starts = list(range(0, length, chunk))
    for index in reversed(range(len(starts))):
        start = starts[index]
        stop = min(start + chunk, length)
        dA, dBu = _chunk_terms(u, dt, A, B, start, stop, groups)
        h0 = chunk_states[index]
        states = _linear_scan(dA, dBu, h0)
        previous = torch.cat([h0.unsqueeze(-2), states[..., :-1, :]], dim=-2)
        c_chunk = C[..., start:stop].transpose(-1, -2).unsqueeze(2)  # (batch, G, 1, T, N)
        b_chunk = B[..., start:stop].transpose(-1, -2).unsqueeze(2)
        gy = grad_y[..., start:stop]
        if y is not None:
            y[..., start:stop] = (states * c_chunk).sum(-1)
        # adjoint of h: G_t = gy_t * C_t + a_{t+1} * G_{t+1}, solved as a forward scan on the reversed chunk
        decay_next = torch.cat([dA[..., 1:, :], torch.ones_like(dA[..., :1, :])], dim=-2)
        adj = _linear_scan(decay_next.flip(-2), (gy.unsqueeze(-1) * c_chunk).flip(-2), carry).flip(-2)
        carry = dA[..., 0, :] * adj[..., 0, :]

        grad_C[..., start:stop] += (gy.unsqueeze(-1) * states).sum(2).transpose(-1, -2)
        dtu = dt_g[..., start:stop] * u_g[..., start:stop]
        grad_B[..., start:stop] += (adj * dtu.unsqueeze(-1)).sum(2).transpose(-1, -2)
        grad_dtu = (adj * b_chunk).sum(-1)
        grad_u[..., start:stop] += grad_dtu * dt_g[..., start:stop]
        decay_grad = adj * previous * dA  # d loss / d (dt * A)
        grad_dt[..., start:stop] += grad_dtu * u_g[..., start:stop] + (decay_grad * A_view).sum(-1)
        grad_A += (decay_grad * dt_g[..., start:stop].unsqueeze(-1)).sum((0, 3))

    grad_u = grad_u.reshape(batch, dim, length)
    grad_y = grad_y.reshape(batch, dim, length)
    grad_D = None
    if D is not None:
        grad_u = grad_u + grad_y * D[:, None]
        grad_D = (grad_y * u).sum((0, 2))
    grad_z = None
    if z is not None:
        out = y.reshape(batch, dim, length)
        if D is not None:
            out = out + u * D[:, None]
        sig = torch.sigmoid(z)
        grad_z = grad_out * out * sig * (1 + z * (1 - sig))
    grad_delta = grad_dt.reshape(batch, dim, length)
    if delta_softplus:
        grad_delta = grad_delta * torch.sigmoid(dt_raw)
    grad_bias = grad_delta.sum((0, 2)) if delta_bias is not None else None
    return grad_u, grad_delta, grad_A.reshape(dim, n), grad_B, grad_C, grad_D, grad_z, grad_bias


def _delta(delta, delta_bias, delta_softplus):
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    return F.softplus(dt) if delta_softplus else dt


def _chunk_terms(u, dt, A, B, start, stop, groups):
    """exp(dt*A) and dt*B*u for one chunk, as (batch, G, dim/G, T, N)."""
    batch, dim, _ = u.shape
    n = A.shape[1]
    per_group = dim // groups
    dt_c = dt[..., start:stop].reshape(batch, groups, per_group, stop - start, 1)
    u_c = u[..., start:stop].reshape(batch, groups, per_group, stop - start, 1)
    dA = torch.exp(dt_c * A.reshape(1, groups, per_group, 1, n))
    dBu = (dt_c * u_c) * B[..., start:stop].transpose(-1, -2).unsqueeze(2)
    return dA, dBu


def _readout(states, C, start, stop):
    return (states * C[..., start:stop].transpose(-1, -2).unsqueeze(2)).sum(-1)


@torch.library.custom_op("nnunet_mamba::selective_scan_torch_fwd", mutates_args=())
def _torch_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                    z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool
                    ) -> tuple[Tensor, Tensor, Tensor]:
    return _torch_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_torch_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    chunk = _chunk_length(batch * dim * n, length)
    chunks = (length + chunk - 1) // chunk
    return (u.new_empty(batch, dim, length), u.new_empty(batch, dim, n),
            u.new_empty(chunks, batch, groups, dim // groups, n))


@torch.library.custom_op("nnunet_mamba::selective_scan_torch_bwd", mutates_args=())
def _torch_scan_bwd(grad_out: Tensor, grad_last: Tensor | None, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                    C: Tensor, D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
                    chunk_states: Tensor, delta_softplus: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return as_op_outputs(_torch_backward(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, chunk_states,
                                          delta_softplus), u)


@_torch_scan_bwd.register_fake
def _(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus):
    return fake_input_grads(u, delta, A, B, C, D, z, delta_bias)


register_scan_autograd(_torch_scan_fwd, "selective_scan_torch_bwd", lambda inputs: (inputs[8],))


def selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                         return_last_state: bool = False) -> ScanOutput:
    """The pure-PyTorch backend (any device); computes in float32 (float64 stays float64)."""
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    as_compute = lambda t: None if t is None else t.to(compute)  # noqa: E731
    out, last, _ = torch.ops.nnunet_mamba.selective_scan_torch_fwd(
        as_compute(u), as_compute(delta), as_compute(A), as_compute(grouped(B)), as_compute(grouped(C)),
        as_compute(D), as_compute(z), as_compute(delta_bias), delta_softplus)
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None = None, z: Tensor | None = None,
                             delta_bias: Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False) -> ScanOutput:
    """The definition, one time step after another: slow, for tests and as documentation."""
    dtype_in = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta = u.to(compute), delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    A = A.to(compute)
    Bg = grouped(B).to(compute)
    Cg = grouped(C).to(compute)
    per_group = dim // Bg.shape[1]
    Bx = Bg.repeat_interleave(per_group, dim=1)  # (batch, dim, N, L)
    Cx = Cg.repeat_interleave(per_group, dim=1)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = y if D is None else y + u * D.to(compute)[:, None]
    if z is not None:
        out = out * F.silu(z.to(compute))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out
