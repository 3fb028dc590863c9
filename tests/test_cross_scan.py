"""Cross (multi-direction) selective scan: order tables, the gather/scatter path against a per-direction loop,
the fused Triton kernels (in Triton's interpreter, in a subprocess) against the gather/scatter path, compilation,
and SS2D on top of it against its former multi-copy formulation."""
import functools
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import distinct_ss2d, relative_error as _relative_error
from torch._subclasses.fake_tensor import FakeTensorMode

import nnunet_mamba
import nnunet_mamba.ops.cross_scan as cross_scan
from nnunet_mamba.ops.backend import triton_interpreted, triton_kernels
from nnunet_mamba.layers.tom import DIRECTIONS as TOM_DIRECTIONS
from nnunet_mamba.layers.tom import ORDER_NAMES as TOM_ORDER_NAMES
from nnunet_mamba.layers.vss import SCAN_DIRECTIONS, SS2D
from nnunet_mamba.ops import BackendUnavailableError, selective_scan_reference
from nnunet_mamba.ops import cross_selective_scan, inverse_orders, scan_orders

ALL_2D = ("hw", "wh", "-hw", "-wh")
ALL_3D = tuple(sign + "".join(p) for sign in ("", "-") for p in itertools.permutations("dhw"))
TOM = tuple(TOM_ORDER_NAMES[d] for d in TOM_DIRECTIONS)
# (spatial shape, directions) of the scans compared below: SS2D's four on a non-square map, ToM's three on a 3D one
CASES = {"2d": ((3, 5), SCAN_DIRECTIONS), "3d": ((2, 3, 4), TOM)}
OPTIONS = [dict(D=True, bias=True, softplus=True), dict(D=False, bias=False, softplus=True),
           dict(D=True, bias=True, softplus=False)]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- order tables ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,directions", [((3, 5), ALL_2D), ((5, 3), ALL_2D), ((1, 4), ALL_2D),
                                              ((2, 3, 5), ALL_3D), ((4, 1, 3), ALL_3D)])
def test_order_tables_are_permutations_and_inverse_orders_inverts_them(shape, directions):
    length = math.prod(shape)
    orders = scan_orders(shape, directions)
    inverse = inverse_orders(orders)
    steps = torch.arange(length).expand(len(directions), length)
    assert orders.shape == (len(directions), length) and orders.dtype == torch.int64
    assert torch.equal(orders.sort(dim=1).values, steps)
    assert torch.equal(orders.gather(1, inverse), steps)
    assert torch.equal(inverse.gather(1, orders), steps)
    x = torch.randn(2, 3, length)
    for k in range(len(directions)):
        assert torch.equal(x[..., orders[k]][..., inverse[k]], x)
        assert torch.equal(inverse_orders(orders[k]), inverse[k])


@pytest.mark.parametrize("direction", ALL_3D)
def test_a_direction_names_the_axes_from_slowest_to_fastest(direction):
    shape = (2, 3, 5)  # distinct sizes, so a mixed-up axis shows
    reverse, names = direction.startswith("-"), direction.lstrip("-")
    order = scan_orders(shape, [direction])[0]
    coords = dict(zip("dhw", torch.unravel_index(order, shape)))
    sizes = dict(zip("dhw", shape))
    step = torch.zeros_like(order)
    for name in names:  # the step number, read off the visited coordinates, slowest axis first
        step = step * sizes[name] + coords[name]
    expected = torch.arange(order.numel())
    assert torch.equal(step, expected.flip(0) if reverse else expected)


def test_ss2d_directions_are_the_layout_vmamba_builds():
    height, width = 3, 5
    x = torch.arange(height * width).view(1, 1, height, width)
    # VMamba v0 (and SS2D before the cross scan): row-major, column-major, then both flipped
    xs = x.new_empty(1, 4, 1, height * width)
    xs[:, 0] = x.flatten(2)
    xs[:, 1].unflatten(-1, (width, height)).copy_(x.transpose(2, 3))
    xs[:, 2:] = xs[:, :2].flip(-1)
    assert torch.equal(scan_orders((height, width), SCAN_DIRECTIONS), xs[0, :, 0])


def test_tom_directions_are_forward_reverse_and_slice_axis_fastest():
    shape = (3, 4, 5)
    grid = torch.arange(math.prod(shape)).view(shape)
    expected = torch.stack([grid.flatten(), grid.flatten().flip(0), grid.movedim(0, -1).flatten()])
    assert torch.equal(scan_orders(shape, TOM), expected)


