"""Cross (multi-direction) selective scan: one feature map scanned in several orders, outputs summed in image order.

Vision Mamba blocks read the same map as K sequences (row-major, column-major, reversed, ...), run an S6 scan per
direction with that direction's parameters, and add the K outputs back up position by position. This module
does that without K permuted copies of the input. The orders come from :func:`~nnunet_mamba.ops.scan_orders`.

Semantics of :func:`cross_selective_scan` (everything in image order)::

    u:             (batch, dim, L) shared by all K directions, or (batch, K * dim, L) one per direction
    delta:         (batch, K * dim, L)     direction-major: channel k * dim + c is channel c of direction k
    A:             (K * dim, N)
    B, C:          (batch, K, N, L)
    D, delta_bias: (K * dim,)
    orders:        (K, L) int64, every row a permutation of 0..L-1

    y[b, c, p] = sum_k scan_k[b, c, t]   where orders[k, t] = p

where scan_k is mamba-ssm's selective scan (:mod:`nnunet_mamba.ops.selective_scan`) of direction k's sequence:
its inputs read at positions orders[k, 0], orders[k, 1], ... ``y`` is float32 (float64 for float64 ``u``) and
position-major: a transposed view of a contiguous (batch, L, dim) tensor, so ``y.transpose(1, 2)`` is a
channels-last map at no cost.

Backends (``backend=``, else the environment's; chosen by :func:`nnunet_mamba.ops.backend.cross_scan_backend`)
    ``triton``  the fused kernels (:mod:`nnunet_mamba.ops.triton.cross_scan`): CUDA tensors, or any device in
                Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported; slow, for tests).
                ``auto`` picks it where selective_scan's ``auto`` picks its Triton backend (CUDA tensors,
                mamba-ssm missing): mamba-ssm's kernel behind the gather/scatter path was faster.
    ``cuda``, ``torch`` (and ``auto`` elsewhere)  gather every direction's sequence, ONE
                :func:`~nnunet_mamba.ops.selective_scan` call with that backend (directions folded into channels,
                B/C grouped G = K), scatter back and sum. This is the reference semantics.

The fused path is a ``torch.library`` custom op (forward and backward, with fake implementations and an autograd
formula), so ``torch.compile(fullgraph=True)`` captures it as one opaque node. Under ``torch.compile`` the
gather/scatter path goes through the same op, since dynamo cannot trace selective_scan's backends; its backward
formula then recomputes the forward under autograd. In eager mode that path is plain autograd through
selective_scan, which keeps what its backend saves and needs no recompute.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor
from torch._C import DispatchKey, DispatchKeySet

from .backend import announce, cross_scan_backend, requested_backend, triton_kernels
from .cross_layout import chunk_states_shape, compute_dtype, cross_grad_buffers, final_grads, position_major
from .scan_orders import inverse_orders
from .selective_scan import selective_scan

# Steps per chunk of the fused kernels (a power of two), chosen by a sweep on an H100 (docs/measurements.md).
_CHUNK = 64


# ---- public entry point ------------------------------------------------------------------------------------------

def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, orders: Tensor, D: Optional[Tensor],
                  delta_bias: Optional[Tensor]) -> None:
    if orders.dim() != 2 or orders.dtype != torch.int64:
        raise ValueError(f"orders must be a (K, L) int64 table (scan_orders), got {orders.dtype} "
                         f"{tuple(orders.shape)}")
    n_dir, length = orders.shape
    if u.dim() != 3 or u.shape[2] != length:
        raise ValueError(f"u must be (batch, dim, L={length}) or (batch, K * dim, L), got {tuple(u.shape)}")
    batch = u.shape[0]
    if delta.dim() != 3 or delta.shape[0] != batch or delta.shape[2] != length or delta.shape[1] % n_dir:
        raise ValueError(f"delta must be (batch={batch}, K * dim with K={n_dir}, L={length}), got "
                         f"{tuple(delta.shape)}")
    channels = delta.shape[1]
    if u.shape[1] not in (channels // n_dir, channels):
        raise ValueError(f"u must have dim={channels // n_dir} (shared) or K * dim={channels} (one per direction) "
                         f"channels, got {u.shape[1]}")
    if A.dim() != 2 or A.shape[0] != channels or A.is_complex():
        raise ValueError(f"A must be real (K * dim={channels}, N), got {A.dtype} {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, n_dir, A.shape[1], length):
            raise ValueError(f"{name} must be (batch={batch}, K={n_dir}, N={A.shape[1]}, L={length}), got "
                             f"{tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"{name} must be (K * dim={channels},), got {tuple(t.shape)}")
    if orders.device != u.device:
        raise ValueError(f"orders are on {orders.device}, the inputs on {u.device}")


def cross_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, orders: Tensor,
                         D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                         delta_softplus: bool = False, backend: Optional[str] = None) -> Tensor:
    """Selective scans of K directions of one map, summed in image order; see the module docstring.

    ``orders`` comes from :func:`scan_orders`. Returns y (batch, dim, L), float32 (float64 for float64 ``u``),
    position-major. ``backend`` overrides ``NNUNET_MAMBA_BACKEND`` for this call.
    """
    _check_shapes(u, delta, A, B, C, orders, D, delta_bias)
    name = cross_scan_backend(u, backend)
    if name == "triton" and not torch.compiler.is_compiling():
        announce("cross selective scan (fused kernels)", name, u.device, requested_backend(backend) == "auto")
    if name == "triton" or torch.compiler.is_compiling():
        # the chunk-start states are only worth storing for a backward pass
        save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                      for t in (u, delta, A, B, C, D, delta_bias))
        return torch.ops.nnunet_mamba.cross_selective_scan(u, delta, A, B, C, orders, D, delta_bias,
                                                           delta_softplus, name, save_states, _CHUNK)[0]
    # Eager gather/scatter: plain autograd through selective_scan, which saves what its backend needs, so the
    # backward pass does not recompute the forward as the custom op's formula must.
    return _gather_scan_scatter(u, delta, A, B, C, orders, D, delta_bias, delta_softplus, name)


# ---- gather / scatter path ---------------------------------------------------------------------------------------

def _gather_scan_scatter(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, orders: Tensor,
                         D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                         backend: str) -> Tensor:
    """The reference path: every direction's sequence gathered, one grouped selective_scan, scattered back."""
    compute = compute_dtype(u)
    batch, _, length = u.shape
    n_dir = orders.shape[0]
    dim = delta.shape[1] // n_dir
    n = A.shape[1]

    def in_scan_order(x: Tensor, rows: int) -> Tensor:  # (batch, K * rows, L) -> (batch, K, rows, L) in k's order
        x = x.to(compute).reshape(batch, n_dir, rows, length)
        return torch.gather(x, 3, orders.view(1, n_dir, 1, length).expand(batch, n_dir, rows, length))

    if u.shape[1] == dim:  # shared: one read per direction, (batch, dim, K, L)
        u_scan = u.to(compute)[:, :, orders].transpose(1, 2)
    else:
        u_scan = in_scan_order(u, dim)
    with torch.autocast(device_type=u.device.type, enabled=False):
        y_scan = selective_scan(u_scan.reshape(batch, n_dir * dim, length),
                                in_scan_order(delta, dim).reshape(batch, n_dir * dim, length), A,
                                in_scan_order(B, n), in_scan_order(C, n), D, delta_bias=delta_bias,
                                delta_softplus=delta_softplus, backend=backend)
    inverse = inverse_orders(orders).view(1, n_dir, 1, length).expand(batch, n_dir, dim, length)
    y = torch.gather(y_scan.view(batch, n_dir, dim, length), 3, inverse).sum(1)
    out = position_major(y, batch, dim, length, compute, zero=False)
    out.copy_(y)
    return out


