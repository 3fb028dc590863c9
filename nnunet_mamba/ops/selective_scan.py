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
    ``cuda``   mamba-ssm's fused kernel (CUDA tensors, mamba-ssm installed).
    ``triton`` ours: Triton kernels (:mod:`nnunet_mamba.ops.triton_scan`) for the forward and the backward pass;
               CUDA tensors, or any tensors in Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels
               are first imported; slow, for tests). Inputs float32, bfloat16 or float16; state and sums in
               float32. Memory O(batch * dim * L): only the state at every chunk start is kept for the backward
               pass, which recomputes each chunk.
    ``torch``  ours: pure PyTorch on any device. The sequence is cut into chunks; inside a chunk the linear
               recurrence is solved by a log-depth (Hillis-Steele) scan, so there is no Python loop per time
               step. Only chunk-boundary states are kept for the backward pass, which recomputes each chunk,
               so memory is O(batch * dim * L) plus one chunk's (chunk, N) states.

The backend is chosen per call: ``NNUNET_MAMBA_BACKEND=auto|cuda|triton|torch`` (default ``auto``: for CUDA
tensors the first of :data:`AUTO_CUDA_PREFERENCE` that can run, for other tensors ``torch``). Whatever the
autocast state, the scan computes in float32: the original U-Mamba diverges to NaN when it runs under fp16
autocast. Every backend returns ``out`` in ``u``'s dtype and the last state in float32 (float64 for float64
inputs, which only the ``torch`` backend takes).

Every backend is a pair of ``torch.library`` custom ops (``nnunet_mamba::selective_scan_<backend>_fwd`` and
``_bwd``; ``cuda`` wraps mamba-ssm's compiled ``selective_scan_cuda.fwd``/``bwd``, not its autograd function), so
``torch.compile`` captures a scan as one opaque node without a graph break, ``FlopCounterMode`` counts it
(:mod:`nnunet_mamba.ops.flops`), and under ``FakeTensorMode`` (the memory planner, :mod:`nnunet_mamba.planning`) the
ops produce shapes without computing.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

logger = logging.getLogger("nnunet_mamba")

BACKEND_ENV = "NNUNET_MAMBA_BACKEND"
BACKENDS = ("auto", "cuda", "triton", "torch")
# What ``auto`` picks for CUDA tensors: the first of these that can run (tensors on other devices get ``torch``).
# mamba-ssm first although our Triton kernels beat it on long sequences alone (forward + backward 1.41x at
# (12, 768, 6400) on an H100): inside networks they did not (Swin-UMamba's scans took 48.5 vs 44.7 ms of GPU time
# per step with Triton from L = 1024 on; U-Mamba Enc 3D takes 404 vs 367 ms per step with Triton throughout).
AUTO_CUDA_PREFERENCE = ("cuda", "triton", "torch")
# Input dtypes of the triton backend (it computes in float32 whatever they are).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Elements of one chunk's (batch, dim, chunk, N) state tensor; about 8 such tensors are alive in the backward pass.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK = 16

ScanOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class BackendUnavailableError(RuntimeError):
    """A selective-scan backend was requested that cannot run here."""


def _import_once(load):
    """``load`` run on first use only; then ``(what it returned, None)``, or ``(None, why it raised)``.

    A dict, not functools.lru_cache, which torch.compile warns about tracing through; ``cache_clear`` as there.
    """
    outcome = {}

    @functools.wraps(load)
    def cached():
        if not outcome:
            try:
                outcome["result"] = (load(), None)
            except Exception as exc:  # ImportError, or an OSError/RuntimeError from a build for another torch
                outcome["result"] = (None, f"{type(exc).__name__}: {exc}")
        return outcome["result"]

    cached.cache_clear = outcome.clear
    return cached


@_import_once
def _mamba_ssm_kernels():
    """mamba-ssm's compiled extension ``selective_scan_cuda`` (its ``fwd``/``bwd``), or the import error explaining
    why it is missing. Imported through mamba-ssm's package so that a build for another torch fails here."""
    import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    import selective_scan_cuda

    return selective_scan_cuda


@_import_once
def _triton_kernels():
    """The module :mod:`nnunet_mamba.ops.triton_scan`, or the import error explaining why it is missing."""
    from . import triton_scan

    return triton_scan


def cuda_backend_status() -> Tuple[bool, str]:
    """Whether mamba-ssm's CUDA kernel can be used, and a human-readable reason."""
    fn, err = _mamba_ssm_kernels()
    if fn is None:
        return False, f"mamba-ssm not importable ({err})"
    if not torch.cuda.is_available():
        return False, "mamba-ssm installed but no CUDA device is visible"
    return True, "mamba-ssm selective_scan_cuda kernels"


def triton_backend_status() -> Tuple[bool, str]:
    """Whether our Triton kernels can be used, and a human-readable reason."""
    kernels, err = _triton_kernels()
    if kernels is None:
        return False, f"triton not importable ({err})"
    import triton

    if kernels.INTERPRETED:
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1): any device, slow"
    if not torch.cuda.is_available():
        return False, f"triton {triton.__version__} installed but no CUDA device is visible"
    return True, f"Triton {triton.__version__} kernels"


