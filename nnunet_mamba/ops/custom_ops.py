"""Helpers shared by the selective-scan backends' ``torch.library`` custom ops.

Each backend's forward and backward pass is one custom op. A custom op returns tensors only, so an absent optional
gradient (D, z or delta_bias not given) travels as an empty tensor and becomes None again in the autograd formula.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable

import torch
from torch import Tensor

# the tensors every scan op takes first, in this order: u, delta, A, B, C, D, z, delta_bias
SCAN_INPUTS = 8

ScanOutput = Tensor | tuple[Tensor, Tensor]


def grouped(t: Tensor) -> Tensor:
    """B or C as (batch, G, N, L): a 3D (batch, N, L) tensor is one group."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def as_op_outputs(grads: tuple, like: Tensor) -> tuple:
    """The 8 input gradients as a backward op returns them: contiguous, absent ones as empty tensors."""
    return tuple(like.new_empty(0) if g is None else g.contiguous() for g in grads)


def from_op_outputs(grads: tuple, D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None) -> tuple:
    """A backward op's 8 outputs as autograd gradients: None for the inputs that were not given."""
    present = (True,) * 5 + (D is not None, z is not None, delta_bias is not None)
    return tuple(g if given else None for g, given in zip(grads, present))


def fake_input_grads(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                     z: Tensor | None, delta_bias: Tensor | None) -> tuple:
    """What a backward op's fake implementation returns: the gradients' shapes, empty for absent inputs."""
    return tuple(u.new_empty(0) if t is None else t.new_empty(t.shape) for t in (u, delta, A, B, C, D, z, delta_bias))


def register_scan_autograd(forward_op: Any, backward_name: str, settings: Callable[[tuple], tuple]) -> None:
    """Autograd for a forward op returning ``(out, last state, saved states)`` whose backward op
    ``torch.ops.nnunet_mamba.<backward_name>`` takes ``(grad_out, grad_last, the 8 inputs, saved states,
    *settings(forward inputs))``. The saved states are not differentiable."""

    def setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:SCAN_INPUTS], output[2])
        ctx.settings = settings(inputs)
        ctx.extra_inputs = len(inputs) - SCAN_INPUTS
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)

    def grads(ctx, grad_out: Tensor | None, grad_last: Tensor | None, _grad_states) -> tuple:
        *inputs, states = ctx.saved_tensors
        u, D, z, delta_bias = inputs[0], inputs[5], inputs[6], inputs[7]
        backward = getattr(torch.ops.nnunet_mamba, backward_name)
        result = backward(torch.zeros_like(u) if grad_out is None else grad_out, grad_last, *inputs, states,
                          *ctx.settings)
        return (*from_op_outputs(result, D, z, delta_bias), *[None] * ctx.extra_inputs)

    forward_op.register_autograd(grads, setup_context=setup)
