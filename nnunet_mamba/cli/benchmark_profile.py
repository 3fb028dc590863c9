"""``nnunet-mamba benchmark --profile``: a training step's time split by what its kernels compute."""
from __future__ import annotations

import re
from collections.abc import Callable

import torch


# Kernel (CUDA) or operator (CPU) names by what they compute, first match wins; the rest is "elementwise/other".
KERNEL_CATEGORIES = (
    ("scan", r"selective_scan|scan_fwd|scan_bwd|cross_selective|cross_scan"),
    ("matmul", r"gemm|xmma|cutlass|cublas|matmul|\bmm\b|addmm|bmm|linear|Kernel2"),
    ("convolution", r"conv|cudnn|implicit|winograd|dgrad|wgrad"),
    ("normalization", r"norm"),
    ("copy/layout", r"copy|transpose|permute|\bcat\b|cat_|gather|scatter|index|flip|clone|contiguous"),
)


def kernel_category(name: str) -> str:
    """The :data:`KERNEL_CATEGORIES` entry that a kernel or operator name falls in."""
    return next((category for category, pattern in KERNEL_CATEGORIES if re.search(pattern, name, re.IGNORECASE)),
                "elementwise/other")


def time_by_category(step: Callable[[], None], device: torch.device, steps: int) -> dict[str, float]:
    """Milliseconds per step by :func:`kernel_category`: GPU kernel time on CUDA, operators' own CPU time on CPU."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0:
            category = kernel_category(event.key)
            totals[category] = totals.get(category, 0.0) + us / steps / 1000
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def category_lines(rows: list[dict], device: torch.device) -> list[str]:
    """One console line per profiled row: its milliseconds per step by category, with their shares."""
    lines = []
    for r in rows:
        if "time_by_category" in r:
            total = sum(r["time_by_category"].values())
            lines.append(f"{r['network']}: {total:.1f} ms of {'GPU kernel' if device.type == 'cuda' else 'operator'} "
                         "time per step: " + ", ".join(f"{k} {v:.1f} ({100 * v / total:.0f}%)"
                                                       for k, v in r["time_by_category"].items()))
    return lines
