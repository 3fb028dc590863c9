"""FlopCounterMode counts the selective-scan custom ops by nnunet_mamba.ops.flops' formulas (CPU only)."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import nnunet_mamba
from nnunet_mamba.cli import benchmark_step
from nnunet_mamba.ops import cross_selective_scan, scan_orders, selective_scan
from nnunet_mamba.ops.flops import SCAN_OPS, register_scan_flops

BATCH, DIM, LENGTH, N = 2, 8, 10, 4
# 9 * batch * L * dim * N, plus batch * dim * L for each of D and z
SCAN = 9 * BATCH * LENGTH * DIM * N
PER_EXTRA = BATCH * DIM * LENGTH


def _inputs(requires_grad: bool = False):
    torch.manual_seed(0)
    tensors = dict(u=torch.randn(BATCH, DIM, LENGTH), delta=torch.randn(BATCH, DIM, LENGTH),
                   A=-torch.rand(DIM, N) - 0.5, B=torch.randn(BATCH, N, LENGTH), C=torch.randn(BATCH, N, LENGTH),
                   D=torch.randn(DIM), z=torch.randn(BATCH, DIM, LENGTH), delta_bias=torch.randn(DIM))
    return {k: v.requires_grad_(requires_grad) for k, v in tensors.items()}


def _per_op(counter: FlopCounterMode) -> dict:
    return {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("with_D,with_z", [(False, False), (True, False), (False, True), (True, True)])
def test_selective_scan_forward_counts_the_formula(with_D, with_z):
    t = _inputs()
    with FlopCounterMode(display=False) as counter:
        selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"] if with_D else None,
                       z=t["z"] if with_z else None, delta_bias=t["delta_bias"], delta_softplus=True,
                       backend="torch")
    assert counter.get_total_flops() == SCAN + PER_EXTRA * (with_D + with_z)


def test_backward_counts_twice_the_forward():
    t = _inputs(requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], z=t["z"],
                             delta_bias=t["delta_bias"], delta_softplus=True, backend="torch")
        out.sum().backward()
    forward = SCAN + 2 * PER_EXTRA
    assert _per_op(counter) == {"selective_scan_torch_fwd": forward, "selective_scan_torch_bwd": 2 * forward}


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_backends_ops_count_the_formula_from_their_own_argument_layouts(backend):
    """The GPU backends' ops, run on fake tensors (shapes only), as their autograd formulas call them."""
    if not hasattr(torch.ops.nnunet_mamba, f"selective_scan_{backend}_fwd"):
        pytest.skip(f"no {backend} scan op defined")
    ops = torch.ops.nnunet_mamba
    with FakeTensorMode():
        t = _inputs()
        B, C = t["B"][:, None], t["C"][:, None]  # grouped, as the backends' wrappers pass them
        args = (t["u"], t["delta"], t["A"], B, C, t["D"], t["z"], t["delta_bias"])
        with FlopCounterMode(display=False) as counter:
            if backend == "triton":
                _, _, states = ops.selective_scan_triton_fwd(*args, True, True, 16, 16, 4, 128, 1, 1, False)
                ops.selective_scan_triton_bwd(t["u"], None, *args, states, True, 128, 1, 1)
            else:
                out, x, _ = ops.selective_scan_cuda_fwd(*args, True)
                ops.selective_scan_cuda_bwd(t["u"], *args, x, out, True)
    forward = SCAN + 2 * PER_EXTRA
    assert _per_op(counter) == {f"selective_scan_{backend}_fwd": forward, f"selective_scan_{backend}_bwd": 2 * forward}


def test_cross_scan_counts_a_scan_of_k_times_dim_channels():
    torch.manual_seed(0)
    k, shape = 4, (3, 5)
    length = shape[0] * shape[1]
    orders = scan_orders(shape, ("hw", "wh", "-hw", "-wh"))
    u = torch.randn(BATCH, DIM, length)  # shared by the K directions
    delta = torch.randn(BATCH, k * DIM, length, requires_grad=True)
    A, D = -torch.rand(k * DIM, N) - 0.5, torch.randn(k * DIM)
    B, C = torch.randn(BATCH, k, N, length), torch.randn(BATCH, k, N, length)
    expected = 9 * BATCH * length * k * DIM * N + BATCH * k * DIM * length
    with FlopCounterMode(display=False) as counter:  # eager: one grouped selective_scan of the K * dim channels
        cross_selective_scan(u, delta, A, B, C, orders, D, delta_softplus=True, backend="torch")
    assert _per_op(counter) == {"selective_scan_torch_fwd": expected}
    # the custom op (torch.compile's and the triton backend's path) counts once, not again for the scan inside it
    with FlopCounterMode(display=False) as counter:
        y, _ = torch.ops.nnunet_mamba.cross_selective_scan(u, delta, A, B, C, orders, D, None, True, "torch", False,
                                                           64)
        y.sum().backward()
    assert _per_op(counter) == {"cross_selective_scan": expected, "cross_selective_scan_backward": 2 * expected}


def test_every_nnunet_mamba_op_has_a_formula():
    defined = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
               if name.startswith("nnunet_mamba::")}
    assert defined <= {name for name, _ in SCAN_OPS}
    assert {str(op).split(".")[-1] for op in register_scan_flops()} == defined


def test_benchmark_gflops_count_the_scan_on_top_of_twice_the_gmacs():
    plan = dict(input_channels=1, n_stages=4, features_per_stage=[8, 16, 32, 32], conv_op=nn.Conv2d,
                kernel_sizes=[[3, 3]] * 4, strides=[[1, 1]] + [[2, 2]] * 3, n_conv_per_stage=[2, 2, 2, 2],
                num_classes=3, n_conv_per_stage_decoder=[2, 2, 2], conv_bias=True, norm_op=nn.InstanceNorm2d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                deep_supervision=True)
    torch.manual_seed(0)
    network = nnunet_mamba.create_network("umamba_bot", **plan)
    row = benchmark_step.measure_network(network, [40, 24], 1, 3, torch.device("cpu"), steps=1, warmup=0,
                                    compile_network=False)
    # the bottleneck's Mamba layer: 32 channels, d_inner 64, N 16, a 5 x 3 map (L 15), D and the z gate
    scan = 9 * 15 * 64 * 16 + 2 * 64 * 15
    assert row["gmacs"] > 0
    assert (row["gflops"] - 2 * row["gmacs"]) * 1e9 == pytest.approx(scan, abs=1)
