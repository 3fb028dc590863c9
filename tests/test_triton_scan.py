"""The triton selective-scan backend on CPU, in Triton's interpreter, and the custom ops under torch.compile.

Triton chooses between interpreter and compiler when a function is decorated with ``triton.jit``, its own library
functions included, i.e. when triton is imported; torch imports triton early (importing nnunet_mamba.ops does).
So the kernel tests run in a child pytest started with TRITON_INTERPRET=1 (``test_kernels_in_interpreter``); run
this file with TRITON_INTERPRET=1 set to see them one by one.
"""
import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from helpers import relative_error, scan_inputs

from nnunet_mamba.ops import (BackendUnavailableError, resolve_backend, selective_scan, selective_scan_reference,
                              selective_scan_torch, selective_scan_triton)

backend_module = importlib.import_module("nnunet_mamba.ops.backend")

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# tests of the kernels: in the child process only
in_interpreter = pytest.mark.skipif(not (HAS_TRITON and INTERPRETING),
                                    reason="run by test_kernels_in_interpreter (needs triton and TRITON_INTERPRET=1)")
# tests that need no kernels: in the parent process only
in_parent = pytest.mark.skipif(INTERPRETING, reason="run in the parent pytest")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@in_parent
def test_kernels_in_interpreter():
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                           env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, f"interpreted kernel tests failed:\n{child.stdout[-20000:]}\n{child.stderr[-5000:]}"


@pytest.fixture
def interpreted():
    """nnunet_mamba.ops.triton, its kernels running in Triton's interpreter."""
    kernels = importlib.import_module("nnunet_mamba.ops.triton")
    assert kernels.INTERPRETED
    return kernels


def make_inputs(batch=2, dim=5, length=19, n=3, groups=None, dtype=torch.float32, seed=0):
    # drawn in float32 whatever dtype the sequences take: the kernels take A, D and delta_bias in float32
    return scan_inputs(batch, dim, length, n, groups, dtype=dtype, seed=seed, draw_dtype=torch.float32)


def run(fn, inputs, use_D=True, use_z=True, use_bias=True, softplus=True, dtype=None, **extra):
    """out, last state and every input's gradient of a weighted sum of both outputs."""
    leaves = {k: v.clone().to(dtype or v.dtype).requires_grad_() for k, v in inputs.items()}
    out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                   D=leaves["D"] if use_D else None, z=leaves["z"] if use_z else None,
                   delta_bias=leaves["delta_bias"] if use_bias else None, delta_softplus=softplus,
                   return_last_state=True, **extra)
    g = torch.Generator().manual_seed(1)
    loss = ((out * torch.randn(out.shape, generator=g).to(out.dtype)).sum()
            + (last * torch.randn(last.shape, generator=g)).sum())
    loss.backward()
    return out.detach(), last.detach(), {k: v.grad for k, v in leaves.items()}


def assert_matches(result, expected, tolerance):
    (out, last, grads), (ref_out, ref_last, ref_grads) = result, expected
    assert out.dtype == ref_out.dtype and last.dtype == torch.float32
    assert relative_error(out, ref_out) < tolerance
    assert relative_error(last, ref_last) < tolerance
    for name, ref in ref_grads.items():
        if ref is None:
            assert grads[name] is None, name
        else:
            assert grads[name].dtype == ref.dtype, name
            assert relative_error(grads[name], ref) < tolerance, name


# (groups, batch, dim, length, n, blocks (block_l, block_d, bwd_block_l, bwd_block_d)): ungrouped 3D B/C, one
# group, several groups; several channel blocks per group (dB/dC atomics) and a block wider than the group (masked
# channels); L shorter than, not a multiple of, and a multiple of either pass's chunk; states saved every one and
# every several forward chunks; N not a power of 2
SHAPES = [
    (None, 2, 5, 19, 3, (8, 2, 16, 1)),
    (1, 1, 5, 16, 4, (8, 4, 8, 2)),
    (3, 2, 6, 5, 3, (16, 4, 32, 4)),
    (2, 1, 8, 33, 2, (8, 2, 16, 2)),
    (1, 2, 3, 40, 3, (8, 2, 16, 1, True)),  # the forward in the backward's layout
]
OPTIONS = [
    dict(use_D=True, use_z=True, use_bias=True, softplus=True),
    dict(use_D=False, use_z=False, use_bias=False, softplus=False),
    dict(use_D=True, use_z=False, use_bias=True, softplus=True),
    dict(use_D=False, use_z=True, use_bias=False, softplus=True),
]