def requested_backend() -> str:
    """The backend asked for by ``NNUNET_MAMBA_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {', '.join(BACKENDS)}: set one of them, or unset "
                         f"{BACKEND_ENV} for auto")
    return value


def _unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on tensors on ``device`` (a message naming the way out), or None if it can."""
    if backend == "cuda":
        fn, err = _mamba_ssm_kernels()
        if fn is None:
            return (f"selective-scan backend 'cuda' was requested ({BACKEND_ENV}=cuda) but mamba-ssm cannot be "
                    f"imported: {err}. Install the CUDA extra (pip install 'nnunet-mamba[cuda]') or set "
                    f"{BACKEND_ENV}=torch (or auto) to use the pure-PyTorch scan.")
        if device.type != "cuda":
            return (f"selective-scan backend 'cuda' was requested but the tensors are on {device}; mamba-ssm's "
                    f"kernel only runs on CUDA tensors. Set {BACKEND_ENV}=auto or torch.")
    elif backend == "triton":
        kernels, err = _triton_kernels()
        if kernels is None:
            return (f"selective-scan backend 'triton' was requested ({BACKEND_ENV}=triton) but triton cannot be "
                    f"imported: {err}. Install triton (PyTorch's CUDA wheels bring it) or set {BACKEND_ENV}=torch "
                    f"(or auto).")
        if device.type != "cuda" and not kernels.INTERPRETED:
            return (f"selective-scan backend 'triton' was requested but the tensors are on {device}; the Triton "
                    f"kernels run on CUDA tensors, or on any device in Triton's interpreter (TRITON_INTERPRET=1 "
                    f"set before nnunet_mamba.ops.triton_scan is first imported; slow). Set {BACKEND_ENV}=auto or "
                    f"torch.")
    return None


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """Pick the concrete backend for tensors on ``device``; raises if a forced backend cannot run."""
    choice = (backend or requested_backend()).lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend {choice!r} is not one of {', '.join(BACKENDS)}")
    if choice != "auto":
        reason = _unavailable(choice, device)
        if reason is not None:
            raise BackendUnavailableError(reason)
        return choice
    if device.type == "cuda":
        return next(name for name in AUTO_CUDA_PREFERENCE if _unavailable(name, device) is None)
    return "torch"


_BACKEND_STATUS = {"cuda": cuda_backend_status, "triton": triton_backend_status,
                   "torch": lambda: (True, "pure PyTorch, chunked log-depth scan")}
_announced: set = set()


