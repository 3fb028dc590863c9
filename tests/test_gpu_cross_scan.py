"""The fused cross-scan kernels against the gather/scatter path on a CUDA device at realistic sizes (skipped where
there is no GPU or no triton). Timings and a tile sweep: nnunet_mamba.cli.benchmark_kernels.cross_scan_tile_sweep."""
import math

import pytest
import torch
from helpers import relative_error

from nnunet_mamba.layers.tom import DIRECTIONS as TOM_DIRECTIONS
from nnunet_mamba.layers.tom import ORDER_NAMES as TOM_ORDER_NAMES
from nnunet_mamba.layers.vss import SCAN_DIRECTIONS, SS2D
from nnunet_mamba.ops import cross_selective_scan, cuda_backend_status, scan_orders
from nnunet_mamba.ops.backend import triton_kernels

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or triton_kernels() is None,
                                 reason="needs CUDA and triton")]

TOM = tuple(TOM_ORDER_NAMES[d] for d in TOM_DIRECTIONS)
# The gather/scatter path with mamba-ssm's kernel where it is installed, else with the pure-PyTorch scan.
REFERENCE = "cuda" if cuda_backend_status()[0] else "torch"
# name: (batch, dim, spatial shape, directions, N, u shared, position-major layout). SS2D at Swin-UMamba's first
# stage (d_inner 192 on an 80x80 map, as the layer lays it out); ToM at SegResMamba's 32^3 stage with the per-direction
# u it would pass (channels-first, as its conv1d leaves it) and with a shared u.
SHAPES = {
    "ss2d": (12, 192, (80, 80), SCAN_DIRECTIONS, 16, True, True),
    "tom_per_direction": (2, 96, (32, 32, 32), TOM, 16, False, False),
    "tom_shared": (2, 96, (32, 32, 32), TOM, 16, True, True),
}


def make_inputs(batch, dim, spatial, directions, n, shared, position_major, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k, length = len(directions), math.prod(spatial)

    def rand(b, channels, scale=1.0):  # (b, channels, L), laid out as the layers would
        if position_major:
            return (scale * torch.randn(b, length, channels, device="cuda", generator=g)).transpose(1, 2)
        return scale * torch.randn(b, channels, length, device="cuda", generator=g)

    # dt = softplus(delta + bias) around mamba's initial range [1e-3, 1e-1]; A = -(1..N), S4D-real
    dt = torch.exp(torch.rand(k * dim, device="cuda", generator=g) * (math.log(0.1) - math.log(1e-3))
                   + math.log(1e-3))
    inputs = dict(u=rand(batch, dim if shared else k * dim), delta=rand(batch, k * dim, scale=0.1),
                  A=-torch.arange(1, n + 1, device="cuda", dtype=torch.float32).repeat(k * dim, 1),
                  B=rand(batch, k * n).unflatten(1, (k, n)), C=rand(batch, k * n).unflatten(1, (k, n)),
                  D=torch.randn(k * dim, device="cuda", generator=g), delta_bias=dt + torch.log(-torch.expm1(-dt)))
    return {name: t.requires_grad_() for name, t in inputs.items()}, scan_orders(spatial, directions, device="cuda")


def run(inputs, orders, backend):
    for t in inputs.values():
        t.grad = None
    y = cross_selective_scan(*(inputs[k] for k in ("u", "delta", "A", "B", "C")), orders, inputs["D"],
                             inputs["delta_bias"], True, backend=backend)
    weight = torch.randn(y.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    (y * weight).sum().backward()
    return y.detach(), {name: t.grad.clone() for name, t in inputs.items()}


@pytest.mark.parametrize("name", list(SHAPES))
def test_fused_kernels_equal_the_gather_scatter_path(name):
    inputs, orders = make_inputs(*SHAPES[name])
    y, grads = run(inputs, orders, "triton")
    y_ref, grads_ref = run(inputs, orders, REFERENCE)
    assert relative_error(y, y_ref) < 1e-4
    for key in inputs:
        assert relative_error(grads[key], grads_ref[key]) < 1e-3, key


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "fp16_autocast"])
def test_ss2d_fused_equals_the_copied_path(monkeypatch, autocast):
    """SS2D's two formulations (nnunet_mamba.layers.vss): fused Triton cross scan vs copies + one selective scan.
    In float32 they agree to rounding; under fp16 autocast their matmuls round differently (x_proj in image order
    vs in scan order), so only the output is compared, more loosely."""
    torch.manual_seed(0)
    m = SS2D(96).cuda()  # d_inner 192: Swin-UMamba's first stage
    x = torch.randn(12, 80, 80, 96, device="cuda")
    results = {}
    for backend in ("triton", REFERENCE):
        monkeypatch.setenv("NNUNET_MAMBA_BACKEND", backend)
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            y = m(x)
        y.float().square().mean().backward()
        results[backend] = y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    (y, grads), (y_ref, grads_ref) = results["triton"], results[REFERENCE]
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    if autocast:
        assert relative_error(y, y_ref) < 2e-2  # fp16 outputs of out_proj
        return
    assert relative_error(y, y_ref) < 1e-4
    for key in grads:
        assert relative_error(grads[key], grads_ref[key]) < 1e-3, key