def test_tables_are_cached_and_directions_validated():
    with torch.inference_mode():  # as nnU-Net predicts; the cached table must still serve training later
        first = scan_orders((4, 7), ALL_2D)
    assert not first.is_inference() and scan_orders((4, 7), ALL_2D) is first
    assert scan_orders((3, 5), ALL_2D) is scan_orders([3, 5], list(ALL_2D))
    assert scan_orders((3, 5), ALL_2D) is not scan_orders((5, 3), ALL_2D)
    for bad in ("hx", "hww", "dhw", "-", ""):
        with pytest.raises(ValueError, match="permutation"):
            scan_orders((3, 5), [bad])
    with pytest.raises(ValueError, match="2D and 3D"):
        scan_orders((15,), ["h"])


# ---- the gather/scatter path against the definition --------------------------------------------------------------

def make_inputs(shape, directions, shared, dim=3, n=4, batch=2, dtype=torch.float64, seed=0, softplus=True):
    g = torch.Generator().manual_seed(seed)
    k, length = len(directions), math.prod(shape)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    delta, bias = 0.5 * rand(batch, k * dim, length), 0.3 * rand(k * dim)
    if not softplus:  # dt = delta + bias itself: keep it positive, a decaying state
        delta, bias = delta.abs(), bias.abs()
    return dict(u=rand(batch, dim if shared else k * dim, length), delta=delta,
                A=-(torch.rand(k * dim, n, generator=g, dtype=dtype) * 2 + 0.1), B=rand(batch, k, n, length),
                C=rand(batch, k, n, length), D=rand(k * dim), delta_bias=bias)


def per_direction_loop(u, delta, A, B, C, orders, D, delta_bias, delta_softplus):
    """The definition: one reference scan per direction on its gathered sequence, scattered back, summed."""
    n_dir = orders.shape[0]
    dim = delta.shape[1] // n_dir
    y = 0
    for k in range(n_dir):
        own, order = slice(k * dim, (k + 1) * dim), orders[k]
        u_k = u if u.shape[1] == dim else u[:, own]
        y_k = selective_scan_reference(u_k[..., order], delta[:, own][..., order], A[own], B[:, k][..., order],
                                       C[:, k][..., order], None if D is None else D[own],
                                       delta_bias=None if delta_bias is None else delta_bias[own],
                                       delta_softplus=delta_softplus)
        y = y + y_k[..., inverse_orders(order)]
    return y


def values_and_grads(fn, inputs, orders, opts, seed=5):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], orders,
           leaves["D"] if opts["D"] else None, leaves["delta_bias"] if opts["bias"] else None, opts["softplus"])
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * weight).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def assert_same(result, expected, rtol, atol):
    (y, grads), (y_ref, grads_ref) = result, expected
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    for name, grad in grads_ref.items():
        if grad is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=atol, msg=name)


def torch_path(*args):
    return cross_selective_scan(*args, backend="torch")


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared_u", "per_direction_u"])
@pytest.mark.parametrize("case", CASES)
def test_torch_path_equals_per_direction_reference(case, shared, opts):
    shape, directions = CASES[case]
    inputs = make_inputs(shape, directions, shared, softplus=opts["softplus"])
    orders = scan_orders(shape, directions)
    result = values_and_grads(torch_path, inputs, orders, opts)
    assert result[0].shape == (2, 3, math.prod(shape)) and result[0].transpose(1, 2).is_contiguous()
    assert_same(result, values_and_grads(per_direction_loop, inputs, orders, opts), rtol=1e-9, atol=1e-10)


def test_float32_inputs_give_float32_and_half_inputs_are_computed_in_float32():
    shape, directions = CASES["2d"]
    inputs = make_inputs(shape, directions, True, dtype=torch.float32)
    orders = scan_orders(shape, directions)
    y = torch_path(*[inputs[k] for k in ("u", "delta", "A", "B", "C")], orders)
    assert y.dtype == torch.float32
    half = {k: inputs[k].half() for k in ("u", "delta", "B", "C")}
    y_half = torch_path(half["u"], half["delta"], inputs["A"], half["B"], half["C"], orders)
    y_ref = torch_path(*[half[k].float() if k in half else inputs[k] for k in ("u", "delta", "A", "B", "C")], orders)
    assert y_half.dtype == torch.float32
    torch.testing.assert_close(y_half, y_ref)