@contextlib.contextmanager
def _autograd_recorded() -> Iterator[None]:
    """Let autograd record inside a custom op's kernel.

    torch.library runs op kernels with the autograd dispatch keys excluded, so nothing is differentiable there.
    The gather/scatter path's backward formula differentiates through selective_scan (whichever backend that
    uses: mamba-ssm's autograd function included), so it lifts that exclusion for its recompute, as torch's own
    leaf-function operator (torch._higher_order_ops.invoke_leaf_function) does.
    """
    autograd_keys = DispatchKeySet(DispatchKey.AutogradFunctionality)
    for key in (DispatchKey.AutogradOther, DispatchKey.AutogradNestedTensor):
        autograd_keys = autograd_keys | DispatchKeySet(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                         torch._C._dispatch_tls_local_exclude_set() - autograd_keys), \
            torch.enable_grad():
        yield


def _gather_scan_scatter_grads(grad_y: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               orders: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor],
                               delta_softplus: bool, backend: str) -> Tuple[Optional[Tensor], ...]:
    """Input gradients of the gather/scatter path (contiguous): its forward recomputed under autograd, then
    differentiated."""
    with _autograd_recorded():
        leaves = [None if t is None else t.detach().requires_grad_() for t in (u, delta, A, B, C, D, delta_bias)]
        u_, delta_, A_, B_, C_, D_, bias_ = leaves
        y = _gather_scan_scatter(u_, delta_, A_, B_, C_, orders, D_, bias_, delta_softplus, backend)
        grads = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], grad_y))
    return tuple(None if t is None else next(grads).contiguous() for t in leaves)


