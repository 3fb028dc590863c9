"""``nnunet-mamba benchmark --flemme-table3``: the Flemme paper's efficiency study (its Table III networks with
ConvBlock, SwinBlock and MambaBlock encoders), each network's step relative to the ConvBlock one."""
from __future__ import annotations

import argparse

import torch

from ..ops import resolve_backend
from .benchmark_report import format_cell
from .benchmark_step import measure_network

FLEMME_STUDY = {"sizes": [(2, 64), (2, 128), (3, 64), (3, 128)], "num_blocks": [2, 4],
                "encoders": {"unet": "ConvBlock", "swinu": "SwinBlock", "mambau": "MambaBlock"}}


def run_flemme_table3(args: argparse.Namespace, device: torch.device) -> list[dict]:
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
                shown = ("network", "params", "step_ms", "step_ratio", "peak_gib", "infer_ms")
                print(" ".join(f"{k}={format_cell(k, row[k])}" for k in shown), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows
