"""``nnunet-mamba demo``: synthetic 2D dataset -> nnU-Net plan/preprocess -> short U-Mamba training -> predict -> Dice.

Everything goes through nnU-Net's own commands (subprocesses), exactly as a user would run them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from ..synthetic import dice_scores, make_dataset
from .environment import ext_trainer_value

DEMO_DATASET_ID = 987


def nnunet_command(name: str) -> str:
    """Path of an nnU-Net console script, preferring the one beside this Python interpreter."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    found = local if os.path.isfile(local) else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: is nnunetv2 installed in this environment?")
    return found


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train and evaluate a U-Mamba on a small synthetic 2D dataset (minutes on a CPU)")
    p.add_argument("--folder", help="work folder (kept); default: a temporary folder removed at the end")
    p.add_argument("--trainer", default="nnUNetTrainerUMambaBot_demo",
                   help="nnU-Net trainer to use (default: %(default)s, 2 short epochs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--cases", type=int, default=10, help="training cases (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image side length in pixels (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.cases < 5:
        raise SystemExit("demo: --cases must be at least 5 (nnU-Net makes a 5-fold split)")
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
    try:
        with open(log_path, "a") as log:
            for number, (title, step_env, command) in enumerate(steps, 1):
                t0 = time.time()
                print(f"demo: [{number}/{len(steps)}] {title} ...", flush=True)
                log.write(f"\n$ {' '.join(command)}\n")
                log.flush()
                result = subprocess.run(command, env={**env, **step_env}, stdout=log, stderr=subprocess.STDOUT)
                if result.returncode != 0:
                    _print_tail(log_path)
                    print(f"demo: step '{title}' failed (exit {result.returncode}); full log: {log_path}",
                          file=sys.stderr)
                    return result.returncode
                print(f"demo:       done in {time.time() - t0:.0f} s", flush=True)
        scores = dice_scores(prediction, os.path.join(raw, "labelsTs"))
        summary = ", ".join(f"{name} {value:.3f}" for name, value in scores.items())
        print(f"demo: Dice on 3 test images: {summary} (mean {sum(scores.values()) / len(scores):.3f}); "
              f"total {time.time() - start:.0f} s on {device}")
    finally:
        if not args.folder:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _print_tail(path: str, lines: int = 40) -> None:
    with open(path) as f:
        tail = f.readlines()[-lines:]
    sys.stderr.write("".join(tail))