@in_interpreter
@pytest.mark.parametrize("groups,batch,dim,length,n,blocks", SHAPES)
@pytest.mark.parametrize("opts", OPTIONS)
def test_triton_values_and_gradients_match_the_reference(interpreted, groups, batch, dim, length, n, blocks, opts):
    if opts is not OPTIONS[0] and groups not in (None, 3):  # the option matrix on two shapes keeps this file fast
        pytest.skip("options are covered on the ungrouped and the 3-group shape")
    inputs = make_inputs(batch, dim, length, n, groups)
    config = interpreted.ScanConfig(block_l=blocks[0], block_d=blocks[1], num_warps=4, bwd_block_l=blocks[2],
                                    bwd_block_d=blocks[3], bwd_num_warps=1, fwd_rows=len(blocks) > 4)
    result = run(selective_scan_triton, inputs, config=config, **opts)
    reference = run(selective_scan_reference, inputs, dtype=torch.float64, **opts)
    reference = (reference[0].float(), reference[1].float(),
                 {k: None if g is None else g.float() for k, g in reference[2].items()})
    assert_matches(result, reference, 2e-5)


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_inputs(interpreted, dtype):
    # u, delta, B, C, z in the low dtype; the reference computes in float32 from the same rounded values, so only
    # the output's and the gradients' final rounding differ
    inputs = make_inputs(groups=None, dtype=dtype)
    result = run(selective_scan_triton, inputs)
    reference = run(selective_scan_reference, {k: v.float() for k, v in inputs.items()})
    reference = (reference[0].to(dtype), reference[1],
                 {k: g.to(inputs[k].dtype) for k, g in reference[2].items()})
    assert_matches(result, reference, 1e-2)


@in_interpreter
def test_default_backend_call_matches_torch_backend(interpreted):
    inputs = make_inputs(batch=1, dim=4, length=300, n=4, groups=2)  # default config: backward chunks of 128
    result = run(lambda *a, **k: selective_scan(*a, backend="triton", **k), inputs)
    expected = run(selective_scan_torch, inputs)
    assert_matches(result, expected, 1e-5)


@in_interpreter
def test_triton_saves_chunk_start_states_only(interpreted):
    inputs = {k: v.requires_grad_() for k, v in make_inputs(batch=2, dim=5, length=40, n=4).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        selective_scan_triton(**inputs, delta_softplus=True,
                              config=interpreted.ScanConfig(block_l=8, block_d=2, num_warps=4, bwd_block_l=16,
                                                            bwd_block_d=2, bwd_num_warps=1))
    states = [t for t in saved if t.dim() == 4 and t.shape[-1] == 4 and t.shape[-2] == 5]
    assert [tuple(t.shape) for t in states] == [(2, 3, 5, 4)]  # (batch, ceil(40 / bwd_block_l), dim, N)
    assert max(t.numel() for t in saved) == 2 * 5 * 40  # nothing larger than u


@in_interpreter
def test_default_config_takes_the_row_layout_for_few_long_sequences(interpreted):
    # Swin-UMamba's first stage (batch 12, 4 x 192 channels, 80 x 80 steps) and U-Mamba Enc 3D's (batch 2, 64
    # channels, 128^3 steps)
    assert not interpreted.default_config(192, 6400, 16, 12 * 4).fwd_rows
    config = interpreted.default_config(64, 128 ** 3, 16, 2)
    assert config.fwd_rows and config.bwd_block_l % 32 == 0


@in_interpreter
def test_triton_backend_selection(interpreted, monkeypatch):
    monkeypatch.delenv("NNUNET_MAMBA_BACKEND", raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"  # the interpreter is for tests, never picked by auto
    assert resolve_backend(torch.device("cpu"), "triton") == "triton"
    monkeypatch.setattr(backend_module, "_mamba_ssm_kernels", lambda: (None, "ModuleNotFoundError: mamba_ssm"))
    assert resolve_backend(torch.device("cuda")) == "triton"
    monkeypatch.setattr(backend_module, "_mamba_ssm_kernels", lambda: (object(), None))
    monkeypatch.setattr(backend_module, "_cuda_probe_failure", lambda kernels, device: None)  # its kernel runs
    assert resolve_backend(torch.device("cuda")) == "cuda"  # both can run: mamba-ssm first
    monkeypatch.setattr(backend_module, "AUTO_CUDA_PREFERENCE", ("triton", "cuda", "torch"))
    assert resolve_backend(torch.device("cuda")) == "triton"


@in_parent
def test_forcing_triton_without_triton_fails_clearly(monkeypatch):
    monkeypatch.setattr(backend_module, "_triton_kernels",
                        lambda: (None, "ModuleNotFoundError: No module named 'triton'"))
    monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="triton cannot be imported.*NNUNET_MAMBA_BACKEND=torch"):
        selective_scan(**make_inputs())
    monkeypatch.setattr(backend_module, "_mamba_ssm_kernels", lambda: (None, "ModuleNotFoundError: mamba_ssm"))
    monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "auto")
    assert resolve_backend(torch.device("cuda")) == "torch"