def _announce(backend: str, device: torch.device, auto: bool) -> None:
    """Log, once per (backend, device type), which implementation runs the scan and, when ``auto`` chose it on
    a CUDA device, why the backends it prefers were not used."""
    key = (backend, device.type)
    if key in _announced:
        return
    _announced.add(key)
    detail = _BACKEND_STATUS[backend]()[1]
    if auto and device.type == "cuda":
        passed_over = AUTO_CUDA_PREFERENCE[:AUTO_CUDA_PREFERENCE.index(backend)]
        detail += "".join(f"; {name} unused: {_BACKEND_STATUS[name]()[1]}" for name in passed_over)
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
    if torch.compiler.is_compiling():
        # dynamo would break the graph at is_fake and at logging; it never traces fake tensors of the planner
        name = resolve_backend(u.device, backend)
    elif is_fake(u):  # memory estimation (nnunet_mamba.planning): shapes only, whatever backend is configured
        name = "torch"
    else:
        name = resolve_backend(u.device, backend)
        _announce(name, u.device, (backend or requested_backend()).lower() == "auto")
    with torch.autocast(device_type=u.device.type, enabled=False):
        if name == "cuda":
            return selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        if name == "triton":
            return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
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
    if _grouped(B).shape[1] != _grouped(C).shape[1]:
        raise ValueError(f"B and C must have the same number of groups (3D counts as 1), got shapes "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
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


# ---- custom ops -------------------------------------------------------------------------------------------------
# Each backend's forward and backward pass is one torch.library custom op. A custom op returns tensors only, so an
# absent optional gradient (D, z or delta_bias not given) travels as an empty tensor and becomes None again in the
# autograd formula.


def _as_op_outputs(grads: tuple, like: Tensor) -> tuple:
    """The 8 input gradients as a backward op returns them: contiguous, absent ones as empty tensors."""
    return tuple(like.new_empty(0) if g is None else g.contiguous() for g in grads)


def _from_op_outputs(grads: tuple, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor]) -> tuple:
    """A backward op's 8 outputs as autograd gradients: None for the inputs that were not given."""
    present = (True,) * 5 + (D is not None, z is not None, delta_bias is not None)
    return tuple(g if given else None for g, given in zip(grads, present))


def _fake_input_grads(u, delta, A, B, C, D, z, delta_bias) -> tuple:
    return tuple(u.new_empty(0) if t is None else t.new_empty(t.shape) for t in (u, delta, A, B, C, D, z, delta_bias))


@torch.library.custom_op("nnunet_mamba::selective_scan_torch_fwd", mutates_args=())
def _torch_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool
                    ) -> Tuple[Tensor, Tensor, Tensor]:
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
def _torch_scan_bwd(grad_out: Tensor, grad_last: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                    C: Tensor, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                    chunk_states: Tensor, delta_softplus: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _as_op_outputs(_torch_backward(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, chunk_states,
                                          delta_softplus), u)


@_torch_scan_bwd.register_fake
def _(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus):
    return _fake_input_grads(u, delta, A, B, C, D, z, delta_bias)


def _setup_torch_scan(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _torch_scan_grads(ctx, grad_out, grad_last, _grad_states):
    u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
    grads = torch.ops.nnunet_mamba.selective_scan_torch_bwd(
        torch.zeros_like(u) if grad_out is None else grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias,
        chunk_states, ctx.delta_softplus)
    return (*_from_op_outputs(grads, D, z, delta_bias), None)


_torch_scan_fwd.register_autograd(_torch_scan_grads, setup_context=_setup_torch_scan)


@torch.library.custom_op("nnunet_mamba::selective_scan_triton_fwd", mutates_args=())
def _triton_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, save_states: bool,
                     block_l: int, block_d: int, num_warps: int, bwd_block_l: int, bwd_block_d: int,
                     bwd_num_warps: int, fwd_rows: bool) -> Tuple[Tensor, Tensor, Tensor]:
    kernels = _triton_kernels()[0]
    config = kernels.ScanConfig(block_l, block_d, num_warps, bwd_block_l, bwd_block_d, bwd_num_warps, fwd_rows)
    return kernels.scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_states, config)


