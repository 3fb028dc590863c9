"""Pieces shared by the Triton kernels of the selective scan and of the cross scan."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def combine_linear(a_early, b_early, a_late, b_late):
    # composition of the affine maps h -> a_early h + b_early, then h -> a_late h + b_late: the associative
    # operator of the recurrence h_t = a_t h_{t-1} + b_t
    return a_early * a_late, a_late * b_early + b_late


@triton.jit
def softplus(x):
    # log1p(exp(x)) as torch computes it (identity above 20); log1p(e) = log(w) e / (w - 1), w = 1 + e, is
    # accurate where log(1 + e) alone would round e away (dt is often ~1e-3)
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    exact_one = w == 1.0
    log1p = tl.where(exact_one, e, tl.log(w) * (e / tl.where(exact_one, 1.0, w - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def time_step(raw, mask, SOFTPLUS: tl.constexpr):
    # dt from delta (+ bias); 0 outside ``mask`` so that padded steps leave the state unchanged
    dt = softplus(raw) if SOFTPLUS else raw
    return tl.where(mask, dt, 0.0)


@triton.jit
def load_f32(pointers, mask):
    return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)


INTERPRETED = isinstance(combine_linear, InterpretedFunction)
"""Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when triton was imported): on CPU tensors
too, slowly."""
VERSION = triton.__version__