@in_parent
def test_forcing_triton_on_cpu_tensors_fails_clearly(monkeypatch):
    compiled = type("CompiledKernels", (), {"INTERPRETED": False})
    monkeypatch.setattr(backend_module, "_triton_kernels", lambda: (compiled, None))
    with pytest.raises(BackendUnavailableError, match="run on CUDA tensors.*TRITON_INTERPRET=1"):
        resolve_backend(torch.device("cpu"), "triton")


@in_interpreter
def test_triton_refuses_float64(interpreted):
    with pytest.raises(TypeError, match="got u of torch.float64"):
        selective_scan_triton(**make_inputs(dtype=torch.float64))


def scan_loss(u, delta, A, B, C, D, z, delta_bias, backend):
    out, last = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, return_last_state=True,
                               backend=backend)
    return (out * out).sum() + last.sum()


@pytest.mark.parametrize("backend", [pytest.param("torch", marks=in_parent),
                                     pytest.param("triton", marks=in_interpreter)])
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiles_without_graph_break_and_matches_eager(backend, compiler):
    inputs = make_inputs(groups=2, dim=4, length=20)
    torch._dynamo.reset()
    compiled = torch.compile(scan_loss, fullgraph=True, backend=compiler)  # fullgraph: a graph break raises
    results = []
    for fn in (compiled, scan_loss):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        loss = fn(**leaves, backend=backend)
        loss.backward()
        results.append((loss.detach(), {k: v.grad for k, v in leaves.items()}))
    (loss_c, grads_c), (loss_e, grads_e) = results
    torch.testing.assert_close(loss_c, loss_e)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], msg=name)


def op_args(inputs, optional=True):
    return (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
            inputs["D"] if optional else None, inputs["z"] if optional else None,
            inputs["delta_bias"] if optional else None, True)


@in_parent
@pytest.mark.parametrize("optional", [True, False])
def test_torch_op_passes_opcheck(optional):
    inputs = {k: v.requires_grad_() for k, v in make_inputs(batch=1, dim=4, length=9, n=2, groups=2).items()}
    torch.library.opcheck(torch.ops.nnunet_mamba.selective_scan_torch_fwd.default, op_args(inputs, optional))


@in_interpreter
@pytest.mark.parametrize("optional", [True, False])
def test_triton_op_passes_opcheck(interpreted, optional):
    inputs = {k: v.requires_grad_() for k, v in make_inputs(batch=1, dim=4, length=9, n=2, groups=2).items()}
    # save_states, block_l, block_d, num_warps, bwd_block_l, bwd_block_d, bwd_num_warps, fwd_rows
    torch.library.opcheck(torch.ops.nnunet_mamba.selective_scan_triton_fwd.default,
                          op_args(inputs, optional) + (True, 8, 2, 4, 8, 2, 1, False))
