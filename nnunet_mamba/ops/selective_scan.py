"""Selective scan (the S6 recurrence of Mamba) with interchangeable backends.

Semantics and tensor layouts follow mamba-ssm's ``selective_scan_fn``::

    u, delta:      (batch, dim, L)
    A:             (dim, N)            real, usually negative
    B, C:          (batch, N, L) or grouped (batch, G, N, L), dim % G == 0
    D, delta_bias: (dim,)
    z:             (batch, dim, L)     optional gate, out *= silu(z)

    dt_t  = softplus(delta_t + delta_bias)      (softplus only if delta_softplus)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t   = <C_t, h_t> + D * u_t

Backends
    ``cuda``  mamba-ssm's fused kernel (CUDA tensors, mamba-ssm installed).
    ``torch`` ours: pure PyTorch on any device. The sequence is cut into chunks; inside a chunk the linear
              recurrence is solved by a log-depth (Hillis-Steele) scan, so there is no Python loop per time
              step. Only chunk-boundary states are kept for the backward pass, which recomputes each chunk,
              so memory is O(batch * dim * L) plus one chunk's (chunk, N) states.

The backend is chosen per call: ``NNUNET_MAMBA_BACKEND=auto|cuda|torch`` (default ``auto``: ``cuda`` for CUDA
tensors when mamba-ssm imports, else ``torch``). Whatever the autocast state, the scan computes in float32: the
original U-Mamba diverges to NaN when it runs under fp16 autocast.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

logger = logging.getLogger("nnunet_mamba")

BACKEND_ENV = "NNUNET_MAMBA_BACKEND"
BACKENDS = ("auto", "cuda", "torch")

# Elements of one chunk's (batch, dim, chunk, N) state tensor; about 8 such tensors are alive in the backward pass.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK = 16

ScanOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class BackendUnavailableError(RuntimeError):
    """A selective-scan backend was requested that cannot run here."""


@lru_cache(maxsize=None)
def _mamba_ssm_scan():
    """mamba-ssm's ``selective_scan_fn``, or the import error explaining why it is missing."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, or an OSError/RuntimeError from a kernel built for another torch
        return None, f"{type(exc).__name__}: {exc}"
    return selective_scan_fn, None


def cuda_backend_status() -> Tuple[bool, str]:
    """Whether mamba-ssm's CUDA kernel can be used, and a human-readable reason."""
    fn, err = _mamba_ssm_scan()
    if fn is None:
        return False, f"mamba-ssm not importable ({err})"
    if not torch.cuda.is_available():
        return False, "mamba-ssm installed but no CUDA device is visible"
    return True, "mamba-ssm selective_scan_fn"


