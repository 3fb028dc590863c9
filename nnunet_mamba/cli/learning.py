"""``nnunet-mamba learning-benchmark``: do the trainers learn as well as nnU-Net's? Real nnU-Net runs, one schedule.

Per dimension: a synthetic dataset (:func:`nnunet_mamba.synthetic.make_learning_dataset`) in nnU-Net's raw layout,
``nnUNetv2_plan_and_preprocess`` (nnU-Net's default planner, and the ResEnc M planner for that baseline), then
``nnUNetv2_train DATASET CONFIG 0 -tr <Trainer>_learnbench`` per trainer and seed, ``--jobs`` at once. Each seed has
its own ``nnUNet_results`` folder (named by the schedule too), so a rerun skips the runs already finished.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from ..synthetic import make_learning_dataset
from . import learning_results as results
from .demo import nnunet_command
from .environment import ext_trainer_value

DATASET_IDS = {2: 961, 3: 962}
CONFIGS = {2: "2d", 3: "3d_fullres"}
PLANNERS = {results.DEFAULT_PLANS: "ExperimentPlanner", results.RESENC_M_PLANS: "nnUNetPlannerResEncM"}
# GPU scale: 1,000 iterations; fold 0 validates on a fifth of the cases (50 in 2D, 30 in 3D)
DEFAULTS = {"dims": [2, 3], "seeds": [0, 1], "epochs": 20, "iterations": 50, "val_iterations": 10,
            "cases": {2: 250, 3: 150}, "size": {2: 128, 3: 48}, "work": "nnunet_mamba_learnbench"}
TINY = {"dims": [2], "seeds": [0, 1], "epochs": 2, "iterations": 5, "val_iterations": 2, "cases": {2: 20, 3: 15},
        "size": {2: 48, 3: 32}, "trainers": ["nnUNetTrainerUMambaBot"], "work": "nnunet_mamba_learnbench_tiny"}


@dataclass(frozen=True)
class Run:
    dim: int
    trainer: str  # the base trainer; nnU-Net trains its _learnbench variant
    plans: str
    seed: int
    results_dir: str  # this run's nnUNet_results
    log: str

    @property
    def label(self) -> str:
        return results.run_label(self.trainer, self.plans)

    @property
    def fold_dir(self) -> str:
        from ..trainers.learning import SUFFIX
        return os.path.join(self.results_dir, dataset_name(self.dim),
                            f"{self.trainer}{SUFFIX}__{self.plans}__{CONFIGS[self.dim]}", "fold_0")

    def finished(self) -> bool:
        return os.path.isfile(os.path.join(self.fold_dir, "validation", "summary.json"))

    @classmethod
    def in_work(cls, work: str, dim: int, trainer: str, plans: str, seed: int, schedule: str) -> Run:
        """The run as a --work folder lays it out: results per schedule and seed, one log per run."""
        return cls(dim, trainer, plans, seed, os.path.join(work, "results", f"{schedule}_seed{seed}"),
                   os.path.join(work, "logs", f"{dim}d_{trainer}_{plans}_{schedule}_seed{seed}.log"))


def dataset_name(dim: int) -> str:
    return f"Dataset{DATASET_IDS[dim]:03d}_LearnBench{dim}D"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learning-benchmark",
                       help="train trainers and nnU-Net's baselines on synthetic context tasks (real nnUNetv2_train, "
                            "one schedule, several seeds); table of validation Dice, s/epoch, peak memory")
    p.add_argument("--dims", type=int, nargs="+", choices=(2, 3), help="dimensions (default: 2 3; --tiny: 2)")
    p.add_argument("--trainers", nargs="+", metavar="TRAINER[:PLANS]",
                   help="trainers (default: ours for each dimension without _demo and ImageNet-pretrained ones, plus "
                        "nnUNetTrainer and nnUNetTrainer:nnUNetResEncUNetMPlans); PLANS: nnUNetPlans (default) "
                        "or nnUNetResEncUNetMPlans")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds per trainer (default: 0 1)")
    p.add_argument("--epochs", type=int, help=f"epochs (default: {DEFAULTS['epochs']}; --tiny: {TINY['epochs']})")
    p.add_argument("--iterations", type=int,
                   help=f"training iterations per epoch (default: {DEFAULTS['iterations']}; --tiny: "
                        f"{TINY['iterations']})")
    p.add_argument("--val-iterations", type=int,
                   help=f"pseudo-Dice iterations per epoch (default: {DEFAULTS['val_iterations']})")
    p.add_argument("--cases", type=int, help="cases per dataset, a fifth validates (default: 250 in 2D, 150 in 3D)")
    p.add_argument("--size", type=int, help="image side in pixels (default: 128 in 2D, 48 in 3D)")
    p.add_argument("--jobs", type=int, help="trainings at once (default: CPU cores / 2 on CUDA, 1 on a CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--work", help="work folder, kept; a rerun skips finished runs (default: ./"
                                  f"{DEFAULTS['work']}, --tiny: ./{TINY['work']})")
    p.add_argument("--out", help="write PREFIX.md, PREFIX.csv, PREFIX.png, PREFIX_dice_epochs.png "
                                 "(default: WORK/learning_benchmark)")
    p.add_argument("--json", help="also write the table and every run's numbers to this JSON file")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="SECONDS after the command starts (data and preprocessing included), start no run and stop "
                        "the unfinished ones; the table shows the finished runs and a rerun with the same --work "
                        "trains the rest")
    p.add_argument("--tiny", action="store_true",
                   help="CPU scale: one trainer, 2D, small images, 2 short epochs (minutes)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="train nothing: one table (--out, --json) from the runs in these --json files of earlier "
                        "invocations (one schedule; e.g. seeds trained on different machines)")
    p.add_argument("--collect", nargs="+", metavar="WORK",
                   help="train nothing: the table (--out, --json) from the nnU-Net files in these --work folders, "
                        "finished and unfinished runs, e.g. of a benchmark that was killed before its report; run it "
                        "on the machine that trained them (the device name is this machine's); one schedule, "
                        "chosen with --epochs/--iterations/--val-iterations where the folders hold several")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments with defaults filled in (--tiny's where given), validated before any work."""
    base = {**DEFAULTS, **TINY} if args.tiny else DEFAULTS
    s = argparse.Namespace(**vars(args))
    s.started = time.monotonic()  # --time-limit counts from here
    for key in ("dims", "seeds", "epochs", "iterations", "val_iterations", "work"):
        if getattr(s, key) is None:
            setattr(s, key, base[key])
    s.dims = sorted(set(s.dims))
    s.cases = {d: args.cases or base["cases"][d] for d in s.dims}
    s.size = {d: args.size or base["size"][d] for d in s.dims}
    s.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    s.jobs = args.jobs or (max(1, (os.cpu_count() or 2) // 2) if s.device == "cuda" else 1)
    s.work = os.path.abspath(s.work)
    s.out = args.out or os.path.join(s.work, "learning_benchmark")
    errors = []
    if s.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda: no CUDA device visible")
    if len(set(s.seeds)) != len(s.seeds):
        errors.append(f"--seeds must differ: {s.seeds}")
    s.time_limit = getattr(args, "time_limit", None)
    if s.time_limit is not None and s.time_limit <= 0:
        errors.append("--time-limit must be positive")
    for key, low in (("epochs", 1), ("iterations", 1), ("val_iterations", 1), ("jobs", 1)):
        if getattr(s, key) < low:
            errors.append(f"--{key.replace('_', '-')} must be at least {low}")
    if any(c < 10 for c in s.cases.values()):
        errors.append("--cases must be at least 10 (nnU-Net's 5-fold split: 2 validation cases)")
    if any(v < 32 for v in s.size.values()):
        errors.append("--size must be at least 32")
    s.trainers, trainer_errors = _trainer_list(args.trainers or base.get("trainers"), s.dims)
    if errors or trainer_errors:
        raise SystemExit("learning-benchmark: " + "; ".join(errors + trainer_errors))
    return s


def _trainer_list(requested: list[str] | None, dims: list[int]):
    """{dim: [(trainer, plans), ...]} baselines first, and the errors found in ``requested``."""
    from ..trainers.learning import base_trainers, needs_pretrained_weights, trainer_dims

    known = base_trainers()
    if requested is None:
        ours = [n for n in known if n != results.BASELINE and not needs_pretrained_weights(n)]
        baselines = [(results.BASELINE, results.DEFAULT_PLANS), (results.BASELINE, results.RESENC_M_PLANS)]
        return {d: baselines + [(n, results.DEFAULT_PLANS) for n in ours if d in trainer_dims(n)]
                for d in dims}, []
    errors, chosen = [], []
    for item in requested:
        trainer, _, plans = item.partition(":")
        plans = plans or results.DEFAULT_PLANS
        if trainer.endswith("_learnbench"):
            trainer = trainer[:-len("_learnbench")]
        if trainer not in known:
            errors.append(f"unknown trainer {trainer!r} (see `nnunet-mamba list`; _demo trainers have their own "
                          "schedule)")
        elif plans not in PLANNERS:
            errors.append(f"{item}: plans must be one of {', '.join(PLANNERS)}")
        elif plans != results.DEFAULT_PLANS and trainer != results.BASELINE:
            errors.append(f"{item}: only nnUNetTrainer trains on {plans} here")
        else:
            for d in dims:
                if d not in trainer_dims(trainer):
                    errors.append(f"{trainer} does not support {d}D (it supports "
                                  f"{'/'.join(f'{x}D' for x in trainer_dims(trainer))}): drop it or --dims")
            chosen.append((trainer, plans))
    chosen.sort(key=lambda t: not results.is_baseline(t[0]))
    return {d: list(dict.fromkeys(chosen)) for d in dims}, errors


def _environment(s: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.update(nnUNet_raw=os.path.join(s.work, "raw"), nnUNet_preprocessed=os.path.join(s.work, "preprocessed"),
               nnUNet_extTrainer=ext_trainer_value(env.get("nnUNet_extTrainer", "")), PYTHONUNBUFFERED="1")
    env.setdefault("nnUNet_compile", "f")  # compiling costs more than a short run wins back
    # validation and export worker processes; each one re-imports torch
    env.setdefault("nnUNet_def_n_proc", "2" if s.device == "cuda" else "1")
    return env


def _call(command: list[str], env: dict[str, str], log: str) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(command)}\n")
        f.flush()
        code = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"learning-benchmark: {os.path.basename(command[0])} failed (exit {code}); log: {log}")


def prepare(s: argparse.Namespace, dim: int, env: dict[str, str]) -> None:
    """The dataset and its preprocessed data for every plans needed; what exists (same settings) is kept."""
    os.makedirs(os.path.join(s.work, "logs"), exist_ok=True)
    log = os.path.join(s.work, "logs", f"prepare_{dim}d.log")
    raw = os.path.join(env["nnUNet_raw"], dataset_name(dim))
    settings = {"size": s.size[dim], "cases": s.cases[dim], "seed": 0}
    marker = os.path.join(raw, "learnbench.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            previous = json.load(f)
        if previous != settings:
            raise SystemExit(f"learning-benchmark: {raw} was made with {previous}, not {settings}: "
                             "use another --work")
    else:
        print(f"learning-benchmark: writing {s.cases[dim]} {dim}D cases of side {s.size[dim]} to {raw}", flush=True)
        make_learning_dataset(env["nnUNet_raw"], DATASET_IDS[dim], [s.size[dim]] * dim, s.cases[dim],
                              name=f"LearnBench{dim}D")
        with open(marker, "w") as f:
            json.dump(settings, f)
    processes = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
    for plans in dict.fromkeys(p for _, p in s.trainers[dim]):
        done = os.path.join(env["nnUNet_preprocessed"], dataset_name(dim), f".learnbench_{plans}_{CONFIGS[dim]}")
        if os.path.isfile(done):
            continue
        print(f"learning-benchmark: planning and preprocessing {dim}D for {plans} (log: {log})", flush=True)
        # nnU-Net's planner needs at least one augmentation process
        _call([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_IDS[dim]), "-c", CONFIGS[dim],
               "-pl", PLANNERS[plans], "-np", processes, "-npfp", processes, "--verify_dataset_integrity"],
              {**env, "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "1")}, log)
        open(done, "w").close()


def _runs(s: argparse.Namespace) -> list[Run]:
    schedule = results.schedule_name(s.epochs, s.iterations, s.val_iterations)
    return [Run.in_work(s.work, dim, trainer, plans, seed, schedule)
            # seed-major: a run stopped by --time-limit leaves every trainer with its first seeds
            for dim in s.dims for seed in s.seeds for trainer, plans in s.trainers[dim]]


def _current_epoch(log: str) -> int:
    try:
        with open(log, errors="replace") as f:
            epochs = re.findall(r": Epoch (\d+)\s*$", f.read(), re.MULTILINE)
    except OSError:
        return 0
    return int(epochs[-1]) + 1 if epochs else 0


def train(s: argparse.Namespace, runs: list[Run], env: dict[str, str]) -> list[Run]:
    """Train the unfinished runs, ``s.jobs`` at once, with a progress bar; returns the failed ones."""
    from tqdm import tqdm

    from ..trainers.learning import EPOCHS_ENV, ITERATIONS_ENV, SEED_ENV, SUFFIX, VAL_ITERATIONS_ENV

    todo = [r for r in runs if not r.finished()]
    deadline = None if s.time_limit is None else s.started + s.time_limit
    if len(todo) < len(runs):
        print(f"learning-benchmark: {len(runs) - len(todo)} of {len(runs)} runs already finished in {s.work}")
    running: dict[Run, subprocess.Popen] = {}
    failed: list[Run] = []
    # nnU-Net's augmentation in the training process on a CPU; 2 worker processes each on a GPU
    workers = env.get("nnUNet_n_proc_DA", "2" if s.device == "cuda" else "0")
    with tqdm(total=len(todo), desc="training runs", unit="run", dynamic_ncols=True) as bar:
        while todo or running:
            if deadline is not None and time.monotonic() > deadline:
                for r, process in running.items():
                    process.terminate()
                    tqdm.write(f"learning-benchmark: --time-limit reached, stopped {r.dim}D {r.label} seed {r.seed}")
                for process in running.values():
                    process.wait()
                print(f"learning-benchmark: --time-limit reached: {len(todo) + len(running)} run(s) not finished; "
                      f"rerun with --work {s.work} to train them", file=sys.stderr)
                break
            while todo and len(running) < s.jobs:
                r = todo.pop(0)
                run_env = {**env, "nnUNet_results": r.results_dir, "nnUNet_n_proc_DA": workers,
                           EPOCHS_ENV: str(s.epochs), ITERATIONS_ENV: str(s.iterations),
                           VAL_ITERATIONS_ENV: str(s.val_iterations), SEED_ENV: str(r.seed)}
                command = [nnunet_command("nnUNetv2_train"), str(DATASET_IDS[r.dim]), CONFIGS[r.dim], "0",
                           "-tr", r.trainer + SUFFIX, "-p", r.plans, "-device", s.device]
                with open(r.log, "w") as log:
                    log.write(f"$ {' '.join(command)}\n")
                    log.flush()
                    running[r] = subprocess.Popen(command, env=run_env, stdout=log, stderr=subprocess.STDOUT)
            time.sleep(1.0)
            for r, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[r]
                bar.update(1)
                if process.returncode != 0 or not r.finished():
                    failed.append(r)
                    tqdm.write(f"learning-benchmark: {r.dim}D {r.label} seed {r.seed} failed "
                               f"(exit {process.returncode}); log: {r.log}")
            status = ", ".join(f"{r.dim}D {r.label} s{r.seed} epoch {_current_epoch(r.log)}/{s.epochs}"
                               for r in running)
            if status != bar.postfix:
                bar.set_postfix_str(status)
    return failed


def _report(header: str, records: list[dict], out: str, json_path: str | None, failed: list[dict],
            unfinished: list[dict]) -> None:
    rows = results.aggregate(records)
    print(header)
    if rows:
        print("\n".join(results.table_lines(rows)))
        print("Dice: mean ±half the spread (max - min) over seeds; vs default: fg Dice - nnUNetTrainer's (points)")
        print("wrote " + ", ".join(results.write_outputs(out, rows, records, header)))
    if unfinished:
        print("not in the table, unfinished:\n" + "\n".join("  " + results.progress_line(u) for u in unfinished))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": header, "rows": rows, "runs": records, "failed": failed, "unfinished": unfinished},
                      f, indent=2)


def merge(args: argparse.Namespace) -> int:
    """``--merge``: the runs of several ``--json`` files in one table; refuses mixed schedules and repeated runs."""
    records, unfinished = results.merge_runs(args.merge)
    if not records:
        raise SystemExit("learning-benchmark --merge: the files hold no finished run")
    records.sort(key=lambda r: (r["dim"], r["label"], r["seed"]))  # a recipe's twin next to its trainer
    schedule = records[0]["schedule"]
    devices = sorted({r["device"] for r in records})
    header = (f"device: {', '.join(devices)} | schedule: "
              f"{results.describe_schedule(schedule) if schedule else 'unknown'} | "
              f"{len(records)} runs merged from {len(args.merge)} files")
    _report(header, records, args.out or "learning_benchmark", args.json, [], unfinished)
    return 0


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "CPU"


@contextlib.contextmanager
def _work_lock(work: str):
    """One benchmark per work folder at a time: a second one would re-preprocess data (nnU-Net's ResEnc planners
    write into the default plans' folder) that the first one's runs are reading."""
    path = os.path.join(work, ".learnbench.lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise SystemExit(f"learning-benchmark: {work} is in use by another learning-benchmark (pid {holder}); "
                             "train more runs at once with --jobs, or use another --work") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_RESULTS_DIR = re.compile(r"(e\d+_i\d+_v\d+)_seed(\d+)$")


def collect(args: argparse.Namespace) -> int:
    """``--collect``: the runs found in work folders, read from nnU-Net's files (no training)."""
    from ..trainers.learning import SUFFIX

    configs = {config: dim for dim, config in CONFIGS.items()}
    found: dict[str, list[Run]] = {}
    for work in map(os.path.abspath, args.collect):
        results_root = os.path.join(work, "results")
        if not os.path.isdir(results_root):
            raise SystemExit(f"learning-benchmark --collect: {work} has no results folder (not a --work folder?)")
        for name in sorted(os.listdir(results_root)):
            match = _RESULTS_DIR.match(name)
            if not match:
                continue
            schedule, seed = match.group(1), int(match.group(2))
            for dim, dataset in ((d, dataset_name(d)) for d in DATASET_IDS):
                folder = os.path.join(results_root, name, dataset)
                for model in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                    trainer, plans, config = (model.split("__") + ["", ""])[:3]
                    if not trainer.endswith(SUFFIX) or configs.get(config) != dim:
                        continue
                    found.setdefault(schedule, []).append(
                        Run.in_work(work, dim, trainer[:-len(SUFFIX)], plans, seed, schedule))
    wanted = [args.epochs, args.iterations, args.val_iterations]
    if any(v is not None for v in wanted):
        if None in wanted:
            raise SystemExit("learning-benchmark --collect: give all of --epochs, --iterations, --val-iterations")
        schedule = results.schedule_name(*wanted)
        if schedule not in found:
            raise SystemExit(f"learning-benchmark --collect: no runs of {schedule} (found: "
                             f"{', '.join(sorted(found)) or 'none'})")
    elif len(found) == 1:
        schedule = next(iter(found))
    else:
        raise SystemExit(f"learning-benchmark --collect: the folders hold runs of {len(found)} schedules "
                         f"({', '.join(sorted(found)) or 'none'}): choose one with --epochs/--iterations/"
                         "--val-iterations")
    device = _device_name("cuda") if torch.cuda.is_available() else "unknown"
    records, unfinished = _read_runs(found[schedule], schedule, device, [])
    if not records and not unfinished:
        raise SystemExit(f"learning-benchmark --collect: no run of {schedule} has trained an epoch")
    header = (f"device: {device} | schedule: {results.describe_schedule(schedule)} | {len(records)} finished and "
              f"{len(unfinished)} unfinished runs collected from {len(args.collect)} work folders")
    _report(header, records, args.out or "learning_benchmark", args.json, [], unfinished)
    return 0


def _read_runs(runs: list[Run], schedule: str, device: str, failed: list[Run]) -> tuple[list[dict], list[dict]]:
    """The finished runs' numbers (:func:`results.read_run`) and the unfinished ones' progress."""
    records, unfinished = [], []
    epochs = results.parse_schedule(schedule)[0]
    for r in runs:
        run = {"dim": r.dim, "trainer": r.trainer, "plans": r.plans, "label": r.label, "seed": r.seed,
               "schedule": schedule, "device": device, "log": r.log}
        if r in failed or not r.finished():
            # stopped by --time-limit or failed: its curve from nnU-Net's log, so that the time it trained still counts
            progress = results.read_progress(r.fold_dir)
            if progress and progress["epochs_done"]:
                unfinished.append({**run, "epochs": epochs, **progress})
            continue
        records.append({**run, **results.read_run(r.fold_dir)})
    return records, unfinished


def run(args: argparse.Namespace) -> int:
    if getattr(args, "merge", None):
        return merge(args)
    if getattr(args, "collect", None):
        return collect(args)
    s = _settings(args)
    os.makedirs(s.work, exist_ok=True)
    with _work_lock(s.work):
        return _run(s)


def _run(s: argparse.Namespace) -> int:
    env = _environment(s)
    for dim in s.dims:
        prepare(s, dim, env)
    runs = _runs(s)
    failed = train(s, runs, env)
    schedule, device = results.schedule_name(s.epochs, s.iterations, s.val_iterations), _device_name(s.device)
    records, unfinished = _read_runs(runs, schedule, device, failed)
    sizes = ", ".join(f"{d}D {s.size[d]} px x {s.cases[d]} cases" for d in s.dims)
    header = (f"device: {device} | schedule: {results.describe_schedule(schedule)} | seeds "
              f"{' '.join(map(str, s.seeds))} | {sizes} | {s.jobs} runs at once (s/epoch: median epoch time)")
    _report(header, records, s.out, s.json,
            [{"dim": r.dim, "trainer": r.label, "seed": r.seed, "log": r.log} for r in failed], unfinished)
    if failed:
        print(f"learning-benchmark: {len(failed)} run(s) failed; logs: " + ", ".join(r.log for r in failed),
              file=sys.stderr)
        return 1
    return 0
