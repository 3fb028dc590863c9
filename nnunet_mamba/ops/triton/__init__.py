"""Our Triton kernels: the selective scan (:mod:`.scan`), the fused cross scan (:mod:`.cross_scan`) and their
shared pieces (:mod:`.common`).

Importing this package imports triton, and Triton decides then, from ``TRITON_INTERPRET``, whether the kernels
are compiled or interpreted; :mod:`nnunet_mamba.ops.backend` imports it on first need, so the rest of the package
works without triton.
"""
from .common import INTERPRETED, VERSION
from .cross_scan import cross_scan_backward, cross_scan_forward
from .scan import ScanConfig, default_config, n_saved_states, scan_backward, scan_forward

__all__ = ["INTERPRETED", "VERSION", "ScanConfig", "cross_scan_backward", "cross_scan_forward", "default_config",
           "n_saved_states", "scan_backward", "scan_forward"]
