"""What ``nnunet-mamba benchmark`` reports: the medians over passes, the ratios to the baseline, the console table,
and the --json / --out files (Markdown, CSV, PNG)."""
from __future__ import annotations

import argparse
import json
import math
import statistics
from typing import Any

from ..planning.baselines import BASELINES
from .report import aligned_lines, bar_panel, markdown_table, pyplot, write_csv, write_lines

COLUMNS = [("network", "network"), ("params", "params"), ("gmacs", "GMACs/img"), ("gflops", "GFLOPs/img"),
           ("step_ms", "step ms"), ("step_ratio", "x base"), ("peak_gib", "peak GiB"), ("peak_ratio", "x base"),
           ("est_gib", "est GiB"), ("infer_ms", "infer ms"), ("backend", "backend")]


def median_rows(passes: list[list[dict]]) -> list[dict]:
    """One row per network: the median of each timing over the passes (peak memory and counts do not vary)."""
    rows = []
    for per_pass in zip(*passes):
        row = dict(per_pass[0])
        for key in ("step_ms", "infer_ms"):
            row[key] = statistics.median(r[key] for r in per_pass)
        row["step_ms_all"] = [round(r["step_ms"], 2) for r in per_pass]
        rows.append(row)
    return rows


def table_rows(rows: list[dict]) -> list[dict]:
    """Rows with the ratios to the baseline (the first baseline in the list) filled in."""
    base = next((r for r in rows if r["network"] in BASELINES), None)
    out = []
    for r in rows:
        r = dict(r)
        r["step_ratio"] = r["step_ms"] / base["step_ms"] if base else float("nan")
        r["peak_ratio"] = r["peak_gib"] / base["peak_gib"] if base else float("nan")
        out.append(r)
    return out


def format_cell(key: str, value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.2f}" if key.endswith(("ratio", "gib")) else f"{value:.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _columns(rows: list[dict]) -> list[tuple]:
    return [(k, t) for k, t in COLUMNS if any(k in r for r in rows)]


def _cells(rows: list[dict], columns: list[tuple]) -> list[list[str]]:
    return [[format_cell(k, r.get(k, float("nan"))) for k, _ in columns] for r in rows]


def table_lines(rows: list[dict]) -> list[str]:
    """The table as aligned console lines (names left-aligned, numbers right-aligned)."""
    columns = _columns(rows)
    left = [i for i, (k, _) in enumerate(columns) if k in ("network", "backend")]
    return aligned_lines([[t for _, t in columns], *_cells(rows, columns)], left, pad=2, sep=" ")


def write_outputs(prefix: str, rows: list[dict], header: str) -> list[str]:
    """PREFIX.md, PREFIX.csv and PREFIX.png for the table rows; returns the paths written."""
    columns = _columns(rows)
    write_lines(prefix + ".md", markdown_table(header, [t for _, t in columns], _cells(rows, columns)))
    write_csv(prefix + ".csv", [k for k, _ in columns], rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8), sharey=True)
    names = [r["network"] for r in rows]
    for ax, key, label in ((axes[0], "step_ms", "training step (ms)"), (axes[1], "peak_gib", "peak memory (GiB)")):
        bar_panel(ax, names, [r[key] for r in rows], [n in BASELINES for n in names], label, ".1f")
    fig.suptitle(header, fontsize=9)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)
    plt.close(fig)
    return [prefix + ".md", prefix + ".csv", prefix + ".png"]


def write_results(args: argparse.Namespace, where: str, header: str, rows: list[dict]) -> None:
    """--json and --out files of a run."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "header": header, "rows": rows}, f, indent=2)
    if args.out:
        print("wrote " + ", ".join(write_outputs(args.out, rows, header)))
