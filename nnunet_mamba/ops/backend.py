"""Which implementation runs a scan: the one place that reads the backend setting and probes mamba-ssm and Triton.

Backends: ``cuda`` (mamba-ssm's compiled kernel), ``triton`` (our kernels, :mod:`nnunet_mamba.ops.triton`) and
``torch`` (pure PyTorch, :mod:`nnunet_mamba.ops.torch_scan`). :func:`requested_backend` reads the setting
(``auto`` when unset); :func:`resolve_backend` turns it into the backend that runs on a given device, for
:func:`~nnunet_mamba.ops.selective_scan`; :func:`cross_scan_backend` does the same for
:func:`~nnunet_mamba.ops.cross_selective_scan`, whose ``triton`` is the fused cross-scan kernels.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any
from collections.abc import Callable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

logger = logging.getLogger("nnunet_mamba")

BACKEND_ENV = "NNUNET_MAMBA_BACKEND"
BACKENDS = ("auto", "cuda", "triton", "torch")
# What ``auto`` picks for CUDA tensors: the first of these that can run (tensors on other devices get ``torch``).
# mamba-ssm first: inside our networks its kernel was faster than our Triton ones (docs/measurements.md).
AUTO_CUDA_PREFERENCE = ("cuda", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """A selective-scan backend was requested that cannot run here."""


def _import_once(load: Callable[[], Any]) -> Callable[[], tuple[Any, str | None]]:
    """``load`` run on first use only; then ``(what it returned, None)``, or ``(None, why it raised)``.

    A dict, not functools.lru_cache, which torch.compile warns about tracing through; ``cache_clear`` as there.
    """
    outcome: dict = {}

    @functools.wraps(load)
    def cached():
        if not outcome:
            try:
                outcome["result"] = (load(), None)
            except Exception as exc:  # ImportError, or an OSError/RuntimeError from a build for another torch
                outcome["result"] = (None, f"{type(exc).__name__}: {exc}")
        return outcome["result"]

    cached.cache_clear = outcome.clear
    return cached


@_import_once
def _mamba_ssm_kernels():
    """mamba-ssm's compiled extension ``selective_scan_cuda`` (its ``fwd``/``bwd``). Imported through mamba-ssm's
    package so that a build for another torch fails here."""
    import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    import selective_scan_cuda

    return selective_scan_cuda


@_import_once
def _triton_kernels():
    """The package :mod:`nnunet_mamba.ops.triton` (it imports triton; TRITON_INTERPRET is read then)."""
    from . import triton as kernels

    return kernels


def mamba_ssm_kernels() -> Any:
    """mamba-ssm's ``selective_scan_cuda`` module; only called once :func:`resolve_backend` chose ``cuda``."""
    return _mamba_ssm_kernels()[0]


def triton_kernels() -> Any:
    """The :mod:`nnunet_mamba.ops.triton` package; only called once a ``triton`` backend was chosen."""
    return _triton_kernels()[0]


def triton_interpreted() -> bool:
    """Whether our Triton kernels run in Triton's interpreter (any device, slow); False without triton."""
    kernels, _ = _triton_kernels()
    return kernels is not None and kernels.INTERPRETED


def _on_cuda(device: torch.device) -> bool:
    """Whether tensors on ``device`` are CUDA tensors (the one device check of the compiled backends; tests patch
    it to take the CUDA path on the CPU)."""
    return device.type == "cuda"


