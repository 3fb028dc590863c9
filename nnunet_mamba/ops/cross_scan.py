"""Cross (multi-direction) selective scan: one feature map scanned in several orders, outputs summed in image order.

Vision Mamba blocks read the same map as K sequences (row-major, column-major, reversed, ...), run an S6 scan per
direction with that direction's parameters, and add the K outputs back up position by position. This module
does that without K permuted copies of the input.

Order tables
    :func:`scan_orders` turns direction names into a (K, L) table: ``orders[k, t]`` is the flat position (C order,
    image order) that direction k visits at step t. A direction names the spatial axes from the slowest- to the
    fastest-varying one, optionally prefixed with ``-`` to read the whole sequence backwards. Axes are ``h, w``
    for 2D maps and ``d, h, w`` for 3D maps::

        2D   "hw" row-major (image order)   "wh" column-major   "-hw", "-wh" the same, reversed
        3D   "dhw" image order   "-dhw" reversed   "hwd" inter-slice (d fastest)   any permutation of d, h, w,
             with or without "-"

    VMamba's SS2D is ``("hw", "wh", "-hw", "-wh")``; SegMamba's ToM is ``("dhw", "-dhw", "hwd")``; Flemme's cross
    scans are axis permutations, optionally reversed.

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

Backends (``backend=`` or ``NNUNET_MAMBA_BACKEND=auto|cuda|triton|torch``)
    ``triton``  the fused kernels below: CUDA tensors, or any device in Triton's interpreter (``TRITON_INTERPRET=1``
                set before this module is imported; slow, for tests). ``auto`` picks it where selective_scan's
                ``auto`` picks its Triton backend (CUDA tensors, mamba-ssm missing): on an H100 mamba-ssm's
                kernel behind the gather/scatter path was faster (see nnunet_mamba.layers.vss).
    ``cuda``, ``torch`` (and ``auto`` elsewhere)  gather every direction's sequence, ONE
                :func:`~nnunet_mamba.ops.selective_scan` call with that backend (directions folded into channels,
                B/C grouped G = K), scatter back and sum. This is the reference semantics.

Fused kernels: layout and why
    A program owns a block of ``_BLOCK_C`` channels of one direction of one batch element and walks that
    direction's sequence in chunks of ``_CHUNK`` steps. For each chunk it gathers u, delta, B and C through the
    order table (no per-direction copy exists anywhere), solves the recurrence inside the chunk with a parallel
    associative scan over the (channel, state) x step tile, carries the N states in fp32 registers (fp64 for
    float64 inputs) from chunk to chunk, and atomically adds its output into the image-order ``y`` (K directions,
    K atomic adds per value; the summation order, hence the last bit, is not deterministic).

    A gathered read is coalesced only along an axis that is contiguous in memory at every step. Along the sequence
    that holds for one direction only (row-major reads of a row-major map); a column-major step jumps a whole row.
    Channels of one position, though, sit side by side in a position-major (channels-last) layout, whatever the
    direction, so the tile's fast axis is the channel block: ``_BLOCK_C`` fp32 channels are one 32-byte sector,
    the N states of B and C at one position 4N bytes. The kernels take any strides; the layers hand them
    position-major tensors (SS2D's depthwise conv of a channels-last map yields one) and ``y`` and every gradient
    are allocated position-major, so all directions read and write whole sectors.

    When a backward pass will follow, the forward pass stores the state entering every chunk, (batch, K * dim,
    L / _CHUNK, N), ``N / _CHUNK`` (a half for N = 16) of delta's size: memory stays O(batch * K * dim * L).
    The backward pass walks the chunks in reverse; for each it recomputes the states from the stored one, runs
    the adjoint recurrence ``g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}`` as a reverse associative scan, and forms
    the gradients of u (atomically summed over directions when u is shared), delta, A, B, C (atomic sums over
    channel blocks), D and delta_bias. Neighbouring steps' terms (the state before step t, the decay after it)
    come from gathers at t - 1 and t + 1 rather than from shifting register tiles, which Triton cannot do.

The fused path is a ``torch.library`` custom op (forward and backward, with fake implementations and an autograd
formula), so ``torch.compile(fullgraph=True)`` captures it as one opaque node. Under ``torch.compile`` the
gather/scatter path goes through the same op, since dynamo cannot trace selective_scan's backends; its backward
formula then recomputes the forward under autograd. In eager mode that path is plain autograd through
selective_scan, which keeps what its backend saves and needs no recompute.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import OrderedDict
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._C import DispatchKey, DispatchKeySet
from torch._subclasses.fake_tensor import is_fake

from .selective_scan import BACKEND_ENV, BackendUnavailableError, resolve_backend, selective_scan

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except Exception as exc:  # ImportError, or whatever a broken triton install raises
    triton = None
    _TRITON_ERROR: Optional[str] = f"{type(exc).__name__}: {exc}"
else:
    _TRITON_ERROR = None

logger = logging.getLogger("nnunet_mamba")

CROSS_SCAN_BACKENDS = ("auto", "cuda", "triton", "torch")

_AXES = {2: "hw", 3: "dhw"}
# Order tables kept per (shape, directions, device); a training run meets a handful of shapes.
_ORDER_CACHE: "OrderedDict[tuple, Tensor]" = OrderedDict()
_ORDER_CACHE_SIZE = 64

# Fused kernels' tile: channels per program, steps per chunk (powers of two). Measured on an H100 at SS2D's
# (12, 192, 80x80, K 4, N 16), forward + backward: 4 x 64 21.6 ms, 8 x 32 24.8 ms, 16 x 16 27.7 ms, 16 x 64 62.5 ms.
_BLOCK_C = 4
_CHUNK = 64
_NUM_WARPS_FWD = 4
_NUM_WARPS_BWD = 8  # the backward tile holds about twice as many live (channel, state, step) arrays


# ---- order tables ------------------------------------------------------------------------------------------------

def _parse_direction(direction: str, ndim: int) -> Tuple[Tuple[int, ...], bool]:
    """(axis permutation, slowest first; whether the sequence is reversed) of a direction name."""
    axes = _AXES[ndim]
    reverse = direction.startswith("-")
    names = direction[1:] if reverse else direction
    if sorted(names) != sorted(axes):
        raise ValueError(f"direction {direction!r} must be a permutation of {axes!r} (slowest axis first), "
                         f"optionally prefixed with '-' (reversed)")
    return tuple(axes.index(name) for name in names), reverse


def _build_orders(spatial_shape: Tuple[int, ...], directions: Tuple[str, ...], device: torch.device) -> Tensor:
    grid = torch.arange(math.prod(spatial_shape), device=device).view(spatial_shape)
    rows = []
    for direction in directions:
        permutation, reverse = _parse_direction(direction, len(spatial_shape))
        # flattening the permuted grid in C order makes the last named axis the fastest
        row = grid.permute(permutation).reshape(-1)
        rows.append(row.flip(0) if reverse else row)
    return torch.stack(rows)


def scan_orders(spatial_shape: Sequence[int], directions: Sequence[str],
                device: Optional[torch.device] = None) -> Tensor:
    """The (K, L) int64 order table of ``directions`` (see the module docstring) on a map of ``spatial_shape``.

    ``orders[k, t]`` is the C-order flat position that direction k visits at step t, so ``x[..., orders[k]]`` is
    direction k's sequence. Tables are cached per (shape, directions, device); treat them as read-only.
    """
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) not in _AXES:
        raise ValueError(f"scan orders are defined for 2D and 3D maps, got spatial shape {shape}")
    directions = tuple(directions)
    if not directions:
        raise ValueError("at least one direction is needed")
    device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():  # traced into the graph: a handful of index ops, no Python-side cache
        return _build_orders(shape, directions, device)
    key = (shape, directions, device)
    orders = _ORDER_CACHE.get(key)
    if orders is None:
        # never an inference tensor: a table first built under inference_mode may later index tensors that
        # autograd saves
        with torch.inference_mode(False):
            orders = _build_orders(shape, directions, device)
        if is_fake(orders):  # built under FakeTensorMode (memory planning): no data to keep
            return orders
        _ORDER_CACHE[key] = orders
        if len(_ORDER_CACHE) > _ORDER_CACHE_SIZE:
            _ORDER_CACHE.popitem(last=False)
    else:
        _ORDER_CACHE.move_to_end(key)
    return orders


def inverse_orders(orders: Tensor) -> Tensor:
    """Row-wise inverse permutations: ``inverse[k, orders[k, t]] = t``, so ``seq[..., inverse[k]]`` is back in
    image order. Accepts a (K, L) table or a single (L,) order."""
    positions = torch.arange(orders.shape[-1], device=orders.device).expand_as(orders)
    return torch.empty_like(orders).scatter_(-1, orders, positions)


# ---- backend choice ----------------------------------------------------------------------------------------------

def _triton_unavailable(device: torch.device) -> Optional[str]:
    if _TRITON_ERROR is not None:
        return f"triton cannot be imported: {_TRITON_ERROR}"
    if device.type != "cuda" and not _INTERPRETED:
        return (f"the tensors are on {device}; the fused Triton kernels run on CUDA tensors, or on any device in "
                f"Triton's interpreter (TRITON_INTERPRET=1 set before nnunet_mamba.ops.cross_scan is imported)")
    return None


def _resolve_backend(u: Tensor, backend: Optional[str]) -> str:
    """``triton`` for the fused kernels, else the selective_scan backend the gather/scatter path passes on."""
    choice = (backend or os.environ.get(BACKEND_ENV, "auto")).strip().lower() or "auto"
    if choice not in CROSS_SCAN_BACKENDS:
        raise ValueError(f"cross-scan backend {choice!r} ({BACKEND_ENV} or backend=) is not one of "
                         f"{', '.join(CROSS_SCAN_BACKENDS)}")
    if choice == "triton":
        # under FakeTensorMode (memory planning) only shapes are computed, on whatever device
        planning = not torch.compiler.is_compiling() and is_fake(u)
        reason = None if planning else _triton_unavailable(u.device)
        if reason is not None:
            raise BackendUnavailableError(f"cross-scan backend 'triton' was requested but {reason}. "
                                          f"Set {BACKEND_ENV}=auto or torch.")
        return "triton"
    if choice == "auto":
        # selective_scan's preference (nnunet_mamba.ops.selective_scan.AUTO_CUDA_PREFERENCE): where it picks its
        # Triton kernel, the fused ones run here; otherwise the gather/scatter path with its pick
        planning = not torch.compiler.is_compiling() and is_fake(u)  # dynamo must not trace is_fake
        choice = "torch" if planning else resolve_backend(u.device)
    return choice


def cross_scan_backend(u: Tensor, backend: Optional[str] = None) -> str:
    """What :func:`cross_selective_scan` runs for ``u``: ``triton`` (the fused kernels), else the selective_scan
    backend of its gather/scatter path (``cuda`` or ``torch``)."""
    return _resolve_backend(u, backend)


_announced = False


def _announce_fused() -> None:
    """Log once that the fused kernels run (the gather/scatter path is announced by selective_scan)."""
    global _announced
    if not _announced:
        _announced = True
        logger.info("cross selective scan: fused Triton kernels%s", " (interpreter)" if _INTERPRETED else "")


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
    name = _resolve_backend(u, backend)
    if name == "triton" and not torch.compiler.is_compiling():
        _announce_fused()
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

def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _position_major(reference: Tensor, batch: int, channels: int, length: int, dtype: torch.dtype,
                    zero: bool) -> Tensor:
    """A (batch, channels, length) tensor laid out as contiguous (batch, length, channels)."""
    make = reference.new_zeros if zero else reference.new_empty
    return make(batch, length, channels, dtype=dtype).transpose(1, 2)


def _gather_scan_scatter(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, orders: Tensor,
                         D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                         backend: str) -> Tensor:
    """The reference path: every direction's sequence gathered, one grouped selective_scan, scattered back."""
    compute = _compute_dtype(u)
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
    out = _position_major(y, batch, dim, length, compute, zero=False)
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

