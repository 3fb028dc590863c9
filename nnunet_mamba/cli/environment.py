"""``nnunet-mamba env``: shell exports for nnU-Net plus diagnostics (as comments, so the output can be eval'd).

``env --exports`` prints the export line only, without importing torch: that is the line for a shell profile.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
from importlib.metadata import PackageNotFoundError, version

from .. import __version__

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# what nnU-Net prints when nnUNet_extTrainer does not reach our trainers
TRAINER_NOT_FOUND = "Could not find requested nnunet trainer"


def trainer_shim_dir() -> str:
    """Folder to put on ``nnUNet_extTrainer``: the installed copy of the top-level ``nnUNet_trainers/``."""
    # located without importing it: its __init__ imports our trainers, hence torch and nnU-Net
    spec = importlib.util.find_spec("nnunet_mamba.nnUNet_trainers")
    if spec is not None:
        return os.path.abspath(list(spec.submodule_search_locations)[0])
    # the package imported from a source tree (e.g. `python -c` in the checkout), where the folder sits beside it
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkout = os.path.join(os.path.dirname(package), "nnUNet_trainers")
    if os.path.isfile(os.path.join(checkout, "nnunet_mamba_trainers.py")):
        return checkout
    raise FileNotFoundError("nnunet_mamba.nnUNet_trainers is not installed: reinstall the package (pip install .)")


def ext_trainer_value(current: str | None = None) -> str:
    """``nnUNet_extTrainer`` with our folder first, keeping any other folders already there."""
    current = os.environ.get("nnUNet_extTrainer", "") if current is None else current
    shim = trainer_shim_dir()
    others = [p for p in current.split(os.pathsep) if p and os.path.abspath(p) != shim]
    return os.pathsep.join([shim, *others])


def ext_trainer_hint(current: str | None = None) -> str | None:
    """``None`` if ``nnUNet_extTrainer`` reaches our trainers, else what goes wrong and the fix."""
    current = os.environ.get("nnUNet_extTrainer", "") if current is None else current
    if trainer_shim_dir() in [os.path.abspath(p) for p in current.split(os.pathsep) if p]:
        return None
    return (f"nnUNet_extTrainer does not include our trainers, so nnUNetv2_train -tr nnUNetTrainerUMambaBot stops "
            f"with nnU-Net's \"{TRAINER_NOT_FOUND}\"; fix: eval \"$(nnunet-mamba env --exports)\" "
            "(or put that line in your shell profile)")


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print shell exports for nnU-Net (eval \"$(nnunet-mamba env)\") and diagnostics",
                       description="Print the export of nnUNet_extTrainer that makes nnU-Net find our trainers, "
                                   "with diagnostics as # comments, so that eval \"$(nnunet-mamba env)\" works.")
    p.add_argument("--exports", action="store_true",
                   help="the export line only, without diagnostics (fast: no torch import); for a shell profile: "
                        "eval \"$(nnunet-mamba env --exports)\"")
    p.set_defaults(func=run)


def export_line() -> str:
    return f"export nnUNet_extTrainer={shlex.quote(ext_trainer_value())}"


def run(args: argparse.Namespace) -> int:
    if args.exports:
        print(export_line())
        return 0
    # The export comes first, so that a failing diagnostic below can never leave the eval without it.
    print(export_line())
    previous = os.environ.get("nnUNet_extTrainer")
    print(f"# nnUNet_extTrainer was: {previous if previous else 'not set'}")
    hint = ext_trainer_hint()
    if hint:
        print(f"# {hint}")
    for name in NNUNET_PATH_VARIABLES:
        value = os.environ.get(name)
        print(f"# {name}: {value if value else 'NOT SET (nnU-Net needs it: export ' + name + '=/path)'}")
    import torch

    from ..ops import BACKEND_ENV, cuda_backend_status, requested_backend, triton_backend_status

    print(f"# nnunet-mamba {__version__} | torch {torch.__version__} | nnunetv2 {_version('nnunetv2')} | "
          f"mamba-ssm {_version('mamba-ssm')} | causal-conv1d {_version('causal-conv1d')}")
    if torch.cuda.is_available():
        print(f"# GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
    else:
        print("# GPU: none visible (training and inference run on the CPU: nnUNetv2_train ... -device cpu)")
    try:
        backend = requested_backend()
    except ValueError as exc:  # a bad backend setting: say so here, the export above still applies
        print(f"# selective scan: ERROR: {exc} (training would stop with this error)")
        return 0
    ok, why = cuda_backend_status()  # runs mamba-ssm's kernel once on the current GPU; says so where there is none
    triton_ok, triton_why = triton_backend_status()
    print(f"# selective scan: {BACKEND_ENV}={backend}; cuda backend "
          f"{'available' if ok else 'unavailable'} ({why}); triton backend "
          f"{'available' if triton_ok else 'unavailable'} ({triton_why}); torch backend always available")
    return 0
