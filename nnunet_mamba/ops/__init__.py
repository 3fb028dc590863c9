"""Low-level operators: the selective scan, its backends, the cross (multi-direction) scan, and their FLOP counts."""
from .backend import (AUTO_CUDA_PREFERENCE, BACKEND_ENV, BACKENDS, BackendUnavailableError, cuda_backend_status,
                      requested_backend, resolve_backend, triton_backend_status)
from .compiled_scans import TRITON_DTYPES, selective_scan_triton
from .cross_scan import cross_selective_scan, folded_selective_scan, projected_cross_scan
from .scan_orders import inverse_orders, scan_orders
from .selective_scan import selective_scan
from .torch_scan import selective_scan_reference, selective_scan_torch
from . import flops  # noqa: F401  (registers the scans' FLOP formulas with torch's FlopCounterMode)

__all__ = ["cross_selective_scan", "folded_selective_scan", "inverse_orders", "projected_cross_scan", "scan_orders",
           "AUTO_CUDA_PREFERENCE", "BACKEND_ENV", "BACKENDS", "TRITON_DTYPES", "BackendUnavailableError",
           "cuda_backend_status", "requested_backend", "resolve_backend", "selective_scan",
           "selective_scan_reference", "selective_scan_torch", "selective_scan_triton", "triton_backend_status"]
