"""Micro-benchmark of the selective-scan backends on a CUDA device (``nnunet-mamba benchmark --kernels``).

Times are medians of CUDA-event timings after warm-up. Bandwidth is judged against the least traffic any scan
must cause in device memory, whatever the backend keeps in between (E = elements of u, batch * dim * L;
S = elements of B, batch * G * N * L; s = bytes per input element; z counts only when given)::

    forward  = s * (E [u] + E [delta] + E [z] + 2 S [B, C]) + s * E [out]
    backward = s * (E [u] + E [delta] + E [z] + E [dout] + 2 S [B, C]) + s * (E [du] + E [ddelta] + E [dz] + 2 S)

``fwd_bwd`` rows count forward + backward. The fraction is that traffic per second over the device's peak
memory bandwidth (:data:`PEAK_GB_PER_S`, or the caller's ``peak_gb_per_s``).
"""
from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence

import torch

from ..ops import selective_scan, selective_scan_triton

# Peak memory bandwidth in GB/s by device-name fragment, most specific first (vendor data sheets).
PEAK_GB_PER_S = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
                 ("A100", 1555.0))

# (batch, dim, L, groups): the shapes of issue #8, Swin-UMamba's SS2D stages with their 4 directions as groups.
ISSUE_SHAPES = ((12, 768, 6400, 4), (12, 1536, 1600, 4), (12, 3072, 400, 4), (12, 6144, 100, 4))


def peak_bandwidth_gb_per_s(device: torch.device) -> float | None:
    """The peak memory bandwidth of ``device`` from :data:`PEAK_GB_PER_S`, or None if it is not listed."""
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_GB_PER_S if fragment in name), None)


def minimum_traffic_bytes(batch: int, dim: int, length: int, groups: int, n_state: int, element_size: int,
                          has_z: bool) -> tuple[int, int]:
    """(forward, backward) bytes by the formula in the module docstring."""
    e, s = batch * dim * length, batch * groups * n_state * length
    z = e if has_z else 0
    forward = element_size * (2 * e + z + 2 * s + e)
    backward = element_size * (3 * e + z + 2 * s) + element_size * (2 * e + z + 2 * s)
    return forward, backward


def _median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _inputs(batch: int, dim: int, length: int, groups: int, n_state: int, dtype: torch.dtype, has_z: bool,
            device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, as_dtype=dtype):
        return (scale * torch.randn(*shape, device=device, generator=g)).to(as_dtype).requires_grad_()

    inputs = dict(u=randn(batch, dim, length), delta=randn(batch, dim, length, scale=0.5),
                  A=(-torch.rand(dim, n_state, device=device, generator=g) * 4 - 0.5).requires_grad_(),
                  B=randn(batch, groups, n_state, length), C=randn(batch, groups, n_state, length),
                  D=randn(dim, as_dtype=torch.float32), delta_bias=randn(dim, scale=0.1, as_dtype=torch.float32))
    if has_z:
        inputs["z"] = randn(batch, dim, length)
    return inputs


def benchmark_scan_shapes(shapes: Sequence[tuple[int, int, int, int]] = ISSUE_SHAPES,
                          backends: Sequence[str] = ("cuda", "triton", "torch"), n_state: int = 16,
                          dtype: torch.dtype = torch.float32, has_z: bool = False, warmup: int = 3,
                          repeats: int = 10, triton_configs: Sequence[object] | None = None,
                          peak_gb_per_s: float | None = None, device: torch.device | None = None
                          ) -> list[dict]:
    """Forward and forward+backward times of ``backends`` on (batch, dim, L, groups) ``shapes``.

    The scan runs as the Mamba layers call it: delta_softplus, D and delta_bias, z only with ``has_z``, inputs
    requiring grad (so the forward saves what the backward needs). ``triton_configs``
    (:class:`nnunet_mamba.ops.triton.ScanConfig`) adds a ``triton`` row per config, for tuning. One dict
    per (shape, backend, config): shape, ``fwd_ms``, ``fwd_bwd_ms``, achieved ``*_gb_per_s`` and
    ``*_bandwidth_fraction`` (None without a known peak), or ``error`` where the backend cannot run.
    """
    device = device or torch.device("cuda")
    peak = peak_gb_per_s or peak_bandwidth_gb_per_s(device)
    runs: list[tuple[str, object]] = [(backend, None) for backend in backends]
    runs += [("triton", config) for config in triton_configs or ()]
    rows = []
    for shape in shapes:
        rows += _benchmark_shape(*shape, n_state, dtype, has_z, runs, warmup, repeats, peak, device)
        torch.cuda.empty_cache()
    return rows


