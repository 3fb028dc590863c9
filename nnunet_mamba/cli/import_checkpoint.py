"""``nnunet-mamba import-checkpoint SRC DST``: models trained with the original U-Mamba or Swin-UMamba repositories
into ones that nnU-Net 2.8 (``nnUNetv2_predict``, ``nnUNetv2_train --c``) loads with our trainers.

SRC is a trained model folder (``<trainer>__<plans>__<configuration>/`` with ``plans.json``, ``dataset.json`` and
``fold_*/checkpoint_*.pth``) and DST the dataset's results folder (``$nnUNet_results/DatasetXXX_Name``): the model
lands in ``DST/<our trainer>__<plans>__<configuration>/``, where ``nnUNetv2_predict -d ... -tr ...`` looks for it.
Every checkpoint is converted (:func:`nnunet_mamba.checkpoints.convert_checkpoint`) and checked against the network
our trainer builds from the plans; all other files are copied unchanged (nnU-Net 2.8 reads the old plans schema
itself). SRC may also be a single checkpoint file, converted into the file DST; its network is then checked against
the plans and dataset.json stored in its ``init_args``.

The source is only read. The result is assembled in a temporary ``.partial`` sibling and renamed into place, so
nothing appears under the final name unless every checkpoint converted and matched.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..checkpoints import (TRUST_PICKLE_ENV, TRUST_PICKLE_HINT, CheckpointError, UnsafeCheckpointError,
                           check_state_dict, convert_checkpoint, load_checkpoint_file, trust_reason)

COMMAND = "import-checkpoint"
DESCRIPTION = ("Convert a model trained with the original U-Mamba or Swin-UMamba repositories into one that "
               "nnU-Net 2.8 loads with our trainers: SRC is its model folder, DST the dataset's results folder "
               "($nnUNet_results/DatasetXXX_Name), which receives <trainer>__<plans>__<configuration>/. Checkpoints "
               "are converted and checked against our network; other files are copied unchanged; the source is only "
               "read. A single checkpoint file SRC is converted into the file DST.")
# nnU-Net's checkpoints (tensors, plain containers, numpy scalars in the training log) load with weights_only=True;
# anything else is only unpickled on the user's explicit opt-in.


def expected_network_shapes(trainer_name: str, plans: dict, dataset_json: dict,
                            configuration: str) -> Dict[str, Tuple[int, ...]]:
    """State-dict keys and shapes of the network that our trainer ``trainer_name`` builds for ``configuration``,
    the way ``nnUNetv2_predict`` builds it."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from .. import trainers

    trainer_class = getattr(trainers, trainer_name, None)
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, nnUNetTrainer)):
        raise CheckpointError(f"trainer {trainer_name!r} is not provided by nnunet_mamba (it has: "
                              f"{', '.join(trainers.list_trainers())}); pick one with --trainer")
    try:
        plans_manager = PlansManager(copy.deepcopy(plans))  # nnU-Net converts an old plans schema in place
        configuration_manager = plans_manager.get_configuration(configuration)
        network = trainer_class.build_network_architecture(
            plans_manager, configuration_manager,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot build the {trainer_name} network for configuration {configuration!r} from "
                              f"the plans: {type(exc).__name__}: {exc}") from exc
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


def _load_and_convert(path: Path, trainer_name: Optional[str], trust_pickle: Optional[bool] = None) -> Dict[str, Any]:
    try:
        return convert_checkpoint(load_checkpoint_file(path, unsafe_reason=trust_reason(trust_pickle),
                                                       label=str(path)), trainer_name)
    except UnsafeCheckpointError as exc:
        raise CheckpointError(f"{path}: {exc} To import it anyway, {TRUST_PICKLE_HINT}, only if you trust its "
                              "source.") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _refuse_to_touch_source(src: Path, dst: Path) -> None:
    src, dst = src.resolve(), dst.resolve()
    if dst == src or src in dst.parents:
        raise CheckpointError(f"the destination {dst} is the source or inside it; the source is never modified, "
                              "choose another destination")


