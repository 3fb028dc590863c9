"""``nnunet-mamba benchmark``: training-step time, peak memory and parameters on the current device.

The command: its arguments, the networks and plan it measures, and the console output. What is measured lives
beside it: :mod:`.benchmark_step` (the training step, the plans), :mod:`.benchmark_profile` (--profile),
:mod:`.benchmark_flemme` (--flemme-table3), the scan kernels (--kernels); :mod:`.benchmark_report` writes the
tables and files.
"""
from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from ..networks import get_network_spec, list_networks
from ..planning.baselines import BASELINES, RESENC_PRESETS, resenc_batch_size
from ..planning.memory import estimate_training_memory_gib
from .benchmark_flemme import run_flemme_table3
from .benchmark_profile import category_lines
from .benchmark_report import COLUMNS, format_cell, median_rows, table_lines, table_rows, write_results
from .benchmark_step import PRESETS, measure, network_kwargs, plan_from_file


def add_parser(sub: argparse._SubParsersAction) -> None:
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


def _networks(args: argparse.Namespace, dim: int) -> list[str]:
    if args.all:
        return list(BASELINES) + [n for n in list_networks() if dim in get_network_spec(n).dims]
    unknown = [n for n in args.networks if n not in BASELINES and n not in list_networks()]
    if unknown:
        raise SystemExit(f"unknown network(s) {unknown}; see `nnunet-mamba list`")
    wrong_dim = [n for n in args.networks if n not in BASELINES and dim not in get_network_spec(n).dims]
    if wrong_dim:
        raise SystemExit(f"{', '.join(wrong_dim)}: not available in {dim}D; see `nnunet-mamba list`")
    return list(args.networks)


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


def run(args: argparse.Namespace) -> int:
    if args.kernels:
        return run_kernels(args)
    if args.flemme_table3:
        device = torch.device(args.device)
        where = _device_name(device)
        header = (f"device: {where} | Flemme Table III networks, batch {args.batch or 2}, 2 classes | "
                  f"{'fp16 autocast' if device.type == 'cuda' else 'fp32'} | x base = relative to ConvBlock")
        print(header)
        write_results(args, where, header, run_flemme_table3(args, device))
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
            shown = [f"{dict(COLUMNS)[k]} {format_cell(k, row[k])}"
                     for k in ("params", "step_ms", "peak_gib", "infer_ms") if k in row]
            print(", ".join(shown) + (f" (pass {number + 1}/{args.repeats})" if args.repeats > 1 else ""), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the previous network is gone; start the next from a clean pool
    rows = median_rows(passes)
    if args.estimate:
        for r in rows:
            r["est_gib"] = estimate_training_memory_gib(r["network"], network_kwargs(r["network"], plan),
                                                        plan["patch_size"], batches[r["network"]], args.classes, 1)
    rows = table_rows(rows)
    for line in table_lines(rows) + category_lines(rows, device):
        print(line)
    write_results(args, where, header, rows)
    return 0
