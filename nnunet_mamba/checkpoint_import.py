"""Importing models trained with the original U-Mamba or Swin-UMamba repositories (``nnunet-mamba import-checkpoint``).

A trained model folder (``<trainer>__<plans>__<configuration>/`` with ``plans.json``, ``dataset.json`` and
``fold_*/checkpoint_*.pth``) becomes ``<results>/<our trainer>__<plans>__<configuration>/``, where
``nnUNetv2_predict -d ... -tr ...`` looks for it. Every checkpoint is converted
(:func:`nnunet_mamba.checkpoints.convert_checkpoint`) and checked against the network our trainer builds from the
plans; all other files are copied unchanged (nnU-Net 2.8 reads the old plans schema itself). A single checkpoint
file is checked against the plans and dataset.json stored in its ``init_args``.

The source is only read. The result is assembled beside its final name and renamed into place
(:mod:`nnunet_mamba.files`), so nothing appears under that name unless every checkpoint converted and matched.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

from .checkpoints import (TRUST_PICKLE_HINT, CheckpointError, UnsafeCheckpointError, check_state_dict,
                          convert_checkpoint, load_checkpoint_file, trust_reason)
from .files import install_file, install_folder


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def expected_network_shapes(trainer_name: str, plans: dict, dataset_json: dict,
                            configuration: str) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of the network that our trainer ``trainer_name`` builds for ``configuration``,
    the way ``nnUNetv2_predict`` builds it."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from . import trainers

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


def _load_and_convert(path: Path, trainer_name: str | None, trust_pickle: bool | None = None) -> dict[str, Any]:
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


def import_model_folder(src: Path, results_dir: Path, trainer_name: str | None = None, force: bool = False,
                        trust_pickle: bool | None = None, log: Callable[[str], None] = _to_stderr) -> Path:
    """Convert the model folder ``src`` into ``results_dir/<trainer>__<plans>__<configuration>/``; return that.
    ``log`` gets one line per converted checkpoint."""
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
    pending = {checkpoints[0]: first}  # converted already; the others are loaded one at a time
    del first  # so that popping it from pending frees it

    def build(tmp: Path) -> None:
        skip = set(checkpoints)
        # copies everything else (and the source folder's permissions onto tmp)
        shutil.copytree(src, tmp, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if Path(folder, n) in skip])
        for path in checkpoints:
            converted = pending.pop(path, None) or _load_and_convert(path, trainer_name, trust_pickle)
            found = (converted["trainer_name"], converted["init_args"].get("configuration"))
            if found != (trainer, configuration):
                raise CheckpointError(f"{path}: trainer and configuration {found} differ from those of "
                                      f"{checkpoints[0]}: {(trainer, configuration)}")
            check_state_dict(converted["network_weights"], expected, f"{path}: converted network weights")
            torch.save(converted, tmp / path.relative_to(src))
            log(f"converted {path.relative_to(src)}")

    return install_folder(final, build)


def import_checkpoint_file(src: Path, dst: Path, trainer_name: str | None = None, force: bool = False,
                           trust_pickle: bool | None = None) -> Path:
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
    return install_file(dst, lambda tmp: torch.save(converted, tmp))
