"""Position-major tensors of the cross scan: its output and the fused kernels' gradient buffers.

Shared by the op's fake implementations (:mod:`nnunet_mamba.ops.cross_scan`, no triton needed) and the fused
kernels' launchers (:mod:`nnunet_mamba.ops.triton.cross_scan`).
"""
from __future__ import annotations


import torch
from torch import Tensor


def compute_dtype(u: Tensor) -> torch.dtype:
    """What the cross scan computes and returns in: float64 for float64 ``u``, else float32."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def position_major(reference: Tensor, batch: int, channels: int, length: int, dtype: torch.dtype,
                   zero: bool) -> Tensor:
    """A (batch, channels, length) tensor laid out as contiguous (batch, length, channels)."""
    make = reference.new_zeros if zero else reference.new_empty
    return make(batch, length, channels, dtype=dtype).transpose(1, 2)


def chunk_states_shape(u: Tensor, delta: Tensor, A: Tensor, backend: str, save_states: bool,
                       chunk: int) -> tuple[int, ...]:
    """Shape of the fused kernels' chunk-start states: (batch, K * dim, chunks, N), or (0,) when none are kept."""
    if backend != "triton" or not save_states:
        return (0,)
    return (u.shape[0], delta.shape[1], -(-u.shape[2] // chunk), A.shape[1])


def cross_grad_buffers(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, D: Tensor | None,
                       delta_bias: Tensor | None) -> tuple[Tensor | None, ...]:
    """Gradient buffers of the fused backward pass in the compute dtype, zeroed where the kernel accumulates;
    position-major, so that the kernel's writes are whole sectors in every direction."""
    compute = compute_dtype(u)
    batch, u_channels, length = u.shape
    n_dir, n_state = B.shape[1], A.shape[1]
    channels = delta.shape[1]
    du = position_major(u, batch, u_channels, length, compute, zero=u_channels != channels)  # shared: summed
    ddelta = position_major(u, batch, channels, length, compute, zero=False)
    dA = u.new_zeros(channels, n_state, dtype=compute)
    dB, dC = (u.new_zeros(batch, length, n_dir, n_state, dtype=compute).permute(0, 2, 3, 1) for _ in range(2))
    dD = None if D is None else u.new_zeros(channels, dtype=compute)
    dbias = None if delta_bias is None else u.new_zeros(channels, dtype=compute)
    return du, ddelta, dA, dB, dC, dD, dbias


def final_grads(buffers: tuple[Tensor | None, ...], *inputs: Tensor | None) -> tuple[Tensor | None, ...]:
    """The gradient buffers in their inputs' dtypes."""
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(buffers, inputs))
