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
from collections.abc import Iterator

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

def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, orders: Tensor, D: Tensor | None,
                  delta_bias: Tensor | None) -> None:
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
                         D: Tensor | None = None, delta_bias: Tensor | None = None,
                         delta_softplus: bool = False, backend: str | None = None) -> Tensor:
    """Selective scans of K directions of one map, summed in image order; see the module docstring.

    ``orders`` comes from :func:`scan_orders`. Returns y (batch, dim, L), float32 (float64 for float64 ``u``),
    position-major. ``backend`` overrides the environment's choice for this call.
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

def folded_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None,
                          delta_softplus: bool = False, backend: str | None = None) -> Tensor:
    """K directions' selective scans as ONE :func:`~nnunet_mamba.ops.selective_scan` call.

    Every direction's sequence is already in its own scan order: u, delta and z (batch, K, dim, L), B and C
    (batch, K, N, L); A (K * dim, N), D and delta_bias (K * dim,) direction-major. The directions are folded into
    the channels (K * dim channels, B/C grouped, one group per direction), so one kernel launch serves them all.
    Returns (batch, K, dim, L) in scan order, in u's dtype (the scan computes in float32 whatever it is).
    """
    batch, k, dim, length = u.shape

    def fold(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(batch, k * dim, length)

    y = selective_scan(fold(u), fold(delta), A, B, C, D, z=fold(z), delta_bias=delta_bias,
                       delta_softplus=delta_softplus, backend=backend)
    return y.view(batch, k, dim, length)


def _in_scan_order(x: Tensor, orders: Tensor) -> Tensor:
    """(batch, K * rows, L) -> (batch, K, rows, L), row block k read in direction k's order."""
    n_dir, length = orders.shape
    x = x.reshape(x.shape[0], n_dir, -1, length)
    return torch.gather(x, 3, orders.view(1, n_dir, 1, length).expand(*x.shape))


def _shared_in_scan_order(u: Tensor, orders: Tensor) -> Tensor:
    """(batch, dim, L) shared by all directions -> (batch, K, dim, L): one read of u per direction."""
    return u[:, :, orders].transpose(1, 2)


def _merged_in_image_order(y_scan: Tensor, orders: Tensor) -> Tensor:
    """(batch, K, dim, L) in scan order -> their sum in image order, position-major (batch, dim, L)."""
    batch, n_dir, dim, length = y_scan.shape
    inverse = inverse_orders(orders).view(1, n_dir, 1, length).expand(batch, n_dir, dim, length)
    y = torch.gather(y_scan, 3, inverse).sum(1)
    out = position_major(y, batch, dim, length, y.dtype, zero=False)
    out.copy_(y)
    return out


def _gather_scan_scatter(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, orders: Tensor,
                         D: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                         backend: str) -> Tensor:
    """The reference path: every direction's sequence gathered, one folded selective scan, scattered back."""
    compute = compute_dtype(u)
    shared = u.shape[1] == delta.shape[1] // orders.shape[0]
    u_scan = _shared_in_scan_order(u.to(compute), orders) if shared else _in_scan_order(u.to(compute), orders)
    y_scan = folded_selective_scan(u_scan, _in_scan_order(delta.to(compute), orders), A,
                                   _in_scan_order(B.to(compute), orders), _in_scan_order(C.to(compute), orders), D,
                                   delta_bias=delta_bias, delta_softplus=delta_softplus, backend=backend)
    return _merged_in_image_order(y_scan, orders)


def projected_cross_scan(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, A: Tensor, D: Tensor | None,
                         delta_bias: Tensor | None, orders: Tensor, backend: str | None = None) -> Tensor:
    """Mamba's per-direction projections and the cross scan of one image-order map (SS2D, Flemme's Mamba block).

    x (batch, dim, L) in image order, shared by the K directions; x_proj_weight (K, R + 2N, dim) gives direction
    k's (dt, B, C) per token, dt_projs_weight (K, dim, R) its delta from dt; A (K * dim, N); D and delta_bias
    (K * dim,); softplus on delta. Returns what :func:`cross_selective_scan` returns for these inputs.

    Where the fused kernels run, the projections are computed in image order and the kernels read every direction
    through the order table. Elsewhere the directions' copies of x are made once and projected (per token, so
    equal to gathering projections, which would copy dt, B and C too), then scanned by one folded selective scan
    and merged back: the faster way with mamba-ssm's kernel (docs/measurements.md).
    """
    if cross_scan_backend(x, backend) == "triton":
        return _projected_fused(x, x_proj_weight, dt_projs_weight, A, D, delta_bias, orders, backend)
    return _projected_copies(x, x_proj_weight, dt_projs_weight, A, D, delta_bias, orders, backend)


def _projected_fused(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, A: Tensor, D: Tensor | None,
                     delta_bias: Tensor | None, orders: Tensor, backend: str | None) -> Tensor:
    batch, dim, length = x.shape
    k, rank = dt_projs_weight.shape[0], dt_projs_weight.shape[2]
    n = (x_proj_weight.shape[1] - rank) // 2
    # tokens (batch, L, dim): a view for a position-major x, so the gathers read whole channel blocks; every
    # direction's dt, B, C in one matmul, (batch, L, K, R + 2N)
    tokens = x.transpose(1, 2)
    x_dbl = (tokens @ x_proj_weight.reshape(k * (rank + 2 * n), dim).t()).view(batch, length, k, -1)
    dts, Bs, Cs = torch.split(x_dbl, [rank, n, n], dim=-1)
    dts = torch.einsum("blkr,kdr->blkd", dts, dt_projs_weight).reshape(batch, length, k * dim)
    return cross_selective_scan(x, dts.transpose(1, 2), A, Bs.permute(0, 2, 3, 1), Cs.permute(0, 2, 3, 1), orders,
                                D, delta_bias, delta_softplus=True, backend=backend)


def _projected_copies(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, A: Tensor, D: Tensor | None,
                      delta_bias: Tensor | None, orders: Tensor, backend: str | None) -> Tensor:
    rank = dt_projs_weight.shape[2]
    n = (x_proj_weight.shape[1] - rank) // 2
    xs = _shared_in_scan_order(x, orders)  # (batch, K, dim, L), each direction in its order
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [rank, n, n], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight)
    compute = compute_dtype(x)  # float32 output, as the fused path's
    y_scan = folded_selective_scan(xs.to(compute), dts.to(compute), A, Bs.to(compute), Cs.to(compute), D,
                                   delta_bias=delta_bias, delta_softplus=True, backend=backend)
    return _merged_in_image_order(y_scan, orders)


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
                               orders: Tensor, D: Tensor | None, delta_bias: Tensor | None,
                               delta_softplus: bool, backend: str) -> tuple[Tensor | None, ...]:
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
def _cross_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, orders: Tensor, D: Tensor | None,
                   delta_bias: Tensor | None, delta_softplus: bool, backend: str, save_states: bool, chunk: int
                   ) -> tuple[Tensor, Tensor]:
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
                            orders: Tensor, D: Tensor | None, delta_bias: Tensor | None, chunk_states: Tensor,
                            delta_softplus: bool, backend: str, chunk: int
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
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
