import importlib

import pytest
import torch
from helpers import scan_inputs

from nnunet_mamba.ops import (BackendUnavailableError, resolve_backend, selective_scan, selective_scan_reference,
                              selective_scan_torch)

# the package re-exports the function under the module's name, so fetch the module itself
backend_module = importlib.import_module("nnunet_mamba.ops.backend")
torch_scan_module = importlib.import_module("nnunet_mamba.ops.torch_scan")


def make_inputs(batch=2, dim=6, length=37, n=4, groups=None, dtype=torch.float64, seed=0):
    return scan_inputs(batch, dim, length, n, groups, dtype=dtype, seed=seed)


OPTIONS = [
    dict(use_D=False, use_z=False, use_bias=False, softplus=False),
    dict(use_D=True, use_z=False, use_bias=False, softplus=True),
    dict(use_D=True, use_z=True, use_bias=True, softplus=True),
    dict(use_D=False, use_z=True, use_bias=True, softplus=False),
]


def call(fn, inputs, opts, **extra):
    return fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
              D=inputs["D"] if opts["use_D"] else None, z=inputs["z"] if opts["use_z"] else None,
              delta_bias=inputs["delta_bias"] if opts["use_bias"] else None, delta_softplus=opts["softplus"], **extra)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several chunks so chunk boundaries (state and adjoint carries) are exercised."""
    monkeypatch.setattr(torch_scan_module, "_MIN_CHUNK", 4)
    monkeypatch.setattr(torch_scan_module, "_CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("groups", [None, 1, 3])
@pytest.mark.parametrize("opts", OPTIONS)
def test_torch_backend_matches_sequential_reference(groups, opts, small_chunks):
    inputs = make_inputs(groups=groups)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out, last = call(selective_scan_torch, leaves, opts, return_last_state=True)
    ref_leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref_out, ref_last = call(selective_scan_reference, ref_leaves, opts, return_last_state=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(last, ref_last, rtol=1e-9, atol=1e-9)
    weights = torch.randn_like(out), torch.randn_like(last)
    ((out * weights[0]).sum() + (last * weights[1]).sum()).backward()
    ((ref_out * weights[0]).sum() + (ref_last * weights[1]).sum()).backward()
    for name in leaves:
        if ref_leaves[name].grad is None:
            assert leaves[name].grad is None or not leaves[name].grad.any(), name
        else:
            torch.testing.assert_close(leaves[name].grad, ref_leaves[name].grad, rtol=1e-8, atol=1e-8, msg=name)


@pytest.mark.parametrize("groups", [None, 2])
def test_torch_backend_gradcheck(groups, small_chunks):
    inputs = make_inputs(batch=1, dim=4, length=9, n=3, groups=groups, seed=1)
    leaves = [v.requires_grad_() for v in inputs.values()]

    def fn(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, True, return_last_state=True)

    assert torch.autograd.gradcheck(fn, leaves)


def test_chunking_does_not_change_values(monkeypatch):
    inputs = make_inputs(length=50, dtype=torch.float32)
    whole = call(selective_scan_torch, inputs, OPTIONS[2])
    monkeypatch.setattr(torch_scan_module, "_MIN_CHUNK", 3)
    monkeypatch.setattr(torch_scan_module, "_CHUNK_ELEMENTS", 1)
    chunked = call(selective_scan_torch, inputs, OPTIONS[2])
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-5)


def test_runs_in_float32_under_autocast_and_keeps_input_dtype():
    inputs = {k: v.float() for k, v in make_inputs(length=64).items()}
    expected = call(selective_scan, inputs, OPTIONS[2], backend="torch")
    low = {k: v.to(torch.bfloat16) if k in ("u", "delta", "z") else v for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(selective_scan, low, OPTIONS[2], backend="torch")
    assert out.dtype == torch.bfloat16
    ref = call(selective_scan_reference, low, OPTIONS[2])
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert torch.isfinite(out).all()
    # and the float32 path equals the reference
    torch.testing.assert_close(expected, call(selective_scan_reference, inputs, OPTIONS[2]), rtol=1e-4, atol=1e-4)


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("NNUNET_MAMBA_BACKEND", raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "torch")
    assert resolve_backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "fast")
    with pytest.raises(ValueError, match="NNUNET_MAMBA_BACKEND='fast'"):
        resolve_backend(torch.device("cpu"))


def test_forcing_cuda_without_mamba_ssm_fails_clearly(monkeypatch):
    missing = (None, "ModuleNotFoundError: No module named 'mamba_ssm'")
    monkeypatch.setattr(backend_module, "_mamba_ssm_kernels", lambda: missing)
    monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "cuda")
    inputs = make_inputs(dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="mamba-ssm cannot be imported.*NNUNET_MAMBA_BACKEND=torch"):
        call(selective_scan, inputs, OPTIONS[0])


def test_forcing_cuda_on_cpu_tensors_fails_clearly(monkeypatch):
    monkeypatch.setattr(backend_module, "_mamba_ssm_kernels", lambda: (object(), None))
    with pytest.raises(BackendUnavailableError, match="only runs on CUDA tensors"):
        resolve_backend(torch.device("cpu"), "cuda")


@pytest.mark.parametrize("bad", [
    dict(u=torch.zeros(2, 6)),
    dict(A=torch.zeros(5, 4)),
    dict(B=torch.zeros(2, 4, 36)),
    dict(B=torch.zeros(2, 4, 4, 37)),  # 6 channels do not split into 4 groups
    dict(D=torch.zeros(5)),
    dict(z=torch.zeros(2, 6, 36)),
])
def test_bad_shapes_raise(bad):
    inputs = {**make_inputs(dtype=torch.float32), **bad}
    with pytest.raises(ValueError):
        call(selective_scan, inputs, OPTIONS[2])