def _chunk_states_shape(u: Tensor, delta: Tensor, A: Tensor, backend: str, save_states: bool,
                        chunk: int) -> Tuple[int, ...]:
    if backend != "triton" or not save_states:
        return (0,)
    return (u.shape[0], delta.shape[1], -(-u.shape[2] // chunk), A.shape[1])


@torch.library.custom_op("nnunet_mamba::cross_selective_scan", mutates_args=())
def _cross_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, orders: Tensor, D: Optional[Tensor],
                   delta_bias: Optional[Tensor], delta_softplus: bool, backend: str, save_states: bool, chunk: int
                   ) -> Tuple[Tensor, Tensor]:
    if backend == "triton":
        return _triton_forward(u, delta, A, B, C, orders, D, delta_bias, delta_softplus, save_states, chunk)
    y = _gather_scan_scatter(u, delta, A, B, C, orders, D, delta_bias, delta_softplus, backend)
    return y, u.new_empty(0, dtype=y.dtype)


@_cross_scan_op.register_fake
def _(u, delta, A, B, C, orders, D, delta_bias, delta_softplus, backend, save_states, chunk):
    compute = _compute_dtype(u)
    batch, _, length = u.shape
    y = _position_major(u, batch, delta.shape[1] // orders.shape[0], length, compute, zero=False)
    return y, u.new_empty(_chunk_states_shape(u, delta, A, backend, save_states, chunk), dtype=compute)


@torch.library.custom_op("nnunet_mamba::cross_selective_scan_backward", mutates_args=())
def _cross_scan_backward_op(grad_y: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            orders: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor], chunk_states: Tensor,
                            delta_softplus: bool, backend: str, chunk: int
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        grads = _triton_backward(grad_y, u, delta, A, B, C, orders, D, delta_bias, chunk_states, delta_softplus,
                                 chunk)
    else:
        grads = _gather_scan_scatter_grads(grad_y, u, delta, A, B, C, orders, D, delta_bias, delta_softplus,
                                           backend)
    return tuple(u.new_empty(0) if g is None else g for g in grads)


@_cross_scan_backward_op.register_fake
def _(grad_y, u, delta, A, B, C, orders, D, delta_bias, chunk_states, delta_softplus, backend, chunk):
    if backend == "triton":
        grads = _final_grads(_triton_grad_buffers(u, delta, A, B, D, delta_bias), u, delta, A, B, C, D, delta_bias)
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


# ---- fused Triton kernels ----------------------------------------------------------------------------------------

def _blocks(dim: int, n_state: int) -> Tuple[int, int]:
    """(channels per program, padded state count) for the fused kernels."""
    return min(_BLOCK_C, triton.next_power_of_2(dim)), triton.next_power_of_2(n_state)


def _triton_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, orders: Tensor, D: Optional[Tensor],
                    delta_bias: Optional[Tensor], delta_softplus: bool, save_states: bool, chunk: int
                    ) -> Tuple[Tensor, Tensor]:
    compute = _compute_dtype(u)
    batch, _, length = u.shape
    n_dir = orders.shape[0]
    dim, n_state = delta.shape[1] // n_dir, A.shape[1]
    block_c, block_n = _blocks(dim, n_state)
    y = _position_major(u, batch, dim, length, compute, zero=True)
    states = u.new_empty(_chunk_states_shape(u, delta, A, "triton", save_states, chunk), dtype=compute)
    orders = orders.contiguous()
    _cross_scan_fwd_kernel[(triton.cdiv(dim, block_c), n_dir, batch)](
        u, delta, A, B, C, A if D is None else D, A if delta_bias is None else delta_bias, orders, y, states,
        length, dim, n_state, triton.cdiv(length, chunk),
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *y.stride(),
        SHARED_U=u.shape[1] == dim, HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        SAVE_STATES=save_states, BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_T=chunk, num_warps=_NUM_WARPS_FWD)
    return y, states


def _triton_grad_buffers(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, D: Optional[Tensor],
                         delta_bias: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """Gradient buffers of the fused backward pass in the compute dtype, zeroed where the kernel accumulates;
    position-major, so that the kernel's writes are whole sectors in every direction."""
    compute = _compute_dtype(u)
    batch, u_channels, length = u.shape
    n_dir, n_state = B.shape[1], A.shape[1]
    channels = delta.shape[1]
    du = _position_major(u, batch, u_channels, length, compute, zero=u_channels != channels)  # shared: summed
    ddelta = _position_major(u, batch, channels, length, compute, zero=False)
    dA = u.new_zeros(channels, n_state, dtype=compute)
    dB, dC = (u.new_zeros(batch, length, n_dir, n_state, dtype=compute).permute(0, 2, 3, 1) for _ in range(2))
    dD = None if D is None else u.new_zeros(channels, dtype=compute)
    dbias = None if delta_bias is None else u.new_zeros(channels, dtype=compute)
    return du, ddelta, dA, dB, dC, dD, dbias


def _final_grads(buffers: Tuple[Optional[Tensor], ...], *inputs: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The gradient buffers in their inputs' dtypes."""
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(buffers, inputs))


def _triton_backward(grad_y: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, orders: Tensor,
                     D: Optional[Tensor], delta_bias: Optional[Tensor], chunk_states: Tensor, delta_softplus: bool,
                     chunk: int) -> Tuple[Optional[Tensor], ...]:
    batch, _, length = u.shape
    n_dir = orders.shape[0]
    dim, n_state = delta.shape[1] // n_dir, A.shape[1]
    block_c, block_n = _blocks(dim, n_state)
    buffers = _triton_grad_buffers(u, delta, A, B, D, delta_bias)
    du, ddelta, dA, dB, dC, dD, dbias = buffers
    orders = orders.contiguous()
    _cross_scan_bwd_kernel[(triton.cdiv(dim, block_c), n_dir, batch)](
        grad_y, u, delta, A, B, C, A if D is None else D, A if delta_bias is None else delta_bias, orders,
        chunk_states, du, ddelta, dA, dB, dC, dA if D is None else dD, dA if delta_bias is None else dbias,
        length, dim, n_state, chunk_states.shape[2],
        *grad_y.stride(), *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
        *du.stride(), *ddelta.stride(), *dB.stride(), *dC.stride(),
        SHARED_U=u.shape[1] == dim, HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_T=chunk, num_warps=_NUM_WARPS_BWD)
    return _final_grads(buffers, u, delta, A, B, C, D, delta_bias)


if _TRITON_ERROR is None:
    @triton.jit
    def _linear_step(decay_first, impulse_first, decay_then, impulse_then):
        # h -> decay_first * h + impulse_first, followed by h -> decay_then * h + impulse_then
        return decay_first * decay_then, impulse_first * decay_then + impulse_then

    @triton.jit
    def _step_size(raw, SOFTPLUS: tl.constexpr):
        """dt from delta + delta_bias: softplus(raw) as torch computes it (raw above 20 passes through), with
        log1p(e) evaluated accurately (log(w) * e / (w - 1), w = 1 + e) since dt is often ~1e-3."""
        if SOFTPLUS:
            e = tl.exp(raw)
            w = 1.0 + e
            log1p = tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0))
            return tl.where(raw > 20.0, raw, log1p)
        return raw

    @triton.jit
    def _cross_scan_fwd_kernel(
            u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, orders_ptr, y_ptr, states_ptr,
            length, dim, n_state, n_chunks,
            stride_u_b, stride_u_c, stride_u_l, stride_delta_b, stride_delta_c, stride_delta_l,
            stride_A_c, stride_A_n, stride_B_b, stride_B_k, stride_B_n, stride_B_l,
            stride_C_b, stride_C_k, stride_C_n, stride_C_l, stride_y_b, stride_y_c, stride_y_l,
            SHARED_U: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
            SAVE_STATES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
        compute = y_ptr.dtype.element_ty
        direction = tl.program_id(1)
        batch = tl.program_id(2).to(tl.int64)
        # channels within the direction; int64, as channel * stride passes 2**31 in large channels-first maps
        channel = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_ok = channel < dim
        scan_channel = direction * dim + channel  # row of delta, A, D, delta_bias
        u_channel = channel if SHARED_U else scan_channel
        state = tl.arange(0, BLOCK_N)
        state_ok = state < n_state
        step = tl.arange(0, BLOCK_T)

        A = tl.load(A_ptr + scan_channel[:, None] * stride_A_c + state[None, :] * stride_A_n,
                    mask=channel_ok[:, None] & state_ok[None, :], other=0.0).to(compute)
        if HAS_D:
            D = tl.load(D_ptr + scan_channel, mask=channel_ok, other=0.0).to(compute)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + scan_channel, mask=channel_ok, other=0.0).to(compute)
        u_base = u_ptr + batch * stride_u_b + u_channel[:, None] * stride_u_c
        delta_base = delta_ptr + batch * stride_delta_b + scan_channel[:, None] * stride_delta_c
        B_base = B_ptr + batch * stride_B_b + direction * stride_B_k + state[:, None] * stride_B_n
        C_base = C_ptr + batch * stride_C_b + direction * stride_C_k + state[:, None] * stride_C_n
        y_base = y_ptr + batch * stride_y_b + channel[:, None] * stride_y_c
        states_base = (states_ptr + ((batch * tl.num_programs(1) * dim + scan_channel[:, None]) * n_chunks)
                       * n_state + state[None, :])
        block_ok = channel_ok[:, None] & state_ok[None, :]

        h = tl.zeros((BLOCK_C, BLOCK_N), dtype=compute)
        for chunk in range(n_chunks):
            t = chunk * BLOCK_T + step
            t_ok = t < length
            position = tl.load(orders_ptr + direction * length + t, mask=t_ok, other=0)
            tile_ok = channel_ok[:, None] & t_ok[None, :]
            bc_ok = state_ok[:, None] & t_ok[None, :]
            u = tl.load(u_base + position[None, :] * stride_u_l, mask=tile_ok, other=0.0).to(compute)
            raw = tl.load(delta_base + position[None, :] * stride_delta_l, mask=tile_ok, other=0.0).to(compute)
            if HAS_BIAS:
                raw += bias[:, None]
            dt = tl.where(tile_ok, _step_size(raw, SOFTPLUS), 0.0)  # dt = 0 past the end: the state holds
            B = tl.load(B_base + position[None, :] * stride_B_l, mask=bc_ok, other=0.0).to(compute)
            C = tl.load(C_base + position[None, :] * stride_C_l, mask=bc_ok, other=0.0).to(compute)
            if SAVE_STATES:  # the state entering this chunk, for the backward pass
                tl.store(states_base + chunk * n_state, h, mask=block_ok)

            decay = tl.exp(dt[:, None, :] * A[:, :, None])
            impulse = (dt * u)[:, None, :] * B[None, :, :]
            decay_run, impulse_run = tl.associative_scan(
                (tl.reshape(decay, (BLOCK_C * BLOCK_N, BLOCK_T)), tl.reshape(impulse, (BLOCK_C * BLOCK_N, BLOCK_T))),
                1, _linear_step)
            states = (tl.reshape(decay_run, (BLOCK_C, BLOCK_N, BLOCK_T)) * h[:, :, None]
                      + tl.reshape(impulse_run, (BLOCK_C, BLOCK_N, BLOCK_T)))
            y = tl.sum(states * C[None, :, :], axis=1)
            if HAS_D:
                y += D[:, None] * u
            tl.atomic_add(y_base + position[None, :] * stride_y_l, y, mask=tile_ok, sem="relaxed")
            h = tl.sum(tl.where(step[None, None, :] == BLOCK_T - 1, states, 0.0), axis=2)

    @triton.jit
    def _cross_scan_bwd_kernel(
            grad_y_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, orders_ptr, states_ptr,
            du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
            length, dim, n_state, n_chunks,
            stride_gy_b, stride_gy_c, stride_gy_l, stride_u_b, stride_u_c, stride_u_l,
            stride_delta_b, stride_delta_c, stride_delta_l, stride_A_c, stride_A_n,
            stride_B_b, stride_B_k, stride_B_n, stride_B_l, stride_C_b, stride_C_k, stride_C_n, stride_C_l,
            stride_du_b, stride_du_c, stride_du_l, stride_dd_b, stride_dd_c, stride_dd_l,
            stride_dB_b, stride_dB_k, stride_dB_n, stride_dB_l, stride_dC_b, stride_dC_k, stride_dC_n, stride_dC_l,
            SHARED_U: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
        compute = dA_ptr.dtype.element_ty
        direction = tl.program_id(1)
        batch = tl.program_id(2).to(tl.int64)
        channel = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_ok = channel < dim
        scan_channel = direction * dim + channel
        u_channel = channel if SHARED_U else scan_channel
        state = tl.arange(0, BLOCK_N)
        state_ok = state < n_state
        step = tl.arange(0, BLOCK_T)
        block_ok = channel_ok[:, None] & state_ok[None, :]

        A = tl.load(A_ptr + scan_channel[:, None] * stride_A_c + state[None, :] * stride_A_n,
                    mask=block_ok, other=0.0).to(compute)
        if HAS_D:
            D = tl.load(D_ptr + scan_channel, mask=channel_ok, other=0.0).to(compute)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + scan_channel, mask=channel_ok, other=0.0).to(compute)
        gy_base = grad_y_ptr + batch * stride_gy_b + channel[:, None] * stride_gy_c
        u_base = u_ptr + batch * stride_u_b + u_channel[:, None] * stride_u_c
        delta_base = delta_ptr + batch * stride_delta_b + scan_channel[:, None] * stride_delta_c
        B_base = B_ptr + batch * stride_B_b + direction * stride_B_k + state[:, None] * stride_B_n
        C_base = C_ptr + batch * stride_C_b + direction * stride_C_k + state[:, None] * stride_C_n
        du_base = du_ptr + batch * stride_du_b + u_channel[:, None] * stride_du_c
        dd_base = ddelta_ptr + batch * stride_dd_b + scan_channel[:, None] * stride_dd_c
        dB_base = dB_ptr + batch * stride_dB_b + direction * stride_dB_k + state[:, None] * stride_dB_n
        dC_base = dC_ptr + batch * stride_dC_b + direction * stride_dC_k + state[:, None] * stride_dC_n
        states_base = (states_ptr + ((batch * tl.num_programs(1) * dim + scan_channel[:, None]) * n_chunks)
                       * n_state + state[None, :])
        order_base = orders_ptr + direction * length

        # adjoint entering from the chunk after this one: exp(dt A) g at that chunk's first step
        carry = tl.zeros((BLOCK_C, BLOCK_N), dtype=compute)
        dA = tl.zeros((BLOCK_C, BLOCK_N), dtype=compute)
        dD = tl.zeros((BLOCK_C,), dtype=compute)
        dbias = tl.zeros((BLOCK_C,), dtype=compute)
        for reverse_chunk in range(n_chunks):
            chunk = n_chunks - 1 - reverse_chunk
            t = chunk * BLOCK_T + step
            t_ok = t < length
            prev_ok = t_ok & (step > 0)  # step t - 1 inside this chunk; the stored state stands before step 0
            next_ok = (t + 1 < length) & (step < BLOCK_T - 1)
            position = tl.load(order_base + t, mask=t_ok, other=0)
            prev_position = tl.load(order_base + t - 1, mask=prev_ok, other=0)
            next_position = tl.load(order_base + t + 1, mask=next_ok, other=0)
            tile_ok = channel_ok[:, None] & t_ok[None, :]
            prev_tile_ok = channel_ok[:, None] & prev_ok[None, :]
            next_tile_ok = channel_ok[:, None] & next_ok[None, :]
            bc_ok = state_ok[:, None] & t_ok[None, :]

            u = tl.load(u_base + position[None, :] * stride_u_l, mask=tile_ok, other=0.0).to(compute)
            raw = tl.load(delta_base + position[None, :] * stride_delta_l, mask=tile_ok, other=0.0).to(compute)
            prev_u = tl.load(u_base + prev_position[None, :] * stride_u_l, mask=prev_tile_ok, other=0.0).to(compute)
            prev_raw = tl.load(delta_base + prev_position[None, :] * stride_delta_l, mask=prev_tile_ok,
                               other=0.0).to(compute)
            next_raw = tl.load(delta_base + next_position[None, :] * stride_delta_l, mask=next_tile_ok,
                               other=0.0).to(compute)
            if HAS_BIAS:
                raw += bias[:, None]
                prev_raw += bias[:, None]
                next_raw += bias[:, None]
            dt = tl.where(tile_ok, _step_size(raw, SOFTPLUS), 0.0)
            prev_dt = tl.where(prev_tile_ok, _step_size(prev_raw, SOFTPLUS), 0.0)
            next_dt = tl.where(next_tile_ok, _step_size(next_raw, SOFTPLUS), 0.0)
            B = tl.load(B_base + position[None, :] * stride_B_l, mask=bc_ok, other=0.0).to(compute)
            prev_B = tl.load(B_base + prev_position[None, :] * stride_B_l, mask=state_ok[:, None] & prev_ok[None, :],
                             other=0.0).to(compute)
            C = tl.load(C_base + position[None, :] * stride_C_l, mask=bc_ok, other=0.0).to(compute)
            gy = tl.load(gy_base + position[None, :] * stride_gy_l, mask=tile_ok, other=0.0).to(compute)
            h0 = tl.load(states_base + chunk * n_state, mask=block_ok, other=0.0)

            # states before each step: the forward recurrence fed with step t - 1's terms, from the stored state
            decay_run, impulse_run = tl.associative_scan(
                (tl.reshape(tl.exp(prev_dt[:, None, :] * A[:, :, None]), (BLOCK_C * BLOCK_N, BLOCK_T)),
                 tl.reshape((prev_dt * prev_u)[:, None, :] * prev_B[None, :, :], (BLOCK_C * BLOCK_N, BLOCK_T))),
                1, _linear_step)
            before = (tl.reshape(decay_run, (BLOCK_C, BLOCK_N, BLOCK_T)) * h0[:, :, None]
                      + tl.reshape(impulse_run, (BLOCK_C, BLOCK_N, BLOCK_T)))
            decay = tl.exp(dt[:, None, :] * A[:, :, None])
            dtu = dt * u
            after = decay * before + dtu[:, None, :] * B[None, :, :]

            # adjoint g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}, a reverse scan; the next chunk enters at the end
            source = gy[:, None, :] * C[None, :, :] + tl.where(step[None, None, :] == BLOCK_T - 1,
                                                               carry[:, :, None], 0.0)
            _, adjoint = tl.associative_scan(
                (tl.reshape(tl.exp(next_dt[:, None, :] * A[:, :, None]), (BLOCK_C * BLOCK_N, BLOCK_T)),
                 tl.reshape(source, (BLOCK_C * BLOCK_N, BLOCK_T))),
                1, _linear_step, reverse=True)
            adjoint = tl.reshape(adjoint, (BLOCK_C, BLOCK_N, BLOCK_T))
            carry = tl.sum(tl.where(step[None, None, :] == 0, decay * adjoint, 0.0), axis=2)

            tl.atomic_add(dC_base + position[None, :] * stride_dC_l, tl.sum(gy[:, None, :] * after, axis=0),
                          mask=bc_ok, sem="relaxed")
            tl.atomic_add(dB_base + position[None, :] * stride_dB_l, tl.sum(adjoint * dtu[:, None, :], axis=0),
                          mask=bc_ok, sem="relaxed")
            grad_dtu = tl.sum(adjoint * B[None, :, :], axis=1)
            grad_decay_exponent = adjoint * before * decay  # d loss / d (dt A)
            dA += tl.sum(grad_decay_exponent * dt[:, None, :], axis=2)
            grad_dt = grad_dtu * u + tl.sum(grad_decay_exponent * A[:, :, None], axis=1)
            grad_u = grad_dtu * dt
            if HAS_D:
                grad_u += gy * D[:, None]
                dD += tl.sum(gy * u, axis=1)
            if SOFTPLUS:
                grad_dt = grad_dt * tl.where(raw > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-raw)))
            grad_dt = tl.where(tile_ok, grad_dt, 0.0)
            if HAS_BIAS:
                dbias += tl.sum(grad_dt, axis=1)
            tl.store(dd_base + position[None, :] * stride_dd_l, grad_dt, mask=tile_ok)
            if SHARED_U:
                tl.atomic_add(du_base + position[None, :] * stride_du_l, grad_u, mask=tile_ok, sem="relaxed")
            else:
                tl.store(du_base + position[None, :] * stride_du_l, grad_u, mask=tile_ok)

        tl.atomic_add(dA_ptr + scan_channel[:, None] * n_state + state[None, :], dA, mask=block_ok, sem="relaxed")
        if HAS_D:
            tl.atomic_add(dD_ptr + scan_channel, dD, mask=channel_ok, sem="relaxed")
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + scan_channel, dbias, mask=channel_ok, sem="relaxed")

    _INTERPRETED = isinstance(_cross_scan_fwd_kernel, InterpretedFunction)
else:
    _INTERPRETED = False
