"""``nnunet-mamba demo``: synthetic 2D dataset -> nnU-Net plan/preprocess -> short U-Mamba training -> predict -> Dice.

Everything goes through nnU-Net's own commands (subprocesses), exactly as a user would run them. Their full output
goes to ``demo.log`` in the work folder; nnU-Net's epoch lines are echoed as progress. The work folder is kept when
a step fails, so its log can be read.
"""
from __future__ import annotations

import argparse
import difflib
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO

from .environment import ext_trainer_value

DEMO_DATASET_ID = 987


def nnunet_command(name: str) -> str:
    """Path of an nnU-Net console script, preferring the one beside this Python interpreter."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    found = local if os.path.isfile(local) else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: is nnunetv2 installed in this environment?")
    return found


# nnU-Net's per-epoch log lines (after its timestamp), shown as progress while training
PROGRESS_LINE = re.compile(r"(Epoch \d+|Current learning rate|train_loss|val_loss|Pseudo dice|Epoch time|"
                           r"Predicting|Mean Validation Dice)")
HEARTBEAT_S = 15.0  # a step with no progress line for this long prints its elapsed time


def check_trainer(name: str) -> None:
    """``SystemExit`` naming the closest matches unless ``name`` is one of our trainers or one of nnU-Net's own."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from .. import trainers
    import nnunetv2

    ours = trainers.list_trainers()
    if name in ours or recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"),
                                                   name, "nnunetv2.training.nnUNetTrainer") is not None:
        return
    close = difflib.get_close_matches(name, ours, n=3)
    suggestion = f"; did you mean {' or '.join(close)}?" if close else ""
    raise SystemExit(f"demo: --trainer {name!r} is neither one of our trainers nor one of nnU-Net's{suggestion} "
                     "(`nnunet-mamba list` lists ours)")


def run_step(command: list[str], env: dict[str, str], log: IO[str]) -> int:
    """Run ``command``, its output into ``log``; echo nnU-Net's progress lines, and the elapsed time when quiet."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1)
    lines: queue.Queue[object] = queue.Queue()
    done = object()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(done)

    threading.Thread(target=pump, daemon=True).start()
    start = last_shown = time.time()
    try:
        while True:
            try:
                line = lines.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                line = None
            if line is done:
                break
            if line is not None:
                log.write(line)
                log.flush()
                match = PROGRESS_LINE.search(line)
                if match:
                    print(f"demo:       {line[match.start():].rstrip()}", flush=True)
                    last_shown = time.time()
            if time.time() - last_shown >= HEARTBEAT_S:
                print(f"demo:       ... {time.time() - start:.0f} s", flush=True)
                last_shown = time.time()
        return process.wait()
    finally:
        if process.poll() is None:  # interrupted: do not leave nnU-Net running
            process.terminate()
            process.wait()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train and evaluate a U-Mamba on a small synthetic 2D dataset (minutes on a CPU)")
    p.add_argument("--folder", help="work folder (kept); default: a temporary folder, removed at the end unless a "
                                    "step failed")
    p.add_argument("--trainer", default="nnUNetTrainerUMambaBot_demo",
                   help="nnU-Net trainer to use (default: %(default)s, 2 short epochs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--cases", type=int, default=10, help="training cases (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image side length in pixels (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # every argument is checked before any work starts
    if args.cases < 5:
        raise SystemExit("demo: --cases must be at least 5 (nnU-Net makes a 5-fold split)")
    if args.size < 16:
        raise SystemExit("demo: --size must be at least 16 pixels")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("demo: --device cuda, but torch sees no CUDA GPU (use --device cpu or auto)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    check_trainer(args.trainer)
    from ..synthetic import dice_scores, make_dataset

    work = os.path.abspath(args.folder) if args.folder else tempfile.mkdtemp(prefix="nnunet_mamba_demo_")
    os.makedirs(work, exist_ok=True)
    log_path = os.path.join(work, "demo.log")
    env = dict(os.environ)
    env.update({name: os.path.join(work, name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    env["nnUNet_extTrainer"] = ext_trainer_value(env.get("nnUNet_extTrainer", ""))
    # nnU-Net's planner needs >= 1 here; 0 (in-process augmentation) is fastest for a tiny CPU run
    env.setdefault("nnUNet_n_proc_DA", "1")
    # nnU-Net spawns this many worker processes for fingerprinting, validation and export; each one re-imports
    # torch, which costs more than it saves on images this small
    env.setdefault("nnUNet_def_n_proc", "1")
    # compiling costs minutes (the first GPU epoch of the demo trainer took 121 s with it), never won back in two
    # short epochs; real training keeps nnU-Net's default
    env.setdefault("nnUNet_compile", "f")
    train_env = {} if "nnUNet_n_proc_DA" in os.environ or device != "cpu" else {"nnUNet_n_proc_DA": "0"}
    env.setdefault("PYTHONUNBUFFERED", "1")
    raw = make_dataset(env["nnUNet_raw"], DEMO_DATASET_ID, (args.size, args.size), n_train=args.cases, n_test=3)
    print(f"demo: work folder {work} (nnU-Net output in {log_path})")
    print(f"demo: synthetic dataset {os.path.basename(raw)}: {args.cases} training + 3 test images, "
          f"{args.size}x{args.size}, labels disk/box")
    prediction = os.path.join(work, "predictions")
    steps = [
        ("plan and preprocess", {}, [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DEMO_DATASET_ID),
                                 "-c", "2d", "-np", "1", "-npfp", "1",
                                     "--verify_dataset_integrity"]),
        (f"train {args.trainer}", train_env, [nnunet_command("nnUNetv2_train"), str(DEMO_DATASET_ID), "2d", "0",
                                   "-tr", args.trainer, "-device", device]),
        ("predict", {}, [nnunet_command("nnUNetv2_predict"), "-i", os.path.join(raw, "imagesTs"), "-o", prediction,
                     "-d", str(DEMO_DATASET_ID), "-c", "2d", "-f", "0", "-tr", args.trainer, "-device", device,
                     "--disable_tta", "-npp", "1", "-nps", "1"]),
    ]
    start = time.time()
    failed = False
    try:
        with open(log_path, "a") as log:
            for number, (title, step_env, command) in enumerate(steps, 1):
                t0 = time.time()
                print(f"demo: [{number}/{len(steps)}] {title} ...", flush=True)
                log.write(f"\n$ {' '.join(command)}\n")
                log.flush()
                returncode = run_step(command, {**env, **step_env}, log)
                if returncode != 0:
                    failed = True
                    _print_tail(log_path)
                    print(f"demo: step '{title}' failed (exit {returncode}); full log (kept): {log_path}",
                          file=sys.stderr)
                    return returncode
                print(f"demo:       done in {time.time() - t0:.0f} s", flush=True)
        scores = dice_scores(prediction, os.path.join(raw, "labelsTs"))
        summary = ", ".join(f"{name} {value:.3f}" for name, value in scores.items())
        print(f"demo: Dice on 3 test images: {summary} (mean {sum(scores.values()) / len(scores):.3f}); "
              f"total {time.time() - start:.0f} s on {device}")
    finally:
        if not args.folder and not failed:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _print_tail(path: str, lines: int = 40) -> None:
    with open(path) as f:
        tail = f.readlines()[-lines:]
    sys.stderr.write("".join(tail))
