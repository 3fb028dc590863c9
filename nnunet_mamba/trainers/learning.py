"""``<Trainer>_learnbench``: trainers on the learning benchmark's fixed schedule (``nnunet-mamba learning-benchmark``).

One variant per trainer of ours (the ``_demo`` ones aside) and one of nnU-Net's ``nnUNetTrainer``. Each keeps its
trainer's recipe (network, optimizer, learning-rate schedule, which spans ``num_epochs``) and only takes the number of
epochs, the iterations per epoch and a seed from the environment the benchmark sets. At the end of training it
writes the peak CUDA memory to ``fold_N/learnbench_memory.json``. They are made at import, at module level, so that
nnU-Net's lookup of a trainer by its name finds them (``nnUNet_trainers/nnunet_mamba_learning_trainers.py``); they
are not in :func:`nnunet_mamba.trainers.list_trainers`.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..networks import get_network_spec
from .. import trainers as _package

SUFFIX = "_learnbench"
EPOCHS_ENV = "NNUNET_MAMBA_LEARN_EPOCHS"
ITERATIONS_ENV = "NNUNET_MAMBA_LEARN_ITERATIONS"
VAL_ITERATIONS_ENV = "NNUNET_MAMBA_LEARN_VAL_ITERATIONS"
SEED_ENV = "NNUNET_MAMBA_LEARN_SEED"
MEMORY_FILE = "learnbench_memory.json"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


class LearnBenchMixin:
    """Schedule and seed from the environment; peak CUDA memory written at the end of training."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        seed = _env_int(SEED_ENV, 0)
        # before initialize() builds the network, so the seed sets the initial weights
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.num_epochs = _env_int(EPOCHS_ENV, self.num_epochs)
        self.num_iterations_per_epoch = _env_int(ITERATIONS_ENV, self.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = _env_int(VAL_ITERATIONS_ENV, self.num_val_iterations_per_epoch)
        self.print_to_log_file(f"learning benchmark: seed {seed}, {self.num_epochs} epochs x "
                               f"{self.num_iterations_per_epoch} iterations, {self.num_val_iterations_per_epoch} "
                               "validation iterations")

    def on_train_end(self) -> None:
        # before nnU-Net's on_train_end empties the cache (the peak counter survives that anyway)
        cuda = self.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        if self.local_rank == 0:
            with open(os.path.join(self.output_folder, MEMORY_FILE), "w") as f:
                json.dump({"device": str(self.device), "peak_memory_bytes": peak}, f)
        super().on_train_end()


def base_trainers() -> dict[str, type]:
    """The trainers that get a variant: ours without the ``_demo`` ones, and nnU-Net's ``nnUNetTrainer``."""
    ours = {name: getattr(_package, name) for name in _package.list_trainers() if not name.endswith("_demo")}
    return {"nnUNetTrainer": nnUNetTrainer, **ours}


def trainer_dims(name: str) -> tuple[int, ...]:
    """Dimensions a base trainer (a name of :func:`base_trainers`) supports."""
    network_name = getattr(base_trainers()[name], "network_name", "")
    return get_network_spec(network_name).dims if network_name else (2, 3)


def needs_pretrained_weights(name: str) -> bool:
    return bool(getattr(base_trainers()[name], "pretrained_weights", ""))


def _make_variants() -> dict[str, type]:
    variants = {}
    for name, base in base_trainers().items():
        variant = type(name + SUFFIX, (LearnBenchMixin, base), {"__module__": __name__})
        variant.__doc__ = f"{name} on the learning benchmark's schedule."
        variants[variant.__name__] = variant
    return variants


_VARIANTS = _make_variants()
globals().update(_VARIANTS)
__all__ = sorted(_VARIANTS)
