"""Results of ``nnunet-mamba learning-benchmark``: one run's numbers from nnU-Net's files, the per-trainer table
(mean and spread over seeds), and its Markdown/CSV/PNG files plus a Dice-versus-epoch plot."""
from __future__ import annotations

import json
import os
import re
import statistics
import textwrap
from collections.abc import Sequence

import torch

from ..synthetic import LEARNING_LABELS
from .report import aligned_lines, bar_panel, markdown_table, pyplot, write_csv, write_lines

CLASSES = [name for name, value in LEARNING_LABELS.items() if value]
DEFAULT_PLANS = "nnUNetPlans"
RESENC_M_PLANS = "nnUNetResEncUNetMPlans"
BASELINE = "nnUNetTrainer"


def run_label(trainer: str, plans: str) -> str:
    """The table's name for a trainer on a plans: ``nnUNetTrainer``, ``nnUNetTrainer (ResEnc M)``, ..."""
    if plans == DEFAULT_PLANS:
        return trainer
    return f"{trainer} ({'ResEnc M' if plans == RESENC_M_PLANS else plans})"


def schedule_name(epochs: int, iterations: int, val_iterations: int) -> str:
    """The schedule as the work folder names it: ``e20_i50_v10``."""
    return f"e{epochs}_i{iterations}_v{val_iterations}"


def parse_schedule(name: str) -> tuple[int, int, int]:
    """Epochs, iterations per epoch and pseudo-Dice iterations of a schedule name (``schedule_name``'s inverse)."""
    epochs, iterations, val = (int(part[1:]) for part in name.split("_"))
    return epochs, iterations, val


def describe_schedule(name: str) -> str:
    epochs, iterations, val = parse_schedule(name)
    return (f"{epochs} epochs x {iterations} iterations (= {epochs * iterations}), {val} pseudo-Dice iterations "
            "per epoch")


_HEADER_SCHEDULE = re.compile(r"schedule: (\d+) epochs x (\d+) iterations \(= \d+\), (\d+) pseudo-Dice")
_HEADER_DEVICE = re.compile(r"device: ([^|]+?) \|")


def merge_runs(paths: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """The runs of several ``--json`` files, each with its ``schedule`` and ``device`` (from the file's header
    where a run lacks them: files of earlier versions), and the unfinished runs of that schedule they list (files of
    earlier versions list none) unless another file has that run finished (a rerun that completed it). Raises
    SystemExit on mixed schedules or a run (dimension, trainer, seed) found twice."""
    records, unfinished, seen = [], [], {}
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            header, runs = data["header"], data["runs"]
            unfinished += data.get("unfinished", [])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"learning-benchmark --merge: {path} is not a learning-benchmark --json file ({e})")
        schedule, device = _HEADER_SCHEDULE.search(header), _HEADER_DEVICE.search(header)
        for run in runs:
            run = dict(run)
            run.setdefault("schedule", schedule and schedule_name(*map(int, schedule.groups())))
            run.setdefault("device", device.group(1) if device else "?")
            key = (run["schedule"], run["dim"], run["label"], run["seed"])
            if key in seen:
                raise SystemExit(f"learning-benchmark --merge: {run['dim']}D {run['label']} seed {run['seed']} is "
                                 f"in both {seen[key]} and {path}")
            seen[key] = path
            records.append(run)
    schedules = sorted({str(r["schedule"]) for r in records})
    if len(schedules) > 1:
        raise SystemExit("learning-benchmark --merge: the files hold runs of different schedules "
                         f"({', '.join(schedules)}): one table compares one schedule")
    return records, [u for u in unfinished
                     if u.get("schedule") in schedules
                     and (u["schedule"], u["dim"], u["label"], u["seed"]) not in seen]


def is_baseline(trainer: str) -> bool:
    return trainer == BASELINE