def test_compiled_fullgraph_equals_eager():
    shape, directions = CASES["2d"]
    opts = OPTIONS[0]
    inputs = make_inputs(shape, directions, shared=True)

    def scan_from_orders(u, delta, A, B, C, orders, D, delta_bias, delta_softplus):
        # the table built inside the graph, as the layers do
        orders = scan_orders(shape, directions, device=u.device)
        return cross_selective_scan(u, delta, A, B, C, orders, D, delta_bias, delta_softplus, backend="torch")

    torch._dynamo.reset()
    compiled = torch.compile(scan_from_orders, fullgraph=True, backend="aot_eager")
    orders = scan_orders(shape, directions)
    assert_same(values_and_grads(compiled, inputs, orders, opts), values_and_grads(torch_path, inputs, orders, opts),
                rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fake_tensors_give_shapes_and_gradients(backend):
    if backend == "triton" and triton_kernels() is None:
        pytest.skip("triton is not installed")
    shape, directions = CASES["3d"]
    inputs = make_inputs(shape, directions, shared=False, dtype=torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # as the memory planner runs networks
        leaves = {k: mode.from_tensor(v).requires_grad_() for k, v in inputs.items()}
        y = cross_selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                                 scan_orders(shape, directions), leaves["D"], leaves["delta_bias"], True,
                                 backend=backend)
        y.sum().backward()
        assert y.shape == (2, 3, math.prod(shape)) and y.dtype == torch.float32
        assert all(leaves[k].grad.shape == inputs[k].shape for k in leaves)


def test_backend_choice(monkeypatch):
    shape, directions = CASES["2d"]
    inputs = make_inputs(shape, directions, shared=True, dtype=torch.float32)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")] + [scan_orders(shape, directions)]
    monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="not one of"):
        cross_selective_scan(*args)
    expected = torch_path(*args)
    monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "torch")
    torch.testing.assert_close(cross_selective_scan(*args), expected)
    monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "auto")  # CPU tensors: the gather/scatter path
    torch.testing.assert_close(cross_selective_scan(*args), expected)
    if not triton_interpreted():  # no interpreter: the fused kernels need CUDA tensors
        monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "triton")
        with pytest.raises(BackendUnavailableError, match="triton"):
            cross_selective_scan(*args)


def test_shape_errors_name_the_argument():
    shape, directions = CASES["2d"]
    inputs = make_inputs(shape, directions, shared=True)
    orders = scan_orders(shape, directions)
    u, delta, A, B, C = (inputs[k] for k in ("u", "delta", "A", "B", "C"))
    with pytest.raises(ValueError, match="orders"):
        cross_selective_scan(u, delta, A, B, C, orders.int())
    with pytest.raises(ValueError, match="u must"):
        cross_selective_scan(u[:, :2], delta, A, B, C, orders)
    with pytest.raises(ValueError, match="delta must"):
        cross_selective_scan(u, delta[:, :-1], A, B, C, orders)
    with pytest.raises(ValueError, match="B must"):
        cross_selective_scan(u, delta, A, B[:, :3], C, orders)
    with pytest.raises(ValueError, match="D must"):
        cross_selective_scan(u, delta, A, B, C, orders, D=inputs["D"][:3])


# ---- SS2D: its cross-scan formulation against its copied one ---------------------------------------------------------

def ss2d_outputs_and_grads(m: SS2D, x: torch.Tensor, forward) -> tuple:
    m.zero_grad()
    x = x.clone().requires_grad_()
    y = forward(m, x)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)).sum().backward()
    return y.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in m.named_parameters()}}


def test_compiled_ss2d_fullgraph_equals_eager():
    m = distinct_ss2d(d_model=8, d_state=4)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(m.forward, fullgraph=True, backend="aot_eager")
    (y, grads), (y_ref, grads_ref) = (ss2d_outputs_and_grads(m, x, lambda _, t: forward(t))
                                      for forward in (compiled, m.forward))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-12, atol=1e-12, msg=name)


def test_ss2d_cross_scan_formulation_equals_the_copied_one():
    """projected_cross_scan's two paths (nnunet_mamba.ops.cross_scan), with SS2D's parameters: x_proj in image
    order + the cross scan (here its gather/scatter path) vs the directions' copies projected + one folded
    selective_scan, in values and gradients."""
    m = distinct_ss2d()
    h = torch.randn(2, m.d_inner, 5, 7, dtype=torch.float64)  # not square: a transposition mistake would show
    orders = scan_orders((5, 7), SCAN_DIRECTIONS)

    def parameters():
        return (m.x_proj_weight, m.dt_projs_weight, -torch.exp(m.A_logs.float()), m.Ds.float(),
                m.dt_projs_bias.float().view(-1), orders)

    results = []
    for scan in (lambda t: cross_scan._projected_fused(t.flatten(2), *parameters(), backend="torch"),
                 lambda t: cross_scan._projected_copies(t.flatten(2), *parameters(), backend="torch")):
        m.zero_grad()
        t = h.clone().requires_grad_()
        y = scan(t)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)).sum().backward()
        results.append((y.detach(), {"h": t.grad, **{n: p.grad.clone() for n, p in m.named_parameters()
                                                     if p.grad is not None}}))
    (y, grads), (y_ref, grads_ref) = results
    assert y.shape == (2, m.d_inner, 5 * 7)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert grads.keys() == grads_ref.keys() and {"x_proj_weight", "A_logs", "Ds"} <= grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-11, msg=name)


