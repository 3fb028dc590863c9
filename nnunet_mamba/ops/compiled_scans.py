"""The compiled selective-scan backends as ``torch.library`` custom ops: ``cuda`` (mamba-ssm's kernel) and
``triton`` (ours, :mod:`nnunet_mamba.ops.triton`).

``cuda`` wraps mamba-ssm's compiled ``selective_scan_cuda.fwd``/``bwd``, not its autograd function; as in
mamba-ssm, no gradient flows back from the last state. ``triton`` runs on CUDA tensors, or any tensors in Triton's
interpreter (``TRITON_INTERPRET=1`` set before triton is imported; slow, for tests); inputs float32, bfloat16 or
float16, state and sums in float32, memory O(batch * dim * L): only the state at every chunk start is kept for the
backward pass, which recomputes each chunk. Neither module-level code here imports mamba-ssm or triton: the
kernels are loaded by :mod:`nnunet_mamba.ops.backend` when a call first needs them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .backend import check_available, mamba_ssm_kernels, triton_kernels
from .custom_ops import (ScanOutput, as_op_outputs, fake_input_grads, from_op_outputs, grouped,
                         register_scan_autograd)

# Input dtypes of the triton backend (it computes in float32 whatever they are).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# mamba-ssm's kernel saves its state every 2048 steps: (batch, dim, chunks, 2N) float32 (see its selective_scan.cpp)
_MAMBA_SSM_CHUNK = 2048


def _last_dim_contiguous(t: Tensor | None) -> Tensor | None:
    # what mamba-ssm's kernel asks of u, delta, B, C, z and dout; other strides it takes as they are
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("nnunet_mamba::selective_scan_cuda_fwd", mutates_args=())
def _cuda_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                   z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``(out before the gate, saved states x, gated out)``; the gated out is empty without z."""
    out, x, *gated = mamba_ssm_kernels().fwd(
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
def _cuda_scan_bwd(grad_out: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                   z: Tensor | None, delta_bias: Tensor | None, x: Tensor, out: Tensor | None,
                   delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # the kernel returns (du, ddelta, dA, dB, dC, dD, ddelta_bias[, dz]); dz is allocated by it (None), and the
    # last argument would make it recompute the gated output, which nothing here needs
    du, ddelta, dA, dB, dC, dD, dbias, *dz = mamba_ssm_kernels().bwd(
        *map(_last_dim_contiguous, (u, delta)), A, *map(_last_dim_contiguous, (B, C)), D, _last_dim_contiguous(z),
        delta_bias, _last_dim_contiguous(grad_out), x, out, None, delta_softplus, False)
    return as_op_outputs((du, ddelta, dA, dB, dC, dD if D is not None else None, dz[0] if dz else None,
                           dbias if delta_bias is not None else None), u)


@_cuda_scan_bwd.register_fake
def _(grad_out, u, delta, A, B, C, D, z, delta_bias, x, out, delta_softplus):
    return fake_input_grads(u, delta, A, B, C, D, z, delta_bias)


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
    return (*from_op_outputs(grads, D, z, delta_bias), None)


_cuda_scan_fwd.register_autograd(_cuda_scan_grads, setup_context=_setup_cuda_scan)


def selective_scan_cuda(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                        z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                        return_last_state: bool = False) -> ScanOutput:
    """The ``cuda`` backend: mamba-ssm's kernel (CUDA tensors). As in mamba-ssm, no gradient flows back from the
    last state."""
    check_available("cuda", u.device)
    as_float32 = lambda t: None if t is None else t.float()  # noqa: E731
    out, x, gated = torch.ops.nnunet_mamba.selective_scan_cuda_fwd(
        u, delta, A.float(), grouped(B), grouped(C), as_float32(D), z, as_float32(delta_bias), delta_softplus)
    result = gated if z is not None else out
    # x holds (running decay product, state) pairs per chunk: the states are the odd entries of the last chunk
    return (result, x[:, :, -1, 1::2]) if return_last_state else result


@torch.library.custom_op("nnunet_mamba::selective_scan_triton_fwd", mutates_args=())
def _triton_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                     z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, save_states: bool,
                     block_l: int, block_d: int, num_warps: int, bwd_block_l: int, bwd_block_d: int,
                     bwd_num_warps: int, fwd_rows: bool) -> tuple[Tensor, Tensor, Tensor]:
    kernels = triton_kernels()
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
def _triton_scan_bwd(grad_out: Tensor, grad_last: Tensor | None, u: Tensor, delta: Tensor, A: Tensor,
                     B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
                     states: Tensor, delta_softplus: bool, block_l: int, block_d: int, num_warps: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # only the backward kernel runs: its chunk length, channels per program and warps
    kernels = triton_kernels()
    config = kernels.ScanConfig(block_l, block_d, num_warps, block_l, block_d, num_warps)
    return as_op_outputs(kernels.scan_backward(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, states,
                                                delta_softplus, config), u)


@_triton_scan_bwd.register_fake
def _(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, block_l, block_d,
      num_warps):
    return fake_input_grads(u, delta, A, B, C, D, z, delta_bias)


# inputs 8: delta_softplus; 13-15: the backward kernel's chunk length, channels per program and warps
register_scan_autograd(_triton_scan_fwd, "selective_scan_triton_bwd", lambda inputs: (inputs[8], *inputs[13:16]))


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                          return_last_state: bool = False,
                          config: Any | None = None) -> ScanOutput:
    """The Triton backend: CUDA tensors (any device under TRITON_INTERPRET=1), inputs in :data:`TRITON_DTYPES`.

    ``config`` (a :class:`nnunet_mamba.ops.triton.ScanConfig`) overrides the block sizes that
    :func:`~nnunet_mamba.ops.triton.default_config` picks for the shape; for tuning.
    """
    check_available("triton", u.device)
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in TRITON_DTYPES:
            raise TypeError(f"the triton selective-scan backend takes {', '.join(map(str, TRITON_DTYPES))} "
                            f"inputs, got {name} of {t.dtype}; use the torch backend for other dtypes")
    kernels = triton_kernels()
    if config is None:
        groups = grouped(B).shape[1]
        config = kernels.default_config(u.shape[1] // groups, u.shape[2], A.shape[1], u.shape[0] * groups)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    as_float32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    out, last, _ = torch.ops.nnunet_mamba.selective_scan_triton_fwd(
        u, delta, as_float32(A), B, C, as_float32(D), z, as_float32(delta_bias), delta_softplus, save_states,
        config.block_l, config.block_d, config.num_warps, config.bwd_block_l, config.bwd_block_d,
        config.bwd_num_warps, config.fwd_rows)
    return (out, last) if return_last_state else out