def read_run(fold_dir: str) -> dict:
    """Final validation Dice (per class and foreground mean), median seconds per epoch, peak CUDA memory (GiB,
    None on a CPU) and the per-epoch pseudo Dice of a finished nnU-Net run (its ``fold_0`` folder). The curve and
    times come from the final checkpoint, or from nnU-Net's training log where the checkpoint is gone (a copy of the
    results without weights; no EMA curve then)."""
    with open(os.path.join(fold_dir, "validation", "summary.json")) as f:
        summary = json.load(f)
    dice = {name: float(summary["mean"][str(LEARNING_LABELS[name])]["Dice"]) for name in CLASSES}
    checkpoint_path = os.path.join(fold_dir, "checkpoint_final.pth")
    if os.path.isfile(checkpoint_path):
        # our own file, written by nnU-Net in this benchmark: safe to unpickle
        logging = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["logging"]
        durations = [end - start for start, end in zip(logging["epoch_start_timestamps"],
                                                        logging["epoch_end_timestamps"])]
        seconds, pseudo = statistics.median(durations), [float(v) for v in logging["mean_fg_dice"]]
        ema = [float(v) for v in logging["ema_fg_dice"]]
    else:
        progress = read_progress(fold_dir)
        if progress is None:
            raise FileNotFoundError(f"{fold_dir}: neither checkpoint_final.pth nor a training log to read the "
                                    "run's curve and epoch times from")
        seconds, pseudo, ema = progress["sec_per_epoch"], progress["pseudo_dice"], None
    peak = None
    memory_file = os.path.join(fold_dir, "learnbench_memory.json")
    if os.path.isfile(memory_file):
        with open(memory_file) as f:
            peak_bytes = json.load(f).get("peak_memory_bytes")
        peak = None if peak_bytes is None else peak_bytes / 2 ** 30
    return {"fg_dice": float(summary["foreground_mean"]["Dice"]), **{f"dice_{k}": v for k, v in dice.items()},
            "sec_per_epoch": seconds, "peak_gib": peak, "pseudo_dice": pseudo, "ema_dice": ema}


_PSEUDO_DICE_LINE = re.compile(r"Pseudo dice \[(.*)\]")
# the class values of a pseudo-Dice line, "[0.9, 0.8]" or numpy 2's "[np.float32(0.9), ...]" ("32" is skipped)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?")
_EPOCH_TIME_LINE = re.compile(r"Epoch time: ([0-9.]+) s")


def read_progress(fold_dir: str) -> dict | None:
    """How far an unfinished run got, from nnU-Net's newest training log in ``fold_dir``: epochs done, the per-epoch
    pseudo Dice (mean over the classes, as ``read_run``'s) and the median epoch time; None without a log."""
    try:
        logs = sorted(n for n in os.listdir(fold_dir) if n.startswith("training_log_") and n.endswith(".txt"))
    except OSError:
        logs = []
    if not logs:
        return None
    # nnU-Net names its logs by the start time: the last one sorted is the newest (a resumed run writes a new one)
    with open(os.path.join(fold_dir, logs[-1]), errors="replace") as f:
        text = f.read()
    per_class = (_NUMBER.findall(m) for m in _PSEUDO_DICE_LINE.findall(text))
    pseudo = [statistics.fmean(map(float, values)) for values in per_class if values]
    times = [float(v) for v in _EPOCH_TIME_LINE.findall(text)]
    return {"epochs_done": len(times), "pseudo_dice": pseudo,
            "sec_per_epoch": statistics.median(times) if times else None}


def progress_line(entry: dict) -> str:
    """One console line for an unfinished run."""
    last = f", last pseudo Dice {entry['pseudo_dice'][-1]:.3f}" if entry.get("pseudo_dice") else ""
    return (f"{entry['dim']}D {entry['label']} seed {entry['seed']}: {entry['epochs_done']} of "
            f"{entry['epochs']} epochs{last} (no final validation)")


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (dimension, trainer label) over its seeds: mean and spread (max - min) of each Dice, mean seconds
    per epoch, largest peak memory, and the foreground Dice's difference to ``nnUNetTrainer`` (points, x100).
    Rows keep the runs' order within a dimension, baselines first."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dim"], r["label"]), []).append(r)
    rows = []
    for (dim, label), members in groups.items():
        row = {"dim": f"{dim}D", "trainer": label, "seeds": len(members),
               "baseline": is_baseline(members[0]["trainer"])}
        for key in ["fg_dice", *(f"dice_{c}" for c in CLASSES)]:
            values = [m[key] for m in members]
            row[key] = statistics.fmean(values)
            row[key + "_spread"] = max(values) - min(values)
        row["sec_per_epoch"] = _mean([m["sec_per_epoch"] for m in members])
        peaks = [m["peak_gib"] for m in members if m["peak_gib"] is not None]
        row["peak_gib"] = max(peaks) if peaks else None
        rows.append(row)
    rows.sort(key=lambda r: (r["dim"], not r["baseline"]))  # stable: the given order otherwise
    for row in rows:
        reference = next((r for r in rows if r["dim"] == row["dim"] and r["trainer"] == BASELINE), None)
        row["delta_points"] = None if reference is None else 100 * (row["fg_dice"] - reference["fg_dice"])
    return rows


