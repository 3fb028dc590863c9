"""Backend equivalence on a CUDA device at realistic sizes (skipped where there is no GPU, mamba-ssm or triton)."""
import pytest
import torch
from helpers import relative_error

from nnunet_mamba.ops import selective_scan, selective_scan_reference
from nnunet_mamba.cli.benchmark_kernels import ISSUE_SHAPES, benchmark_scan_shapes
from nnunet_mamba.ops import cuda_backend_status, triton_backend_status

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_mamba_ssm = pytest.mark.skipif(not cuda_backend_status()[0], reason="needs mamba-ssm")
needs_triton = pytest.mark.skipif(not triton_backend_status()[0], reason="needs triton")

# (batch, channels, length, groups): Mamba at U-Mamba's bottleneck, SS2D stages of Swin-UMamba (4 directions),
# a ViM block (2 directions), a long 3D sequence
SHAPES = [(2, 1024, 100, None), (12, 4 * 192, 6400, 4), (12, 4 * 384, 1600, 4), (4, 2 * 384, 1024, 2),
          (2, 64, 65536, None)]


def make_inputs(batch, dim, length, groups, n=16, dtype=torch.float32, with_z=True):
    g = torch.Generator(device="cuda").manual_seed(0)
    bc_shape = (batch, n, length) if groups is None else (batch, groups, n, length)

    def make(*shape, scale=1.0, as_dtype=dtype):
        return (scale * torch.randn(*shape, device="cuda", generator=g)).to(as_dtype).requires_grad_()

    inputs = dict(u=make(batch, dim, length), delta=make(batch, dim, length, scale=0.5),
                  A=(-torch.arange(1, n + 1, device="cuda").float().repeat(dim, 1)).requires_grad_(),
                  B=make(*bc_shape), C=make(*bc_shape), D=make(dim, as_dtype=torch.float32),
                  z=make(batch, dim, length) if with_z else None,
                  delta_bias=make(dim, scale=0.1, as_dtype=torch.float32))
    return {k: v for k, v in inputs.items() if v is not None}


def run_backend(inputs, backend, last_state_grad=False):
    """out, last state and input gradients of a random weighting of out (and of the last state if asked)."""
    for t in inputs.values():
        t.grad = None
    out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
    weight = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    loss = (out * weight.to(out.dtype)).sum()
    if last_state_grad:
        loss = loss + last.sum()
    loss.backward()
    return out.detach(), last.detach(), {k: t.grad.clone() for k, t in inputs.items()}


def assert_close_results(result, expected, value_tolerance, grad_tolerance):
    (out, last, grads), (out_e, last_e, grads_e) = result, expected
    assert relative_error(out, out_e) < value_tolerance
    assert relative_error(last, last_e) < value_tolerance
    for name in grads_e:
        assert relative_error(grads[name], grads_e[name]) < grad_tolerance, name


@needs_mamba_ssm
@pytest.mark.parametrize("batch,dim,length,groups", SHAPES)
def test_torch_backend_equals_mamba_ssm(batch, dim, length, groups):
    inputs = make_inputs(batch, dim, length, groups)
    assert_close_results(run_backend(inputs, "torch"), run_backend(inputs, "cuda"), 1e-4, 1e-3)


ISSUE_CASES = [(*shape, z) for shape in ISSUE_SHAPES for z in (False, True)]


@needs_triton
@needs_mamba_ssm
@pytest.mark.parametrize("batch,dim,length,groups", SHAPES + [s for s in ISSUE_SHAPES])
def test_triton_backend_equals_mamba_ssm(batch, dim, length, groups):
    # mamba-ssm passes no gradient through the last state, so only out's gradients are compared
    inputs = make_inputs(batch, dim, length, groups)
    assert_close_results(run_backend(inputs, "triton"), run_backend(inputs, "cuda"), 1e-4, 1e-3)


@needs_triton
@pytest.mark.parametrize("batch,dim,length,groups,with_z", ISSUE_CASES)
def test_triton_backend_equals_torch_backend(batch, dim, length, groups, with_z):
    inputs = make_inputs(batch, dim, length, groups, with_z=with_z)
    assert_close_results(run_backend(inputs, "triton", last_state_grad=True),
                         run_backend(inputs, "torch", last_state_grad=True), 1e-4, 1e-3)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", [None, 4])
