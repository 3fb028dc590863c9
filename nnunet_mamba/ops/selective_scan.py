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

Backends (:mod:`nnunet_mamba.ops.backend` chooses one per call)
    ``cuda``   mamba-ssm's fused kernel (CUDA tensors, mamba-ssm installed): :mod:`nnunet_mamba.ops.compiled_scans`.
    ``triton`` ours, Triton kernels for the forward and the backward pass (:mod:`nnunet_mamba.ops.triton`).
    ``torch``  ours, pure PyTorch on any device: :mod:`nnunet_mamba.ops.torch_scan`.

``auto`` (the default) picks, for CUDA tensors, the first of ``AUTO_CUDA_PREFERENCE`` that can run, for other
tensors ``torch``. Whatever the
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


import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .backend import announce, requested_backend, resolve_backend
from .compiled_scans import selective_scan_cuda, selective_scan_triton
from .custom_ops import ScanOutput, grouped
from .torch_scan import selective_scan_torch


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str | None = None) -> ScanOutput:
    """Selective scan with mamba-ssm's semantics; see the module docstring for shapes.

    Returns ``out`` of shape (batch, dim, L) in ``u``'s dtype, and with ``return_last_state`` also the final
    state (batch, dim, N) in float32. ``backend`` overrides the environment's choice for this call.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if torch.compiler.is_compiling():
        # dynamo would break the graph at is_fake and at logging; it never traces fake tensors of the planner
        name = resolve_backend(u.device, backend)
    elif is_fake(u):  # memory estimation (nnunet_mamba.planning): shapes only, whatever backend is configured
        name = "torch"
    else:
        name = resolve_backend(u.device, backend)
        announce("selective scan", name, u.device, requested_backend(backend) == "auto")
    with torch.autocast(device_type=u.device.type, enabled=False):
        if name == "cuda":
            return selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        if name == "triton":
            return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  z: Tensor | None, delta_bias: Tensor | None) -> None:
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
    if grouped(B).shape[1] != grouped(C).shape[1]:
        raise ValueError(f"B and C must have the same number of groups (3D counts as 1), got shapes "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
