"""Low-level operators: the selective scan and its backends."""
from .selective_scan import (BACKEND_ENV, BACKENDS, BackendUnavailableError, cuda_backend_status, requested_backend,
                             resolve_backend, selective_scan, selective_scan_reference, selective_scan_torch)

__all__ = ["BACKEND_ENV", "BACKENDS", "BackendUnavailableError", "cuda_backend_status", "requested_backend",
           "resolve_backend", "selective_scan", "selective_scan_reference", "selective_scan_torch"]