def test_triton_low_precision_matches_float32_reference(dtype, groups):
    inputs = make_inputs(2, 64, 300, groups, dtype=dtype)
    as_float = {k: v.detach().float().requires_grad_() for k, v in inputs.items()}
    result = run_backend(inputs, "triton", last_state_grad=True)
    for t in as_float.values():
        t.grad = None
    out, last = selective_scan_reference(**as_float, delta_softplus=True, return_last_state=True)
    weight = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    ((out * weight.to(dtype).float()).sum() + last.sum()).backward()
    assert result[0].dtype == dtype
    assert_close_results(result, (out.to(dtype), last, {k: t.grad for k, t in as_float.items()}), 2e-2, 2e-2)


@needs_triton
@pytest.mark.parametrize("options", [dict(), dict(D=None), dict(z=None, delta_bias=None)])
def test_triton_takes_strided_inputs_and_optional_arguments(options):
    # u and z as the Mamba layer passes them: halves of one (batch, 2 dim, L) projection, L contiguous
    batch, dim, length = 2, 96, 333
    inputs = make_inputs(batch, dim, length, 3)
    xz = torch.randn(2 * dim, batch, length, device="cuda").transpose(0, 1).requires_grad_()
    inputs["u"], inputs["z"] = xz[:, :dim], xz[:, dim:]
    inputs.update(options)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    results = []
    for backend in ("triton", "torch"):
        xz.grad = None
        out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
        (out.square().sum() + last.sum()).backward()
        results.append((out.detach(), last.detach(), xz.grad.clone()))
    assert relative_error(results[0][0], results[1][0]) < 1e-4
    assert relative_error(results[0][1], results[1][1]) < 1e-4
    assert relative_error(results[0][2], results[1][2]) < 1e-3


@needs_mamba_ssm
@pytest.mark.parametrize("with_z", [False, True])
@pytest.mark.parametrize("groups", [None, 2])
def test_cuda_backend_equals_mamba_ssm_autograd_function(with_z, groups):
    # our custom ops call mamba-ssm's extension directly: the same kernels, so the same values as its
    # selective_scan_fn (to the last bit but for the atomically summed gradients)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    inputs = make_inputs(2, 64, 3000, groups, with_z=with_z)  # 3000 > 2048: two saved chunks
    ours = run_backend(inputs, "cuda")
    for t in inputs.values():
        t.grad = None
    out, last = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True)
    weight = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    (out * weight).sum().backward()
    assert torch.equal(ours[0], out.detach()) and torch.equal(ours[1], last.detach())
    for name, t in inputs.items():
        assert relative_error(ours[2][name], t.grad) < 1e-6, name


@needs_mamba_ssm
def test_cuda_op_passes_opcheck_with_strided_inputs():
    # u, z and delta as the Mamba layer passes them: views of channels-first projections, L contiguous; the fake
    # implementation must give the outputs the kernel's strides (torch.compile asserts them)
    batch, dim, length = 2, 32, 50
    inputs = make_inputs(batch, dim, length, None)
    xz = torch.randn(2 * dim, batch, length, device="cuda").transpose(0, 1).requires_grad_()
    dt = torch.randn(dim, batch, length, device="cuda").transpose(0, 1).requires_grad_()
    args = (xz[:, :dim], dt, inputs["A"], inputs["B"].unsqueeze(1), inputs["C"].unsqueeze(1), inputs["D"],
            xz[:, dim:], inputs["delta_bias"], True)
    torch.library.opcheck(torch.ops.nnunet_mamba.selective_scan_cuda_fwd.default, args)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton),
                                     pytest.param("cuda", marks=needs_mamba_ssm)])
def test_backend_compiles_with_inductor_without_graph_breaks(backend):
    inputs = make_inputs(2, 128, 500, 2)

    def loss(**kwargs):
        return selective_scan(**kwargs, delta_softplus=True, backend=backend).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    results = []
    for fn in (compiled, loss):
        for t in inputs.values():
            t.grad = None
        value = fn(**inputs)
        value.backward()
        results.append((value.detach(), {k: t.grad.clone() for k, t in inputs.items()}))
    assert relative_error(results[0][0], results[1][0]) < 1e-5
    for name in inputs:
        assert relative_error(results[0][1][name], results[1][1][name]) < 1e-5, name


@needs_triton
def test_kernel_benchmark_reports_every_backend():
    rows = benchmark_scan_shapes([(2, 64, 256, 2)], backends=("triton", "torch"), warmup=1, repeats=2)
    assert [row["backend"] for row in rows] == ["triton", "torch"]
    for row in rows:
        assert "error" not in row and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["fwd_gb_per_s"] > 0