def _probe_kernel(kernels: Any, device: torch.device) -> None:
    """Run mamba-ssm's ``fwd`` on a (1, 1, 4) float32 problem with N = 1 on ``device``, in the argument order of
    :func:`nnunet_mamba.ops.compiled_scans._cuda_scan_fwd` (B and C grouped, no D, z or delta_bias); raises if it
    fails or returns the wrong result. A build without the Mamba-1 scan imports but raises here."""
    ones = torch.ones(1, 1, 4, device=device)
    A = -torch.ones(1, 1, device=device)
    out, *_ = kernels.fwd(ones, ones, A, ones.unsqueeze(1), ones.unsqueeze(1), None, None, None, False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a kernel launch error surfaces here, not at some later call
    # x_t = exp(-1) x_{t-1} + 1 and out_t = x_t
    expected, state = [], 0.0
    for _ in range(4):
        state = state * math.exp(-1.0) + 1.0
        expected.append(state)
    expected = torch.tensor(expected).view(1, 1, 4)
    if tuple(out.shape) != (1, 1, 4) or not torch.allclose(out.detach().float().cpu(), expected, rtol=1e-3):
        raise RuntimeError(f"wrong result on a test problem: {out.detach().flatten().tolist()} instead of "
                           f"{expected.flatten().tolist()}")


_cuda_probes: dict = {}  # (device type, index) -> None if mamba-ssm's kernel ran there, else why not
_probe_warned: set = set()  # the fallback warning of resolve_backend: once per process


def _cuda_probe_failure(kernels: Any, device: torch.device) -> str | None:
    """None if mamba-ssm's kernel ran the test problem of :func:`_probe_kernel` on ``device``, else why not.

    Probed once per device, then cached. While torch.compile traces, nothing runs: the cached outcome is used, and
    without one the import is trusted (eager calls, e.g. the trainer's initialize, probe before compiling).
    """
    key = (device.type, device.index)
    if key in _cuda_probes:
        return _cuda_probes[key]
    if torch.compiler.is_compiling():
        return None
    # torch.device("cuda") is the current device: probed, and cached, as that device too
    full = torch.device("cuda", torch.cuda.current_device()) if device.index is None and device.type == "cuda" \
        and torch.cuda.is_available() else device
    full_key = (full.type, full.index)
    if full_key not in _cuda_probes:
        try:
            _probe_kernel(kernels, full)
            _cuda_probes[full_key] = None
        except Exception as exc:  # a kernel not built, a launch failure, a wrong result
            _cuda_probes[full_key] = f"{type(exc).__name__}: {exc}"
    _cuda_probes[key] = _cuda_probes[full_key]
    return _cuda_probes[key]


def _clear_cuda_probes() -> None:
    _cuda_probes.clear()
    _probe_warned.clear()


_cuda_probe_failure.cache_clear = _clear_cuda_probes  # the probes and the once-per-process warning


def cuda_backend_status(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether mamba-ssm's CUDA kernel runs on ``device`` (default: the current CUDA device), and a
    human-readable reason. Available only once a tiny test call of the kernel ran there (probed once per device)."""
    kernels, err = _mamba_ssm_kernels()
    if kernels is None:
        return False, f"mamba-ssm not importable ({err})"
    if device is None:
        if not torch.cuda.is_available():
            return False, "mamba-ssm imports, but no CUDA device is visible, so its kernel could not be probed"
        device = torch.device("cuda")
    if not _on_cuda(device):
        return False, f"mamba-ssm's kernel only runs on CUDA tensors, not on {device}"
    failure = _cuda_probe_failure(kernels, device)
    if failure is not None:
        return False, f"mamba-ssm imports, but its selective-scan kernel failed on {device} ({failure})"
    return True, "mamba-ssm selective_scan_cuda kernels"


def triton_backend_status() -> tuple[bool, str]:
    """Whether our Triton kernels can be used, and a human-readable reason."""
    kernels, err = _triton_kernels()
    if kernels is None:
        return False, f"triton not importable ({err})"
    if kernels.INTERPRETED:
        return True, f"Triton {kernels.VERSION} interpreter (TRITON_INTERPRET=1): any device, slow"
    if not torch.cuda.is_available():
        return False, f"triton {kernels.VERSION} installed but no CUDA device is visible"
    return True, f"Triton {kernels.VERSION} kernels"


def requested_backend(backend: str | None = None) -> str:
    """``backend`` if given, else the one the environment asks for (``auto`` when unset); validated."""
    if backend is not None:
        value, source = backend.strip().lower() or "auto", "backend"
    else:
        value, source = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto", BACKEND_ENV
    if value not in BACKENDS:
        raise ValueError(f"{source}={value!r} is not one of {', '.join(BACKENDS)}: set one of them, or unset "
                         f"{BACKEND_ENV} for auto")
    return value


# per compiled backend: what to install, and where its kernels run
_REQUIREMENTS = {
    "cuda": ("mamba-ssm", "Install the CUDA extra (pip install 'nnunet-mamba[cuda]')",
             "mamba-ssm's kernel only runs on CUDA tensors"),
    "triton": ("triton", "Install triton (PyTorch's CUDA wheels bring it)",
               "the Triton kernels run on CUDA tensors, or on any device in Triton's interpreter (TRITON_INTERPRET=1 "
               "set before nnunet_mamba.ops.triton is first imported; slow)"),
}


def _unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors on ``device`` (a message naming the way out), or None if it can."""
    if backend not in _REQUIREMENTS:
        return None
    package, install, where = _REQUIREMENTS[backend]
    module, err = (_mamba_ssm_kernels if backend == "cuda" else _triton_kernels)()
    if module is None:
        return (f"selective-scan backend '{backend}' was requested ({BACKEND_ENV}={backend}) but {package} cannot be "
                f"imported: {err}. {install} or set {BACKEND_ENV}=torch (or auto).")
    if not _on_cuda(device) and not getattr(module, "INTERPRETED", False):
        return (f"selective-scan backend '{backend}' was requested but the tensors are on {device}; {where}. Set "
                f"{BACKEND_ENV}=auto or torch.")
    if backend == "cuda":
        failure = _cuda_probe_failure(module, device)
        if failure is not None:
            return (f"selective-scan backend 'cuda' was requested ({BACKEND_ENV}=cuda): mamba-ssm imports, but its "
                    f"selective-scan kernel failed on a test call on {device}: {failure}. Install a mamba-ssm build "
                    f"that includes the Mamba-1 selective scan (selective_scan_cuda) for this torch and CUDA, or set "
                    f"{BACKEND_ENV}=triton (or auto).")
    return None


def check_available(backend: str, device: torch.device) -> None:
    """Raise :class:`BackendUnavailableError` if ``backend`` cannot run on tensors on ``device``."""
    reason = _unavailable(backend, device)
    if reason is not None:
        raise BackendUnavailableError(reason)


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Pick the concrete backend for tensors on ``device``; raises if a forced backend cannot run."""
    choice = requested_backend(backend)
    if choice != "auto":
        check_available(choice, device)
        return choice
    if _on_cuda(device):
        name = next(name for name in AUTO_CUDA_PREFERENCE if _unavailable(name, device) is None)
        if "cuda" in AUTO_CUDA_PREFERENCE[:AUTO_CUDA_PREFERENCE.index(name)]:
            _warn_probe_failure(device, name)
        return name
    return "torch"


def _warn_probe_failure(device: torch.device, used: str) -> None:
    """One warning per process when ``auto`` passed over mamba-ssm because it imports but its kernel failed (not
    when it is merely not installed); not while torch.compile traces, which logging would break."""
    if _probe_warned or torch.compiler.is_compiling():
        return
    failure = _cuda_probes.get((device.type, device.index))
    if failure is None:  # not installed, or not probed: nothing to warn about
        return
    _probe_warned.add(True)
    _ensure_handler()
    logger.warning("mamba-ssm imports, but its selective-scan kernel failed on %s (%s); using the '%s' backend "
                   "instead (install a mamba-ssm build with the Mamba-1 scan, or set %s=%s to silence this)",
                   device, failure, used, BACKEND_ENV, used)


def cross_scan_backend(u: Tensor, backend: str | None = None) -> str:
    """What :func:`~nnunet_mamba.ops.cross_selective_scan` runs for ``u``: ``triton`` (the fused kernels), else
    the selective-scan backend of its per-direction path (``cuda`` or ``torch``).

    ``auto`` follows :func:`resolve_backend`: where it picks Triton, the fused kernels run. Fake tensors (memory
    planning) take the fused kernels' shapes only when forced, else ``torch``'s, on any device.
    """
    choice = requested_backend(backend)
    if not torch.compiler.is_compiling() and is_fake(u):  # dynamo must not trace is_fake
        return "triton" if choice == "triton" else "torch"
    return resolve_backend(u.device, choice)


def _ensure_handler() -> None:
    """Our log lines reach stderr (as ``nnunet_mamba: ...``) when the application configured no logging."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


_BACKEND_STATUS = {"cuda": cuda_backend_status, "triton": triton_backend_status,
                   "torch": lambda: (True, "pure PyTorch, chunked log-depth scan")}
_announced: set = set()


def announce(what: str, backend: str, device: torch.device, auto: bool) -> None:
    """Log, once per (what, backend, device type), which implementation runs ``what`` and, when ``auto`` chose
    it on a CUDA device, why the backends it prefers were not used."""
    key = (what, backend, device.type)
    if key in _announced:
        return
    _announced.add(key)
    status = lambda name: cuda_backend_status(device) if name == "cuda" else _BACKEND_STATUS[name]()  # noqa: E731
    detail = status(backend)[1]
    if auto and device.type == "cuda":
        passed_over = AUTO_CUDA_PREFERENCE[:AUTO_CUDA_PREFERENCE.index(backend)]
        detail += "".join(f"; {name} unused: {status(name)[1]}" for name in passed_over)
    _ensure_handler()
    logger.info("%s backend '%s' on %s (%s)", what, backend, device.type, detail)