COLUMNS = [("dim", "dim"), ("trainer", "trainer"), ("seeds", "seeds"), ("fg_dice", "fg Dice"),
           *((f"dice_{c}", c) for c in CLASSES), ("delta_points", "vs default (pts)"),
           ("sec_per_epoch", "s/epoch"), ("peak_gib", "peak GiB")]


def format_cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "fg_dice" or key.startswith("dice_"):
        return f"{value:.3f} ±{row[key + '_spread'] / 2:.3f}"
    if key == "delta_points":
        return f"{value:+.1f}"
    if isinstance(value, float):
        return f"{value:.2f}" if key == "peak_gib" else f"{value:.1f}"
    return str(value)


def table_lines(rows: list[dict]) -> list[str]:
    """The table as aligned console lines."""
    cells = [[t for _, t in COLUMNS]] + [[format_cell(r, k) for k, _ in COLUMNS] for r in rows]
    return aligned_lines(cells, left=(0, 1))


def write_outputs(prefix: str, rows: list[dict], runs: list[dict], header: str) -> list[str]:
    """PREFIX.md, PREFIX.csv, PREFIX.png (foreground Dice per trainer) and PREFIX_dice_epochs.png (pseudo Dice per
    epoch, mean over seeds); returns the paths written."""
    folder = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    md = markdown_table(header, [t for _, t in COLUMNS], ([format_cell(r, k) for k, _ in COLUMNS] for r in rows))
    md += ["", "Dice: mean ± half the spread (max - min) over seeds, on fold 0's validation cases; "
           "vs default: foreground Dice minus nnUNetTrainer's, in points."]
    write_lines(prefix + ".md", md)
    fields = ["dim", "trainer", "seeds", "fg_dice", "fg_dice_spread"]
    fields += [k for c in CLASSES for k in (f"dice_{c}", f"dice_{c}_spread")]
    fields += ["delta_points", "sec_per_epoch", "peak_gib"]
    write_csv(prefix + ".csv", fields, rows)
    plt = pyplot()

    dims = list(dict.fromkeys(r["dim"] for r in rows))
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 0.4 * max(len(rows), 4) + 1.8), squeeze=False)
    for ax, dim in zip(axes[0], dims):
        mine = [r for r in rows if r["dim"] == dim]
        bar_panel(ax, [r["trainer"] for r in mine], [r["fg_dice"] for r in mine], [r["baseline"] for r in mine],
                  f"{dim}: foreground-mean validation Dice", ".3f", xerr=[r["fg_dice_spread"] / 2 for r in mine])
        ax.set_xlim(0, 1)
    fig.suptitle(textwrap.fill(header, 60 * len(dims)), fontsize=8)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(dims), figsize=(6.5 * len(dims), 4.5), squeeze=False)
    for ax, dim in zip(axes[0], dims):
        for row in (r for r in rows if r["dim"] == dim):
            curves = [r["pseudo_dice"] for r in runs if f"{r['dim']}D" == dim and r["label"] == row["trainer"]]
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[e] for c in curves) for e in range(length)]
            ax.plot(range(1, length + 1), mean, label=row["trainer"], linestyle="--" if row["baseline"] else "-")
        ax.set_xlabel("epoch")
        ax.set_ylabel("pseudo Dice (foreground mean, mean over seeds)")
        ax.set_title(dim)
        ax.legend(fontsize=6)
    fig.suptitle(textwrap.fill(header, 60 * len(dims)), fontsize=8)
    fig.tight_layout()
    fig.savefig(prefix + "_dice_epochs.png", dpi=120)
    plt.close(fig)
    return [prefix + ".md", prefix + ".csv", prefix + ".png", prefix + "_dice_epochs.png"]