@_triton_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_states, block_l, block_d, num_warps, bwd_block_l,
      bwd_block_d, bwd_num_warps, fwd_rows):
    batch, dim, length = u.shape
    n = A.shape[1]
    chunks = (length + bwd_block_l - 1) // bwd_block_l
    f32 = dict(dtype=torch.float32)
    return (u.new_empty(batch, dim, length), u.new_empty(batch, dim, n, **f32),
            u.new_empty((batch, chunks, dim, n) if save_states else (0,), **f32))


@torch.library.custom_op("nnunet_mamba::selective_scan_triton_bwd", mutates_args=())
def _triton_scan_bwd(grad_out: Tensor, grad_last: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor,
                     B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                     states: Tensor, delta_softplus: bool, block_l: int, block_d: int, num_warps: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # only the backward kernel runs: its chunk length, channels per program and warps
    kernels = _triton_kernels()[0]
    config = kernels.ScanConfig(block_l, block_d, num_warps, block_l, block_d, num_warps)
    return _as_op_outputs(kernels.scan_backward(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, states,
                                                delta_softplus, config), u)


@_triton_scan_bwd.register_fake
def _(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, block_l, block_d,
      num_warps):
    return _fake_input_grads(u, delta, A, B, C, D, z, delta_bias)


def _setup_triton_scan(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, _, _, _, _, bwd_block_l, bwd_block_d, bwd_num_warps, _ = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.settings = (delta_softplus, bwd_block_l, bwd_block_d, bwd_num_warps)
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _triton_scan_grads(ctx, grad_out, grad_last, _grad_states):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    grads = torch.ops.nnunet_mamba.selective_scan_triton_bwd(
        torch.zeros_like(u) if grad_out is None else grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias,
        states, *ctx.settings)
    return (*_from_op_outputs(grads, D, z, delta_bias), *[None] * 9)


_triton_scan_fwd.register_autograd(_triton_scan_grads, setup_context=_setup_triton_scan)


# mamba-ssm's kernel saves its state every 2048 steps: (batch, dim, chunks, 2N) float32 (see its selective_scan.cpp)
_MAMBA_SSM_CHUNK = 2048


def _last_dim_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    # what mamba-ssm's kernel asks of u, delta, B, C, z and dout; other strides it takes as they are
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("nnunet_mamba::selective_scan_cuda_fwd", mutates_args=())
def _cuda_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                   z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out before the gate, saved states x, gated out)``; the gated out is empty without z."""
    out, x, *gated = _mamba_ssm_kernels()[0].fwd(
        *map(_last_dim_contiguous, (u, delta)), A, *map(_last_dim_contiguous, (B, C)), D,
        _last_dim_contiguous(z), delta_bias, delta_softplus)
    return out, x, gated[0] if gated else u.new_empty(0)


@_cuda_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, length = u.shape
    chunks = (length + _MAMBA_SSM_CHUNK - 1) // _MAMBA_SSM_CHUNK
    # the kernel allocates its outputs with empty_like(delta) and empty_like(z): their strides, not contiguous ones
    return (torch.empty_like(delta), u.new_empty(batch, dim, chunks, 2 * A.shape[1], dtype=A.dtype),
            u.new_empty(0) if z is None else torch.empty_like(z))


@torch.library.custom_op("nnunet_mamba::selective_scan_cuda_bwd", mutates_args=())
def _cuda_scan_bwd(grad_out: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                   z: Optional[Tensor], delta_bias: Optional[Tensor], x: Tensor, out: Optional[Tensor],
                   delta_softplus: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # the kernel returns (du, ddelta, dA, dB, dC, dD, ddelta_bias[, dz]); dz is allocated by it (None), and the
    # last argument would make it recompute the gated output, which nothing here needs
    du, ddelta, dA, dB, dC, dD, dbias, *dz = _mamba_ssm_kernels()[0].bwd(
        *map(_last_dim_contiguous, (u, delta)), A, *map(_last_dim_contiguous, (B, C)), D, _last_dim_contiguous(z),
        delta_bias, _last_dim_contiguous(grad_out), x, out, None, delta_softplus, False)
    return _as_op_outputs((du, ddelta, dA, dB, dC, dD if D is not None else None, dz[0] if dz else None,
                           dbias if delta_bias is not None else None), u)


@_cuda_scan_bwd.register_fake
def _(grad_out, u, delta, A, B, C, D, z, delta_bias, x, out, delta_softplus):
    return _fake_input_grads(u, delta, A, B, C, D, z, delta_bias)


def _setup_cuda_scan(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    out, x, gated = output
    # with z the result is the gated output and the pre-gate one is kept for dz; without z, the plain output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out if z is not None else None)
    ctx.mark_non_differentiable(x, out if z is not None else gated)
    ctx.delta_softplus = delta_softplus
    ctx.set_materialize_grads(False)


def _cuda_scan_grads(ctx, grad_plain, _grad_x, grad_gated):
    u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
    grad_out = grad_gated if z is not None else grad_plain
    grads = torch.ops.nnunet_mamba.selective_scan_cuda_bwd(
        torch.zeros_like(u) if grad_out is None else grad_out, u, delta, A, B, C, D, z, delta_bias, x, out,
        ctx.delta_softplus)
    return (*_from_op_outputs(grads, D, z, delta_bias), None)


_cuda_scan_fwd.register_autograd(_cuda_scan_grads, setup_context=_setup_cuda_scan)


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False) -> ScanOutput:
    """The ``cuda`` backend: mamba-ssm's kernel (CUDA tensors). As in mamba-ssm, no gradient flows back from the
    last state."""
    reason = _unavailable("cuda", u.device)
    if reason is not None:
        raise BackendUnavailableError(reason)
    as_float32 = lambda t: None if t is None else t.float()  # noqa: E731
    out, x, gated = torch.ops.nnunet_mamba.selective_scan_cuda_fwd(
        u, delta, A.float(), _grouped(B), _grouped(C), as_float32(D), z, as_float32(delta_bias), delta_softplus)
    result = gated if z is not None else out
    # x holds (running decay product, state) pairs per chunk: the states are the odd entries of the last chunk
    return (result, x[:, :, -1, 1::2]) if return_last_state else result


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False) -> ScanOutput:
    """The pure-PyTorch backend (any device); computes in float32 (float64 stays float64)."""
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    as_compute = lambda t: None if t is None else t.to(compute)  # noqa: E731
    out, last, _ = torch.ops.nnunet_mamba.selective_scan_torch_fwd(
        as_compute(u), as_compute(delta), as_compute(A), as_compute(_grouped(B)), as_compute(_grouped(C)),
        as_compute(D), as_compute(z), as_compute(delta_bias), delta_softplus)
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, config=None) -> ScanOutput:
    """The Triton backend: CUDA tensors (any device under TRITON_INTERPRET=1), inputs in :data:`TRITON_DTYPES`.

    ``config`` (a :class:`nnunet_mamba.ops.triton_scan.ScanConfig`) overrides the block sizes that
    :func:`~nnunet_mamba.ops.triton_scan.default_config` picks for the shape; for tuning.
    """
    reason = _unavailable("triton", u.device)
    if reason is not None:
        raise BackendUnavailableError(reason)
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in TRITON_DTYPES:
            raise TypeError(f"the triton selective-scan backend takes {', '.join(map(str, TRITON_DTYPES))} "
                            f"inputs, got {name} of {t.dtype}; use the torch backend for other dtypes")
    kernels = _triton_kernels()[0]
    if config is None:
        groups = _grouped(B).shape[1]
        config = kernels.default_config(u.shape[1] // groups, u.shape[2], A.shape[1], u.shape[0] * groups)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    as_float32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    out, last, _ = torch.ops.nnunet_mamba.selective_scan_triton_fwd(
        u, delta, as_float32(A), B, C, as_float32(D), z, as_float32(delta_bias), delta_softplus, save_states,
        config.block_l, config.block_d, config.num_warps, config.bwd_block_l, config.bwd_block_d,
        config.bwd_num_warps, config.fwd_rows)
    return (out, last) if return_last_state else out