def requested_backend() -> str:
    """The backend asked for by ``NNUNET_MAMBA_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """Pick the concrete backend for tensors on ``device``; raises if a forced backend cannot run."""
    choice = (backend or requested_backend()).lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend {choice!r} is not one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    fn, err = _mamba_ssm_scan()
    if choice == "cuda":
        if fn is None:
            raise BackendUnavailableError(
                f"selective-scan backend 'cuda' was requested ({BACKEND_ENV}=cuda) but mamba-ssm cannot be "
                f"imported: {err}. Install the CUDA extra (pip install 'nnunet-mamba[cuda]') or set "
                f"{BACKEND_ENV}=torch (or auto) to use the pure-PyTorch scan.")
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"selective-scan backend 'cuda' was requested but the tensors are on {device}; mamba-ssm's "
                f"kernel only runs on CUDA tensors. Set {BACKEND_ENV}=auto or torch.")
        return "cuda"
    return "cuda" if (fn is not None and device.type == "cuda") else "torch"


_announced: set = set()


def _announce(backend: str, device: torch.device) -> None:
    """Log, once per (backend, device type), which implementation runs the scan."""
    key = (backend, device.type)
    if key in _announced:
        return
    _announced.add(key)
    if backend == "cuda":
        detail = "mamba-ssm CUDA kernel"
    else:
        ok, why = cuda_backend_status()
        detail = "pure PyTorch, chunked log-depth scan" + ("" if device.type == "cpu" else f"; cuda unused: {why}")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    logger.info("selective scan backend '%s' on %s (%s)", backend, device.type, detail)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: Optional[str] = None) -> ScanOutput:
    """Selective scan with mamba-ssm's semantics; see the module docstring for shapes.

    Returns ``out`` of shape (batch, dim, L) in ``u``'s dtype, and with ``return_last_state`` also the final
    state (batch, dim, N) in float32. ``backend`` overrides ``NNUNET_MAMBA_BACKEND`` for this call.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if is_fake(u):  # memory estimation (nnunet_mamba.planning): shapes only, whatever backend is configured
        name = "torch"
    else:
        name = resolve_backend(u.device, backend)
        _announce(name, u.device)
    with torch.autocast(device_type=u.device.type, enabled=False):
        if name == "cuda":
            fn, _ = _mamba_ssm_scan()
            return fn(u, delta, A.float(), B, C, None if D is None else D.float(), z,
                      None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state)
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            ok = t.shape == (batch, n, length)
        elif t.dim() == 4:
            ok = t.shape[0] == batch and t.shape[2:] == (n, length) and dim % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be (batch={batch}, N={n}, L={length}) or (batch, G, N, L) with "
                             f"dim % G == 0, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False) -> ScanOutput:
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
    Bg = _grouped(B).to(compute)
    Cg = _grouped(C).to(compute)
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


def _grouped(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 3 else t


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


class _TorchSelectiveScan(torch.autograd.Function):
    """Chunked scan with a recomputing backward; all tensors float32, B/C grouped (batch, G, N, L)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, dim, length = u.shape
        groups, n = B.shape[1], A.shape[1]
        dt = _delta(delta, delta_bias, delta_softplus)
        chunk = _chunk_length(batch * dim * n, length)
        h = u.new_zeros(batch, groups, dim // groups, n)
        y = torch.empty_like(u)
        starts = range(0, length, chunk)
        if is_fake(u):
            # memory estimation (nnunet_mamba.planning) needs only the shapes of outputs and saved tensors;
            # the chunk loop would cost seconds of fake-tensor dispatch per layer
            chunk_states = [h] * len(starts)
        else:
            chunk_states = []
            for start in starts:
                stop = min(start + chunk, length)
                chunk_states.append(h)
                dA, dBu = _chunk_terms(u, dt, A, B, start, stop, groups)
                states = _linear_scan(dA, dBu, h)
                y[..., start:stop] = _readout(states, C, start, stop).reshape(batch, dim, stop - start)
                h = states[..., -1, :]
        out = y if D is None else y + u * D[:, None]
        gated = out * F.silu(z) if z is not None else out
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(chunk_states))
        ctx.delta_softplus = delta_softplus
        ctx.chunk = chunk
        return gated, h.reshape(batch, dim, n)

    @staticmethod
    def backward(ctx, grad_out, grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
        chunk = ctx.chunk
        batch, dim, length = u.shape
        groups, n = B.shape[1], A.shape[1]
        per_group = dim // groups
        dt_raw = delta if delta_bias is None else delta + delta_bias[:, None]
        dt = F.softplus(dt_raw) if ctx.delta_softplus else dt_raw
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
        if ctx.delta_softplus:
            grad_delta = grad_delta * torch.sigmoid(dt_raw)
        grad_bias = grad_delta.sum((0, 2)) if delta_bias is not None else None
        return (grad_u, grad_delta, grad_A.reshape(dim, n), grad_B, grad_C, grad_D, grad_z, grad_bias, None)


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


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False) -> ScanOutput:
    """The pure-PyTorch backend (any device); computes in float32 (float64 stays float64)."""
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    as_compute = lambda t: None if t is None else t.to(compute)  # noqa: E731
    out, last = _TorchSelectiveScan.apply(
        as_compute(u), as_compute(delta), as_compute(A), as_compute(_grouped(B)), as_compute(_grouped(C)),
        as_compute(D), as_compute(z), as_compute(delta_bias), delta_softplus)
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out
