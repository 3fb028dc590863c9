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


def cuda_backend_status() -> tuple[bool, str]:
    """Whether mamba-ssm's CUDA kernel can be used, and a human-readable reason."""
    fn, err = _mamba_ssm_kernels()
    if fn is None:
        return False, f"mamba-ssm not importable ({err})"
    if not torch.cuda.is_available():
        return False, "mamba-ssm installed but no CUDA device is visible"
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
    if device.type != "cuda" and not getattr(module, "INTERPRETED", False):
        return (f"selective-scan backend '{backend}' was requested but the tensors are on {device}; {where}. Set "
                f"{BACKEND_ENV}=auto or torch.")
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
    if device.type == "cuda":
        return next(name for name in AUTO_CUDA_PREFERENCE if _unavailable(name, device) is None)
    return "torch"


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
    detail = _BACKEND_STATUS[backend]()[1]
    if auto and device.type == "cuda":
        passed_over = AUTO_CUDA_PREFERENCE[:AUTO_CUDA_PREFERENCE.index(backend)]
        detail += "".join(f"; {name} unused: {_BACKEND_STATUS[name]()[1]}" for name in passed_over)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    logger.info("%s backend '%s' on %s (%s)", what, backend, device.type, detail)