def import_model_folder(src: Path, results_dir: Path, trainer_name: Optional[str] = None,
                        force: bool = False, trust_pickle: Optional[bool] = None) -> Path:
    """Convert the model folder ``src`` into ``results_dir/<trainer>__<plans>__<configuration>/``; return that."""
    plans_file, dataset_file = src / "plans.json", src / "dataset.json"
    for required in (plans_file, dataset_file):
        if not required.is_file():
            raise CheckpointError(f"{src} is not an nnU-Net model folder: no {required.name}")
    checkpoints = sorted(src.glob("fold_*/checkpoint_*.pth"))
    if not checkpoints:
        raise CheckpointError(f"{src} holds no fold_*/checkpoint_*.pth")
    plans = json.loads(plans_file.read_text())
    dataset_json = json.loads(dataset_file.read_text())

    first = _load_and_convert(checkpoints[0], trainer_name, trust_pickle)
    trainer, configuration = first["trainer_name"], first["init_args"].get("configuration")
    if not configuration:
        raise CheckpointError(f"{checkpoints[0]}: init_args names no configuration")
    if "plans_name" not in plans:
        raise CheckpointError(f"{plans_file}: no plans_name")
    # nnUNetv2_predict looks for <trainer>__<plans>__<configuration>, with the plans name of plans.json.
    name = f"{trainer}__{plans['plans_name']}__{configuration}"
    final = results_dir / name
    _refuse_to_touch_source(src, final)
    if final.exists() and not force:
        raise CheckpointError(f"{final} already exists; pass --force to replace it")
    expected = expected_network_shapes(trainer, plans, dataset_json, configuration)

    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=results_dir))
    try:
        skip = set(checkpoints)
        # copies everything else (and the source folder's permissions onto tmp)
        shutil.copytree(src, tmp, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if Path(folder, n) in skip])
        pending = {checkpoints[0]: first}  # converted already; the others are loaded one at a time
        del first
        for path in checkpoints:
            converted = pending.pop(path, None) or _load_and_convert(path, trainer_name, trust_pickle)
            found = (converted["trainer_name"], converted["init_args"].get("configuration"))
            if found != (trainer, configuration):
                raise CheckpointError(f"{path}: trainer and configuration {found} differ from those of "
                                      f"{checkpoints[0]}: {(trainer, configuration)}")
            check_state_dict(converted["network_weights"], expected, f"{path}: converted network weights")
            torch.save(converted, tmp / path.relative_to(src))
            print(f"converted {path.relative_to(src)}", file=sys.stderr)
        _move_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is first moved aside and deleted only once replaced."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.rename(final, old / final.name)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old / final.name, final)
        raise
    finally:
        if final.exists():
            shutil.rmtree(old)


def import_checkpoint_file(src: Path, dst: Path, trainer_name: Optional[str] = None, force: bool = False,
                           trust_pickle: Optional[bool] = None) -> Path:
    """Convert the checkpoint file ``src`` into ``dst`` (a file, or a folder to put it in under the same name)."""
    if dst.is_dir():
        dst = dst / src.name
    _refuse_to_touch_source(src, dst)
    if dst.exists() and not force:
        raise CheckpointError(f"{dst} already exists; pass --force to replace it")
    converted = _load_and_convert(src, trainer_name, trust_pickle)
    init_args = converted["init_args"]
    for key in ("plans", "dataset_json", "configuration"):
        if key not in init_args:
            raise CheckpointError(f"{src}: init_args has no {key!r}, needed to check the network; convert the whole "
                                  "model folder instead")
    expected = expected_network_shapes(converted["trainer_name"], init_args["plans"], init_args["dataset_json"],
                                       init_args["configuration"])
    check_state_dict(converted["network_weights"], expected, f"{src}: converted network weights")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    os.close(fd)
    try:
        torch.save(converted, tmp_name)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp_name, dst)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return dst


def add_parser(sub) -> None:
    p = sub.add_parser(COMMAND, help="convert a model trained with the original U-Mamba / Swin-UMamba code",
                       description=DESCRIPTION)
    p.add_argument("src", type=Path, metavar="SRC",
                   help="model folder <trainer>__<plans>__<configuration>/ (or a single checkpoint .pth)")
    p.add_argument("dst", type=Path, metavar="DST",
                   help="results folder of the dataset, e.g. $nnUNet_results/Dataset001_Name (for a .pth SRC: the "
                        "output file or a folder for it)")
    p.add_argument("--trainer", metavar="NAME",
                   help="store this trainer name instead of the default (the original name; "
                        "nnUNetTrainerUMambaEncNoAMP becomes nnUNetTrainerUMambaEnc)")
    p.add_argument("--force", action="store_true", help="replace the destination if it exists")
    p.add_argument("--trust-pickle", action="store_true",
                   help="also accept checkpoints holding pickled Python objects beyond tensors, plain containers "
                        "and numpy scalars (loaded with weights_only=False, which can run code from the file): only "
                        f"for sources you trust; {TRUST_PICKLE_ENV}=1 does the same")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    trust = True if args.trust_pickle else None  # without the flag, NNUNET_MAMBA_TRUST_PICKLE decides
    try:
        if args.src.is_dir():
            result = import_model_folder(args.src, args.dst, args.trainer, args.force, trust)
        elif args.src.is_file():
            result = import_checkpoint_file(args.src, args.dst, args.trainer, args.force, trust)
        else:
            raise FileNotFoundError(f"{args.src}: no such model folder or checkpoint file")
    except (CheckpointError, OSError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"imported: {result}")
    if result.is_dir():
        folds = sorted({p.parent.name[len("fold_"):] for p in result.glob("fold_*/checkpoint_*.pth")})
        print(f'predict with: eval "$(nnunet-mamba env)"; nnUNetv2_predict_from_modelfolder -i INPUT -o OUTPUT '
              f"-m {shlex.quote(str(result))} -f {' '.join(folds)}")
    return 0

