"""``nnunet-mamba benchmark``: training-step time, peak memory and parameters on the current device.

One training step = nnU-Net's: forward under autocast (fp16 on CUDA), Dice+CE with deep supervision, backward
through a GradScaler, SGD step. With it the forward pass per image: GMACs (matmuls and convolutions) and GFLOPs
(those, 2 per MAC, plus the selective scans). Networks are built from a plan preset (the reference plans of the
original papers) or from a real nnU-Net plans file, with nnU-Net's PlainConvUNet and its ResEnc M / L presets
(nnU-Net Revisited: ResidualEncoderUNet at the batch size their planners choose for the plan's patch) available as
baselines.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn
from tqdm import tqdm

from ..networks import get_network_spec, list_networks, plan_kwargs, resolve_plan_imports
from ..ops import resolve_backend
from ..ops.flops import register_scan_flops
from ..planning import (BASELINES, RESENC_PRESETS, baseline_kwargs, build_network, estimate_training_memory_gib,
                        resenc_batch_size, training_loss)


def _stages(dim: int, n_stages: int, features: List[int]) -> dict:
    conv = "Conv3d" if dim == 3 else "Conv2d"
    return {"n_stages": n_stages, "features_per_stage": features, "conv_op": getattr(nn, conv),
            "kernel_sizes": [[3] * dim] * n_stages, "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
            "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
            "norm_op": getattr(nn, f"InstanceNorm{dim}d"), "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}


# The plans of the reference measurements (a 2D plan for 320x320 and a 3D plan for 128^3).
PRESETS: Dict[str, dict] = {
    "2d_320": {"patch_size": [320, 320], "batch_size": 12, "arch": _stages(2, 7, [32, 64, 128, 256, 512, 512, 512])},
    "3d_128": {"patch_size": [128, 128, 128], "batch_size": 2, "arch": _stages(3, 6, [32, 64, 128, 256, 320, 320])},
    # ViM-UNet's set-up (512x512 images); nnU-Net's default 2D plan for that size has 8 stages
    "2d_512": {"patch_size": [512, 512], "batch_size": 2,
               "arch": _stages(2, 8, [32, 64, 128, 256, 512, 512, 512, 512])},
}


def plan_from_file(plans_file: str, configuration: str) -> dict:
    """A benchmark plan from an nnU-Net plans.json configuration."""
    with open(plans_file) as f:
        plans = json.load(f)
    try:
        config = plans["configurations"][configuration]
    except KeyError:
        raise SystemExit(f"configuration {configuration!r} not in {plans_file}: "
                         f"{', '.join(plans['configurations'])}") from None
    arch = resolve_plan_imports(config["architecture"]["arch_kwargs"], config["architecture"]["_kw_requires_import"])
    return {"patch_size": config["patch_size"], "batch_size": config["batch_size"], "arch": arch,
            "network_class_name": config["architecture"]["network_class_name"]}


def network_kwargs(name: str, plan: dict) -> dict:
    """Constructor kwargs of network ``name`` for a benchmark plan."""
    if name in BASELINES:
        return baseline_kwargs(name, plan["arch"])
    return plan_kwargs(name, plan["arch"], plan["patch_size"], plan.get("network_class_name"))


def build(name: str, plan: dict, in_channels: int, classes: int) -> nn.Module:
    return build_network(name, network_kwargs(name, plan), in_channels, classes)


def measure(name: str, plan: dict, batch: int, classes: int, device: torch.device, steps: int, warmup: int,
            compile_network: bool, profile: bool = False) -> dict:
    torch.manual_seed(0)
    network = build(name, plan, 1, classes)
    backend = "-" if name in BASELINES else resolve_backend(device)
    return {"network": name, **measure_network(network, plan["patch_size"], batch, classes, device, steps, warmup,
                                                compile_network, profile), "backend": backend}


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


def _time_by_category(step: Callable[[], None], device: torch.device, steps: int) -> Dict[str, float]:
    """Milliseconds per step by :func:`kernel_category`: GPU kernel time on CUDA, operators' own CPU time on CPU."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    totals: Dict[str, float] = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0:
            category = kernel_category(event.key)
            totals[category] = totals.get(category, 0.0) + us / steps / 1000
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def measure_network(network: nn.Module, patch_size: List[int], batch: int, classes: int, device: torch.device,
                    steps: int, warmup: int, compile_network: bool, profile: bool = False) -> dict:
    """One nnU-Net training step of ``network`` (1 input channel): time, peak memory, inference time, the forward
    pass's GMACs and GFLOPs per image, the warm-up's seconds (compilation included), and with ``profile`` the step's
    time by kernel category (``time_by_category``, from further profiled steps)."""
    network = network.to(device)
    params = sum(p.numel() for p in network.parameters())
    model = torch.compile(network) if compile_network else network
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    x = torch.randn(batch, 1, *patch_size, device=device)
    with torch.no_grad():
        outputs = network(x[:1])
        shapes = [o.shape[2:] for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
    targets = [torch.randint(0, classes, (batch, 1, *s), device=device).float() for s in shapes]
    loss_fn = training_loss(len(shapes))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            outputs = model(x)
            loss = loss_fn(outputs if isinstance(outputs, (list, tuple)) else [outputs], targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()

    warmup_start = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - warmup_start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    infer_ms = _inference_ms(network, x[:1], use_amp, steps)
    flops, scan_flops = _forward_flops(network, x[:1])
    result = {"params": params, "step_ms": elapsed * 1000, "warmup_s": warmup_s, "peak_gib": peak,
              "infer_ms": infer_ms, "gmacs": (flops - scan_flops) / 2e9, "gflops": flops / 1e9, "batch": batch,
              "patch": list(patch_size)}
    if profile:
        result["time_by_category"] = _time_by_category(step, device, steps)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _inference_ms(network: nn.Module, image: torch.Tensor, use_amp: bool, repeats: int) -> float:
    """Forward time for one patch (batch 1, no deep supervision), as nnU-Net's predictor runs it."""
    network.eval()
    deep_supervision = network.decoder.deep_supervision  # nnU-Net's switch, which its predictor turns off
    network.decoder.deep_supervision = False
    with torch.autocast(image.device.type, dtype=torch.float16, enabled=use_amp):
        network(image)
        _sync(image.device)
        start = time.perf_counter()
        for _ in range(repeats):
            network(image)
        _sync(image.device)
    network.decoder.deep_supervision = deep_supervision
    network.train()
    return (time.perf_counter() - start) / repeats * 1000


@torch.no_grad()
def _forward_flops(network: nn.Module, image: torch.Tensor) -> Tuple[int, int]:
    """FLOPs of one forward pass of ``image`` by torch.utils.flop_counter, and the selective scans' share of them.

    Matmuls and convolutions count 2 per multiply-accumulate (so the rest / 2 are the MACs papers report), the
    scans by the formulas of :mod:`nnunet_mamba.ops.flops`. Not counted: elementwise ops and norms, and the scan and
    conv1d inside mamba-ssm's fused ``mamba_inner_fn`` (the Mamba layer's path on CUDA with causal-conv1d), which
    calls compiled kernels rather than custom ops.
    """
    from torch.utils.flop_counter import FlopCounterMode

    scan_ops = register_scan_flops()  # also ops defined since import; before the counter, which copies the registry
    network.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        network(image)
    network.train()
    per_op = counter.get_flop_counts().get("Global", {})
    return counter.get_total_flops(), sum(n for op, n in per_op.items() if op in scan_ops)


def add_parser(sub) -> None:
    p = sub.add_parser("benchmark", help="training-step time, peak memory and parameters of networks")
    p.add_argument("networks", nargs="*", default=["plainconvunet", "umamba_bot", "umamba_enc"],
                   help=f"names from `nnunet-mamba list` or baselines {sorted(BASELINES)} (nnU-Net's PlainConvUNet, "
                        "its ResEnc M / L presets; default: %(default)s)")
    p.add_argument("--all", action="store_true",
                   help="every registered network available in the plan's dimension, after the baselines")
    p.add_argument("--preset", choices=sorted(PRESETS), default="2d_320", help="plan preset (default: %(default)s)")
    p.add_argument("--plans", help="an nnU-Net plans.json to take the plan from instead of a preset")
    p.add_argument("-c", "--configuration", default="2d", help="configuration in --plans (default: %(default)s)")
    p.add_argument("--batch", type=int, help="batch size (default: the plan's)")
    p.add_argument("--patch", type=int, nargs="+", help="patch size override")
    p.add_argument("--classes", type=int, default=14, help="output classes (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure the list this many times, networks interleaved, and report medians: GPU clocks "
                        "drift by 20%% within minutes, so ratios from one pass can mislead (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to measure on, e.g. cuda, cuda:1 or cpu (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile each network")
    p.add_argument("--profile", action="store_true",
                   help="also profile each network's step: milliseconds per step by kernel category (scan, matmul, "
                        "convolution, normalization, copy/layout, elementwise/other); GPU kernel time on CUDA")
    p.add_argument("--estimate", action="store_true",
                   help="also print the planner's CPU estimate of the peak memory (column est GiB)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--flemme-table3", action="store_true",
                   help="the Flemme paper's efficiency study instead of the networks: its Table III networks with "
                        "ConvBlock (U-Net), SwinBlock and MambaBlock at 2 and 4 blocks per stage, 64^2, 128^2, 64^3 "
                        "and 128^3 patches, batch 2, and each one's time relative to the ConvBlock network")
    p.add_argument("--kernels", action="store_true",
                   help="time the selective-scan backends alone on Swin-UMamba's SS2D shapes (batch 12, 320x320: "
                        "(12, 4x192, 6400) ... (12, 4x1536, 100), N 16, fp32, softplus, D, delta_bias): forward "
                        "and forward+backward ms and the fraction of the memory-bandwidth floor reached")
    p.add_argument("--backends", nargs="+", default=["cuda", "triton"],
                   help="backends for --kernels (default: %(default)s; 'torch' is slow at these sizes)")
    p.add_argument("--out", metavar="PREFIX",
                   help="also write PREFIX.md (Markdown table), PREFIX.csv and PREFIX.png (time and memory plot)")
    p.set_defaults(func=run)


def _networks(args: argparse.Namespace, dim: int) -> List[str]:
    if args.all:
        return list(BASELINES) + [n for n in list_networks() if dim in get_network_spec(n).dims]
    unknown = [n for n in args.networks if n not in BASELINES and n not in list_networks()]
    if unknown:
        raise SystemExit(f"unknown network(s) {unknown}; see `nnunet-mamba list`")
    wrong_dim = [n for n in args.networks if n not in BASELINES and dim not in get_network_spec(n).dims]
    if wrong_dim:
        raise SystemExit(f"{', '.join(wrong_dim)}: not available in {dim}D; see `nnunet-mamba list`")
    return list(args.networks)


def _median_rows(passes: List[List[dict]]) -> List[dict]:
    """One row per network: the median of each timing over the passes (peak memory and counts do not vary)."""
    rows = []
    for per_pass in zip(*passes):
        row = dict(per_pass[0])
        for key in ("step_ms", "infer_ms"):
            row[key] = statistics.median(r[key] for r in per_pass)
        row["step_ms_all"] = [round(r["step_ms"], 2) for r in per_pass]
        rows.append(row)
    return rows


COLUMNS = [("network", "network"), ("params", "params"), ("gmacs", "GMACs/img"), ("gflops", "GFLOPs/img"),
           ("step_ms", "step ms"), ("step_ratio", "x base"), ("peak_gib", "peak GiB"), ("peak_ratio", "x base"),
           ("est_gib", "est GiB"), ("infer_ms", "infer ms"), ("backend", "backend")]


def _table_rows(rows: List[dict]) -> List[dict]:
    """Rows with the ratios to the baseline (the first baseline in the list) filled in."""
    base = next((r for r in rows if r["network"] in BASELINES), None)
    out = []
    for r in rows:
        r = dict(r)
        r["step_ratio"] = r["step_ms"] / base["step_ms"] if base else float("nan")
        r["peak_ratio"] = r["peak_gib"] / base["peak_gib"] if base else float("nan")
        out.append(r)
    return out


def _format(key: str, value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.2f}" if key.endswith(("ratio", "gib")) else f"{value:.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_outputs(prefix: str, rows: List[dict], header: str) -> List[str]:
    """PREFIX.md, PREFIX.csv and PREFIX.png for the table rows; returns the paths written."""
    columns = [(k, t) for k, t in COLUMNS if any(k in r for r in rows)]
    md = [f"<!-- {header} -->", "| " + " | ".join(t for _, t in columns) + " |",
          "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(_format(k, r.get(k, float("nan"))) for k, _ in columns) + " |" for r in rows]
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    with open(prefix + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k, _ in columns], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8), sharey=True)
    names = [r["network"] for r in rows][::-1]
    for ax, key, label in ((axes[0], "step_ms", "training step (ms)"), (axes[1], "peak_gib", "peak memory (GiB)")):
        values = [r[key] for r in rows][::-1]
        ax.barh(names, values, color=["0.6" if n in BASELINES else "C0" for n in names])
        ax.set_xlabel(label)
        for y, v in enumerate(values):
            ax.annotate(f"{v:.1f}", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    fig.suptitle(header, fontsize=9)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)
    plt.close(fig)
    return [prefix + ".md", prefix + ".csv", prefix + ".png"]


FLEMME_STUDY = {"sizes": [(2, 64), (2, 128), (3, 64), (3, 128)], "num_blocks": [2, 4],
                "encoders": {"unet": "ConvBlock", "swinu": "SwinBlock", "mambau": "MambaBlock"}}


def run_flemme_table3(args: argparse.Namespace, device: torch.device) -> List[dict]:
    """Rows of the Flemme efficiency study (2 classes, so that nnU-Net's Dice+CE has a foreground to learn)."""
    from ..networks.flemme import flemme_table3

    rows = []
    for dim, size in FLEMME_STUDY["sizes"]:
        for num_blocks in FLEMME_STUDY["num_blocks"]:
            base = None
            for encoder, block in FLEMME_STUDY["encoders"].items():
                torch.manual_seed(0)
                network = flemme_table3(encoder, dim=dim, num_blocks=num_blocks, num_classes=2)
                row = {"network": f"{block} {size}^{dim} x{num_blocks}",
                       **measure_network(network, [size] * dim, args.batch or 2, 2, device, args.steps, args.warmup,
                                         args.compile),
                       "backend": "-" if encoder != "mambau" else resolve_backend(device)}
                base = base or row
                row["step_ratio"] = row["step_ms"] / base["step_ms"]
                row["peak_ratio"] = row["peak_gib"] / base["peak_gib"] if device.type == "cuda" else float("nan")
                rows.append(row)
                print(" ".join(f"{k}={_format(k, row[k])}" for k in ("network", "params", "step_ms", "step_ratio",
                                                                     "peak_gib", "infer_ms")), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def run_kernels(args: argparse.Namespace) -> int:
    from .benchmark_kernels import benchmark_scan_shapes

    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("--kernels times CUDA kernels: run it on a GPU (--device cuda)")
    print(f"device: {torch.cuda.get_device_name(device)} | selective scan alone, fp32, N 16, G 4, softplus, D, "
          f"delta_bias, no z | median of {args.steps} after {args.warmup} warm-up runs")
    rows = benchmark_scan_shapes(backends=args.backends, warmup=args.warmup, repeats=args.steps, device=device)
    first = args.backends[0]
    print(f"{'shape (B, K*d, L)':<22}{'backend':<9}{'fwd ms':>9}{'fwd+bwd ms':>12}{'x ' + first:>10}"
          f"{'of BW floor':>13}")
    for r in rows:
        shape = f"{r['batch']}, {r['dim'] // r['groups']}x{r['groups']}, {r['length']}"
        if "error" in r:
            print(f"{shape:<22}{r['backend']:<9}  {r['error']}")
            continue
        ref = next((q for q in rows if q["backend"] == first and q["dim"] == r["dim"] and "error" not in q), None)
        speedup = f"{ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}" if ref else "-"
        fraction = r.get("fwd_bwd_bandwidth_fraction")
        print(f"{shape:<22}{r['backend']:<9}{r['fwd_ms']:>9.2f}{r['fwd_bwd_ms']:>12.2f}{speedup:>10}"
              f"{'-' if fraction is None else f'{fraction:.0%}':>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=2)
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _write_results(args: argparse.Namespace, where: str, header: str, rows: List[dict]) -> None:
    """--json and --out files of a run."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "header": header, "rows": rows}, f, indent=2)
    if args.out:
        print("wrote " + ", ".join(write_outputs(args.out, rows, header)))


def run(args: argparse.Namespace) -> int:
    if args.kernels:
        return run_kernels(args)
    if args.flemme_table3:
        device = torch.device(args.device)
        where = _device_name(device)
        header = (f"device: {where} | Flemme Table III networks, batch {args.batch or 2}, 2 classes | "
                  f"{'fp16 autocast' if device.type == 'cuda' else 'fp32'} | x base = relative to ConvBlock")
        print(header)
        _write_results(args, where, header, run_flemme_table3(args, device))
        return 0
    plan = plan_from_file(args.plans, args.configuration) if args.plans else dict(PRESETS[args.preset])
    if args.patch:
        plan["patch_size"] = args.patch
    batch = args.batch or plan["batch_size"]
    dim = len(plan["patch_size"])
    names = _networks(args, dim)
    device = torch.device(args.device)
    where = _device_name(device)
    header = (f"device: {where} | plan: patch {plan['patch_size']}, batch {batch}, {args.classes} classes | "
              f"{'fp16 autocast' if device.type == 'cuda' else 'fp32'}{', compiled' if args.compile else ''}"
              f"{f' | median of {args.repeats} interleaved passes' if args.repeats > 1 else ''}")
    print(header, flush=True)
    # the ResEnc presets train at the batch their planners choose for this patch (unless --batch says otherwise)
    batches = {name: args.batch or resenc_batch_size(name, network_kwargs(name, plan), plan["patch_size"], 1,
                                                     args.classes) if name in RESENC_PRESETS else batch
               for name in names}
    for name in names:
        if batches[name] != batch:
            print(f"{name}: batch {batches[name]} (nnU-Net's {RESENC_PRESETS[name].plans_name} planner for this patch)")
    passes = []
    for number in tqdm(range(args.repeats), desc="passes", disable=args.repeats == 1):
        passes.append([])
        for name in names:
            # each row as soon as it is measured (the table follows at the end), so a long or interrupted run
            # shows what it has done
            print(f"measuring {name} ({args.warmup} warm-up + {args.steps} timed steps) ...", end=" ", flush=True)
            passes[-1].append(measure(name, plan, batches[name], args.classes, device, args.steps, args.warmup,
                                      args.compile, args.profile))
            row = passes[-1][-1]
            shown = [f"{dict(COLUMNS)[k]} {_format(k, row[k])}" for k in ("params", "step_ms", "peak_gib", "infer_ms")
                     if k in row]
            print(", ".join(shown) + (f" (pass {number + 1}/{args.repeats})" if args.repeats > 1 else ""), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the previous network is gone; start the next from a clean pool
    rows = _median_rows(passes)
    if args.estimate:
        for r in rows:
            r["est_gib"] = estimate_training_memory_gib(r["network"], network_kwargs(r["network"], plan),
                                                        plan["patch_size"], batches[r["network"]], args.classes, 1)
    rows = _table_rows(rows)
    columns = [(k, t) for k, t in COLUMNS if any(k in r for r in rows)]
    widths = {k: max(len(t), *(len(_format(k, r.get(k, float("nan")))) for r in rows)) + 2 for k, t in columns}
    def line(cells: List[str]) -> str:
        return " ".join(c.ljust(widths[k]) if k in ("network", "backend") else c.rjust(widths[k])
                        for (k, _), c in zip(columns, cells)).rstrip()

    print(line([t for _, t in columns]))
    for r in rows:
        print(line([_format(k, r.get(k, float("nan"))) for k, _ in columns]))
    for r in rows:
        if "time_by_category" in r:
            total = sum(r["time_by_category"].values())
            print(f"{r['network']}: {total:.1f} ms of {'GPU kernel' if device.type == 'cuda' else 'operator'} time "
                  f"per step: " + ", ".join(f"{k} {v:.1f} ({100 * v / total:.0f}%)"
                                            for k, v in r["time_by_category"].items()))
    _write_results(args, where, header, rows)
    return 0