# ---- fused Triton kernels, in Triton's interpreter -----------------------------------------------------------------
# TRITON_INTERPRET is read when the kernels are defined, i.e. when nnunet_mamba.ops.cross_scan is first imported; in a
# pytest run other test modules import it long before, so the interpreter runs in a subprocess: this file run as a
# script, which prints the largest relative errors of the fused kernels against the gather/scatter path as JSON.

INTERPRETER_CHUNK = 4  # steps per chunk there: several chunks per sequence, so the carried state and adjoint count
# float64 gradients can be far below 1e-12, the default floor of the reference magnitude
relative_error = functools.partial(_relative_error, floor=1e-30)
INTERPRETER_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}
INTERPRETER_CASES = {  # name: (case, shared u, dim, N, dtype, OPTIONS index); every option once, every case once
    "2d_shared": ("2d", True, 3, 4, torch.float64, 0),
    "2d_shared_no_D_no_bias": ("2d", True, 3, 4, torch.float64, 1),
    "2d_shared_no_softplus": ("2d", True, 3, 4, torch.float64, 2),
    "2d_per_direction": ("2d", False, 3, 4, torch.float64, 0),
    "3d_shared": ("3d", True, 3, 4, torch.float64, 0),
    "3d_per_direction": ("3d", False, 3, 4, torch.float64, 1),
    "2d_two_channel_blocks_float32": ("2d", True, 10, 3, torch.float32, 0),
}


def largest_error(result, expected) -> float:
    (y, grads), (y_ref, grads_ref) = result, expected
    return max([relative_error(y, y_ref)] + [relative_error(grads[k], grads_ref[k]) for k in grads_ref
                                             if grads_ref[k] is not None])


def interpreter_report() -> dict:
    assert triton_interpreted(), "run with TRITON_INTERPRET=1"
    cross_scan._CHUNK = INTERPRETER_CHUNK
    report = {}
    for name, (case, shared, dim, n, dtype, option) in INTERPRETER_CASES.items():
        shape, directions = CASES[case]
        inputs = make_inputs(shape, directions, shared, dim=dim, n=n, dtype=dtype, softplus=OPTIONS[option]["softplus"])
        orders = scan_orders(shape, directions)
        fused = values_and_grads(lambda *a: cross_selective_scan(*a, backend="triton"), inputs, orders, OPTIONS[option])
        report[name] = largest_error(fused, values_and_grads(torch_path, inputs, orders, OPTIONS[option]))
    shape, directions = CASES["3d"]
    inputs = make_inputs(shape, directions, shared=True)
    with torch.no_grad():  # inference: no chunk states are stored
        fused, expected = (cross_selective_scan(*(inputs[k] for k in ("u", "delta", "A", "B", "C")),
                                                scan_orders(shape, directions), inputs["D"], inputs["delta_bias"],
                                                True, backend=backend) for backend in ("triton", "torch"))
    report["no_grad"] = relative_error(fused, expected)
    m, x = distinct_ss2d(d_model=8, d_state=4), torch.randn(2, 3, 5, 8, dtype=torch.float64)
    results = {}
    for backend in ("triton", "torch"):
        os.environ["NNUNET_MAMBA_BACKEND"] = backend
        results[backend] = ss2d_outputs_and_grads(m, x, SS2D.forward)
    report["ss2d"] = largest_error(results["triton"], results["torch"])
    return report


@pytest.fixture(scope="module")
def interpreter_errors():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "NNUNET_MAMBA_BACKEND"}
    package_root = os.path.dirname(os.path.dirname(nnunet_mamba.__file__))  # the nnunet_mamba this run tests
    env.update(TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [*INTERPRETER_CASES, "no_grad", "ss2d"])
def test_fused_kernels_equal_the_gather_scatter_path_in_the_interpreter(interpreter_errors, name):
    dtype = INTERPRETER_CASES[name][4] if name in INTERPRETER_CASES else torch.float64
    assert interpreter_errors[name] < INTERPRETER_TOLERANCE[dtype], interpreter_errors


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(interpreter_report()))