# ---- custom ops --------------------------------------------------------------------------------------------------
# A custom op returns tensors only: an absent optional gradient (D or delta_bias not given) travels as an empty
# tensor and becomes None again in the autograd formula.

@torch.library.custom_op("nnunet_mamba::cross_selective_scan", mutates_args=())
def _cross_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, orders: Tensor, D: Optional[Tensor],
                   delta_bias: Optional[Tensor], delta_softplus: bool, backend: str, save_states: bool, chunk: int
                   ) -> Tuple[Tensor, Tensor]:
    if backend == "triton":
        return triton_kernels().cross_scan_forward(u, delta, A, B, C, orders, D, delta_bias, delta_softplus,
                                                   save_states, chunk)
    y = _gather_scan_scatter(u, delta, A, B, C, orders, D, delta_bias, delta_softplus, backend)
    return y, u.new_empty(0, dtype=y.dtype)


@_cross_scan_op.register_fake
def _(u, delta, A, B, C, orders, D, delta_bias, delta_softplus, backend, save_states, chunk):
    compute = compute_dtype(u)
    batch, _, length = u.shape
    y = position_major(u, batch, delta.shape[1] // orders.shape[0], length, compute, zero=False)
    return y, u.new_empty(chunk_states_shape(u, delta, A, backend, save_states, chunk), dtype=compute)


@torch.library.custom_op("nnunet_mamba::cross_selective_scan_backward", mutates_args=())
def _cross_scan_backward_op(grad_y: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            orders: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor], chunk_states: Tensor,
                            delta_softplus: bool, backend: str, chunk: int
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        grads = triton_kernels().cross_scan_backward(grad_y, u, delta, A, B, C, orders, D, delta_bias, chunk_states,
                                                     delta_softplus, chunk)
    else:
        grads = _gather_scan_scatter_grads(grad_y, u, delta, A, B, C, orders, D, delta_bias, delta_softplus,
                                           backend)
    return tuple(u.new_empty(0) if g is None else g for g in grads)


@_cross_scan_backward_op.register_fake
def _(grad_y, u, delta, A, B, C, orders, D, delta_bias, chunk_states, delta_softplus, backend, chunk):
    if backend == "triton":
        grads = final_grads(cross_grad_buffers(u, delta, A, B, D, delta_bias), u, delta, A, B, C, D, delta_bias)
    else:
        grads = tuple(None if t is None else t.new_empty(t.shape) for t in (u, delta, A, B, C, D, delta_bias))
    return tuple(u.new_empty(0) if g is None else g for g in grads)


def _setup_cross_scan(ctx, inputs, output) -> None:
    u, delta, A, B, C, orders, D, delta_bias, delta_softplus, backend, _, chunk = inputs
    ctx.save_for_backward(u, delta, A, B, C, orders, D, delta_bias, output[1])
    ctx.settings = (delta_softplus, backend, chunk)
    ctx.mark_non_differentiable(output[1])


def _cross_scan_grads(ctx, grad_y, _grad_states):
    u, delta, A, B, C, orders, D, delta_bias, chunk_states = ctx.saved_tensors
    grads = torch.ops.nnunet_mamba.cross_selective_scan_backward(grad_y, u, delta, A, B, C, orders, D, delta_bias,
                                                                 chunk_states, *ctx.settings)
    du, ddelta, dA, dB, dC, dD, dbias = grads
    return (du, ddelta, dA, dB, dC, None, None if D is None else dD, None if delta_bias is None else dbias,
            None, None, None, None)


_cross_scan_op.register_autograd(_cross_scan_grads, setup_context=_setup_cross_scan)
