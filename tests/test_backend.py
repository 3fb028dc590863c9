"""Backend resolution against a mamba-ssm that imports but whose kernel fails at the first call (mamba-ssm's master
no longer builds the Mamba-1 scan by default), with stand-in ``mamba_ssm`` and ``selective_scan_cuda`` modules.

``backend._on_cuda`` is patched so that CPU tensors take the CUDA path: the probe then runs the stand-in kernel on
the CPU. The real probe, mamba-ssm's kernel on a GPU, is covered by tests/test_gpu.py only.
"""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

import helpers
from nnunet_mamba.cli import main
from nnunet_mamba.ops import BackendUnavailableError, cuda_backend_status, resolve_backend, selective_scan
from nnunet_mamba.ops import backend as backend_module
from nnunet_mamba.ops.torch_scan import selective_scan_reference

CPU = torch.device("cpu")
REAL_ON_CUDA = backend_module._on_cuda


class StandInKernels(types.ModuleType):
    """A ``selective_scan_cuda`` whose ``fwd`` raises ``error`` or computes the scan (as mamba-ssm's returns it:
    out, saved states, and the gated out when z is given); counts its calls."""

    def __init__(self, error: Exception | None = None, wrong: bool = False):
        super().__init__("selective_scan_cuda")
        self.error, self.wrong, self.calls = error, wrong, 0

    def fwd(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        self.calls += 1
        if self.error is not None:
            raise self.error
        out = selective_scan_reference(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
        if self.wrong:
            out = torch.zeros_like(out)
        states = u.new_zeros(u.shape[0], u.shape[1], 1, 2 * A.shape[1], dtype=torch.float32)
        if z is None:
            return [out, states]
        return [out, states, selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)]


def install_stand_in(monkeypatch, kernels: StandInKernels) -> None:
    """``import mamba_ssm.ops.selective_scan_interface`` and ``import selective_scan_cuda`` now succeed."""
    package = types.ModuleType("mamba_ssm")
    ops = types.ModuleType("mamba_ssm.ops")
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    package.ops, ops.selective_scan_interface = ops, interface
    for module in (package, ops, interface, kernels):
        monkeypatch.setitem(sys.modules, module.__name__, module)


def set_triton(monkeypatch, available: bool) -> None:
    """Our Triton kernels as compiled ones that can run on CUDA tensors, or not importable."""
    compiled = types.SimpleNamespace(INTERPRETED=False, VERSION="stand-in")
    outcome = (compiled, None) if available else (None, "ModuleNotFoundError: triton blocked by the test")
    monkeypatch.setattr(backend_module, "_triton_kernels", lambda: outcome)


@pytest.fixture(autouse=True)
def fresh_backend_state(monkeypatch):
    """No cached import or probe from another test, no backend setting, CPU tensors treated as CUDA ones."""
    monkeypatch.delenv("NNUNET_MAMBA_BACKEND", raising=False)
    monkeypatch.setattr(backend_module, "_on_cuda", lambda device: True)
    backend_module._mamba_ssm_kernels.cache_clear()
    backend_module._cuda_probe_failure.cache_clear()
    yield
    backend_module._mamba_ssm_kernels.cache_clear()
    backend_module._cuda_probe_failure.cache_clear()


def warnings_of(caplog) -> list:
    return [r for r in caplog.records if r.name == "nnunet_mamba" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("triton, expected", [(True, "triton"), (False, "torch")])
def test_auto_falls_back_with_one_warning_when_the_kernel_fails(monkeypatch, caplog, triton, expected):
    kernels = StandInKernels(RuntimeError("not built"))
    install_stand_in(monkeypatch, kernels)
    set_triton(monkeypatch, triton)
    caplog.set_level(logging.WARNING, logger="nnunet_mamba")
    assert [resolve_backend(CPU) for _ in range(3)] == [expected] * 3
    assert kernels.calls == 1  # probed once, not per call
    (record,) = warnings_of(caplog)
    message = record.getMessage()
    assert "mamba-ssm imports" in message and "RuntimeError: not built" in message, message
    assert f"using the '{expected}' backend instead" in message, message


def test_forcing_cuda_when_the_kernel_fails_raises_the_reason(monkeypatch):
    install_stand_in(monkeypatch, StandInKernels(RuntimeError("not built")))
    set_triton(monkeypatch, True)
    monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match=r"kernel failed on a test call on cpu: RuntimeError: not built"
                                                      r".*Mamba-1 selective scan.*NNUNET_MAMBA_BACKEND=triton"):
        resolve_backend(CPU)
    with pytest.raises(BackendUnavailableError, match="not built"):  # and the scan itself stops there
        selective_scan(**helpers.scan_inputs(1, 2, 8, 3, dtype=torch.float32))
    ok, why = cuda_backend_status(CPU)
    assert not ok and "its selective-scan kernel failed on cpu (RuntimeError: not built)" in why, why


def test_a_kernel_that_runs_but_computes_wrongly_is_unavailable(monkeypatch, caplog):
    install_stand_in(monkeypatch, StandInKernels(wrong=True))
    set_triton(monkeypatch, True)
    caplog.set_level(logging.WARNING, logger="nnunet_mamba")
    assert resolve_backend(CPU) == "triton"
    (record,) = warnings_of(caplog)
    assert "wrong result on a test problem" in record.getMessage()


def test_auto_picks_cuda_when_the_kernel_runs(monkeypatch, caplog):
    kernels = StandInKernels()
    install_stand_in(monkeypatch, kernels)
    set_triton(monkeypatch, True)
    caplog.set_level(logging.WARNING, logger="nnunet_mamba")
    assert resolve_backend(CPU) == "cuda"
    assert cuda_backend_status(CPU) == (True, "mamba-ssm selective_scan_cuda kernels")
    # the whole cuda path, through our wrapper's argument order, computes the scan
    inputs = helpers.scan_inputs(2, 4, 9, 3, dtype=torch.float32)
    torch.testing.assert_close(selective_scan(**inputs, delta_softplus=True),
                               selective_scan_reference(**inputs, delta_softplus=True))
    assert kernels.calls == 2  # the probe, then the scan
    assert not warnings_of(caplog)


def test_mamba_ssm_not_installed_falls_back_silently(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # importing it fails
    set_triton(monkeypatch, True)
    caplog.set_level(logging.WARNING, logger="nnunet_mamba")
    assert resolve_backend(CPU) == "triton"
    assert not warnings_of(caplog)  # a missing optional package is no surprise: the info line says it
    assert not cuda_backend_status(CPU)[0]


def test_no_probe_while_compiling(monkeypatch, caplog):
    kernels = StandInKernels(RuntimeError("not built"))
    install_stand_in(monkeypatch, kernels)
    set_triton(monkeypatch, True)
    caplog.set_level(logging.WARNING, logger="nnunet_mamba")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert resolve_backend(CPU) == "cuda"  # nothing probed yet: the import is trusted while tracing
    assert kernels.calls == 0
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert resolve_backend(CPU) == "triton"  # eager: probed
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert resolve_backend(CPU) == "triton"  # the cached outcome
    assert kernels.calls == 1 and len(warnings_of(caplog)) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_env_without_cuda_says_the_probe_cannot_run(monkeypatch, capsys):
    kernels = StandInKernels(RuntimeError("not built"))
    install_stand_in(monkeypatch, kernels)
    monkeypatch.setattr(backend_module, "_on_cuda", REAL_ON_CUDA)  # as nnunet-mamba env runs
    assert main(["env"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# selective scan:")]
    assert "cuda backend unavailable (mamba-ssm imports, but no CUDA device is visible, so its kernel could not be " \
           "probed)" in line, line
    assert kernels.calls == 0
