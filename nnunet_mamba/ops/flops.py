"""FLOP formulas of the selective-scan custom ops, for ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode cannot see inside a custom op and counts one only through a formula registered for it, so without
these a network's count leaves its scans out.

Convention: the Mamba authors' estimate (state-spaces/mamba#110, as VMamba's ``flops_selective_scan_fn`` writes
it). A forward selective scan with real A and input-dependent B and C, of u (batch, dim, L) and N states, costs::

    9 * batch * L * dim * N  +  batch * dim * L if D is given  +  batch * dim * L if z is given

FLOPs; softplus, delta_bias and casts are not counted. A backward pass is counted as twice its forward pass, a
convention rather than a count of what the backward kernels do. The cross scan
(:func:`~nnunet_mamba.ops.cross_scan.cross_selective_scan`, K directions of a dim-channel map) is counted as one
selective scan of its K * dim channels; its gathers and its sum over the directions are not counted.

Importing this module registers the formula of every op in :data:`SCAN_OPS` that is defined by then;
:func:`register_scan_flops` registers ops defined later. Formulas must be registered before a FlopCounterMode is
constructed: it copies the registry.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from . import cross_scan, selective_scan  # noqa: F401  (importing them defines the ops)

# The selective-scan custom ops of the nnunet_mamba namespace, each with its cost in forward passes. An op that is
# not defined is skipped. Formulas find their inputs by the names in the op's schema: delta (batch, channels, L),
# A (channels, N), and, where the op takes them, D and z.
SCAN_OPS: tuple[tuple[str, int], ...] = (
    ("selective_scan_torch_fwd", 1), ("selective_scan_torch_bwd", 2),
    ("selective_scan_triton_fwd", 1), ("selective_scan_triton_bwd", 2),
    ("selective_scan_cuda_fwd", 1), ("selective_scan_cuda_bwd", 2),
    ("cross_selective_scan", 1), ("cross_selective_scan_backward", 2),
)

_registered: dict[str, torch._ops.OpOverloadPacket] = {}


def selective_scan_flops(batch: int, dim: int, length: int, n_state: int, with_D: bool = False,
                         with_z: bool = False) -> int:
    """FLOPs of one forward selective scan, by the convention of the module docstring."""
    return 9 * batch * length * dim * n_state + batch * dim * length * (int(with_D) + int(with_z))


def _given(shape: Sequence[int] | None) -> bool:
    # an absent optional input reaches an op as None or, from some callers, as an empty tensor
    return shape is not None and math.prod(shape) > 0


def _formula(arg_names: Sequence[str], passes: int) -> Callable[..., int]:
    """A formula for an op with these argument names; FlopCounterMode hands it the arguments' shapes."""
    def flops(*args, out_shape=None, **kwargs) -> int:
        shapes = {**dict(zip(arg_names, args)), **kwargs}
        batch, channels, length = shapes["delta"]
        return passes * selective_scan_flops(batch, channels, length, shapes["A"][1], _given(shapes.get("D")),
                                             _given(shapes.get("z")))
    return flops


def register_scan_flops() -> frozenset[torch._ops.OpOverloadPacket]:
    """Register a formula for every op of :data:`SCAN_OPS` defined now that has none yet; returns all the ops
    registered so far (to tell the scans' share in ``FlopCounterMode.get_flop_counts()``)."""
    for name, passes in SCAN_OPS:
        if name in _registered or not hasattr(torch.ops.nnunet_mamba, name):
            continue
        op = getattr(torch.ops.nnunet_mamba, name)
        arg_names = [a.name for a in op.default._schema.arguments]
        if not {"delta", "A"} <= set(arg_names):
            raise ValueError(f"nnunet_mamba::{name} has no arguments named delta and A to count FLOPs from: "
                             f"{arg_names}")
        register_flop_formula(op)(_formula(arg_names, passes))
        _registered[name] = op
    return frozenset(_registered.values())


register_scan_flops()