def _benchmark_shape(batch: int, dim: int, length: int, groups: int, n_state: int, dtype: torch.dtype, has_z: bool,
                     runs: Sequence[tuple[str, object]], warmup: int, repeats: int, peak: float | None,
                     device: torch.device) -> list[dict]:
    inputs = _inputs(batch, dim, length, groups, n_state, dtype, has_z, device)
    traffic = minimum_traffic_bytes(batch, dim, length, groups, n_state, torch.finfo(dtype).bits // 8, has_z)
    grad_out = torch.randn(batch, dim, length, device=device, dtype=dtype)
    rows = []
    for backend, config in runs:
        row = dict(batch=batch, dim=dim, length=length, groups=groups, n_state=n_state, dtype=str(dtype),
                   has_z=has_z, backend=backend, config=None if config is None else repr(config))
        if config is None:
            scan = functools.partial(selective_scan, **inputs, delta_softplus=True, backend=backend)
        else:
            scan = functools.partial(selective_scan_triton, **inputs, delta_softplus=True, config=config)
        try:
            row["fwd_ms"] = _median_ms(scan, warmup, repeats)
            row["fwd_bwd_ms"] = _median_ms(
                lambda: torch.autograd.grad(scan(), list(inputs.values()), grad_out), warmup, repeats)
        except Exception as exc:  # an unavailable backend or a config that does not compile: report, go on
            row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        for key, bytes_moved in (("fwd", traffic[0]), ("fwd_bwd", traffic[0] + traffic[1])):
            rate = bytes_moved / (row[f"{key}_ms"] * 1e-3) / 1e9
            row[f"{key}_gb_per_s"] = rate
            row[f"{key}_bandwidth_fraction"] = None if peak is None else rate / peak
        rows.append(row)
    return rows


def triton_tuning_configs(n_state: int = 16) -> list[object]:
    """Launch configs worth timing with ``benchmark_scan_shapes(..., triton_configs=...)`` on a new GPU: the
    backward's chunk length, channels and warps around :func:`~nnunet_mamba.ops.triton.default_config`, whose
    forward layout they keep (the backward dominates: about 3/4 of forward + backward)."""
    from ..ops.triton import ScanConfig

    block_d = 2 * 32 * 4 // max(n_state, 1)  # the forward's channels per program: 2 (channel, state) pairs per thread
    configs = []
    for bwd_block_l, bwd_block_d, bwd_warps in ((32, 1, 1), (64, 1, 1), (128, 1, 1), (64, 2, 1), (128, 2, 1),
                                                (128, 1, 2), (256, 1, 1), (256, 1, 2)):
        configs.append(ScanConfig(block_l=16, block_d=block_d, num_warps=4, bwd_block_l=bwd_block_l,
                                  bwd_block_d=bwd_block_d, bwd_num_warps=bwd_warps))
    return configs


# SS2D at Swin-UMamba's first stage (d_inner 192 on an 80x80 map, 4 directions) and ToM at SegResMamba's 32^3 stage
CROSS_SCAN_SHAPES = {"ss2d": (12, 192, (80, 80), ("hw", "wh", "-hw", "-wh")),
                     "tom": (2, 96, (32, 32, 32), ("dhw", "-dhw", "hwd"))}


def cross_scan_tile_sweep(batch: int, dim: int, spatial: Sequence[int], directions: Sequence[str], n_state: int = 16,
                          block_cs: Sequence[int] = (4, 8, 16), chunks: Sequence[int] = (16, 32, 64),
                          warmup: int = 2, repeats: int = 10) -> list[dict[str, object]]:
    """Forward and forward + backward milliseconds of the cross scan on a CUDA device: its gather/scatter path
    (the backend ``auto`` picks there) and the fused Triton kernels under each (channels per program, steps per
    chunk) tile, one dict per row. Inputs are position-major with a shared u, as SS2D hands them over."""
    import math

    from ..ops import cross_selective_scan, resolve_backend, scan_orders
    from ..ops import cross_scan as cross_scan_module
    from ..ops.triton import cross_scan as fused_module

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    k, length = len(directions), math.prod(spatial)

    def rand(channels: int, scale: float = 1.0) -> torch.Tensor:  # (batch, channels, L), position-major
        return (scale * torch.randn(batch, length, channels, device=device, generator=g)).transpose(1, 2)

    inputs = dict(u=rand(dim), delta=rand(k * dim, 0.1),
                  A=-torch.arange(1, n_state + 1, device=device, dtype=torch.float32).repeat(k * dim, 1),
                  B=rand(k * n_state).unflatten(1, (k, n_state)), C=rand(k * n_state).unflatten(1, (k, n_state)),
                  D=torch.randn(k * dim, device=device, generator=g),
                  delta_bias=torch.randn(k * dim, device=device, generator=g) - 4.0)
    leaves = [t.requires_grad_() for t in inputs.values()]
    orders = scan_orders(spatial, directions, device=device)

    def scan(backend: str) -> torch.Tensor:
        return cross_selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], orders,
                                    inputs["D"], inputs["delta_bias"], True, backend=backend)

    def timed(backend: str, **row: object) -> dict[str, object]:
        with torch.no_grad():
            row["fwd_ms"] = _median_ms(lambda: scan(backend), warmup, repeats)
        row["fwd_bwd_ms"] = _median_ms(lambda: torch.autograd.grad(scan(backend).sum(), leaves), warmup, repeats)
        return row

    rows = [timed(resolve_backend(device, "auto"), path="gather/scatter")]
    saved = fused_module._BLOCK_C, cross_scan_module._CHUNK
    try:
        for block_c in block_cs:
            for chunk in chunks:
                fused_module._BLOCK_C, cross_scan_module._CHUNK = block_c, chunk
                rows.append(timed("triton", path="fused", block_c=block_c, chunk=chunk))
    finally:
        fused_module._BLOCK_C, cross_scan_module._CHUNK = saved
    return rows
