"""``nnunet-mamba env``: shell exports for nnU-Net plus diagnostics (as comments, so the output can be eval'd)."""
from __future__ import annotations

import argparse
import os
import shlex
from importlib.metadata import PackageNotFoundError, version

import torch

from .. import __version__
from ..ops import cuda_backend_status, requested_backend, triton_backend_status

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def trainer_shim_dir() -> str:
    """Folder to put on ``nnUNet_extTrainer``: the installed copy of the top-level ``nnUNet_trainers/``."""
    from .. import nnUNet_trainers

    return os.path.dirname(os.path.abspath(nnUNet_trainers.__file__))


def ext_trainer_value(current: str = None) -> str:
    """``nnUNet_extTrainer`` with our folder first, keeping any other folders already there."""
    current = os.environ.get("nnUNet_extTrainer", "") if current is None else current
    shim = trainer_shim_dir()
    others = [p for p in current.split(os.pathsep) if p and os.path.abspath(p) != shim]
    return os.pathsep.join([shim, *others])


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="print shell exports for nnU-Net (eval \"$(nnunet-mamba env)\") and diagnostics")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(f"# nnunet-mamba {__version__} | torch {torch.__version__} | nnunetv2 {_version('nnunetv2')} | "
          f"mamba-ssm {_version('mamba-ssm')} | causal-conv1d {_version('causal-conv1d')}")
    if torch.cuda.is_available():
        print(f"# GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
    else:
        print("# GPU: none visible (training and inference run on the CPU: nnUNetv2_train ... -device cpu)")
    ok, why = cuda_backend_status()
    triton_ok, triton_why = triton_backend_status()
    print(f"# selective scan: NNUNET_MAMBA_BACKEND={requested_backend()}; cuda backend "
          f"{'available' if ok else 'unavailable'} ({why}); triton backend "
          f"{'available' if triton_ok else 'unavailable'} ({triton_why}); torch backend always available")
    for name in NNUNET_PATH_VARIABLES:
        value = os.environ.get(name)
        print(f"# {name}: {value if value else 'NOT SET (nnU-Net needs it: export ' + name + '=/path)'}")
    previous = os.environ.get("nnUNet_extTrainer")
    print(f"# nnUNet_extTrainer was: {previous if previous else 'not set'}")
    print(f"export nnUNet_extTrainer={shlex.quote(ext_trainer_value())}")
    return 0
