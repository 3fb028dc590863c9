"""Thin nnU-Net trainer subclasses: they only say which registered network to build from the plans."""
from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from ..networks.plans import network_from_plans
from ..networks.base import refuse_nan_input
from ..ops import resolve_backend
from . import recipes

AMP_DTYPE_ENV = "NNUNET_MAMBA_AMP_DTYPE"
_AMP_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def amp_dtype() -> torch.dtype:
    """The autocast dtype our trainers train with on CUDA: ``NNUNET_MAMBA_AMP_DTYPE=float16`` (nnU-Net's default)
    or ``bfloat16`` (no loss scaling needed: bf16 has float32's exponent range)."""
    value = os.environ.get(AMP_DTYPE_ENV, "float16").strip().lower() or "float16"
    if value not in _AMP_DTYPES:
        raise ValueError(f"{AMP_DTYPE_ENV}={value!r}: expected one of {', '.join(_AMP_DTYPES)}")
    return _AMP_DTYPES[value]


class nnUNetTrainerMamba(nnUNetTrainer):
    """Base class of our trainers; subclasses set ``network_name`` (a name in :func:`nnunet_mamba.list_networks`)."""

    network_name: str = ""
    # constructor kwargs that take precedence over the plans (e.g. narrower widths for smoke-test variants)
    network_overrides: dict = {}
    # smoke-test variants of networks sized by the plans divide the plans' widths by this (at least 4 channels)
    plans_width_divisor: int = 1
    # optimiser and learning-rate schedule (nnunet_mamba.trainers.recipes); its lr and weight decay become
    # nnU-Net's initial_lr and weight_decay, which configure_optimizers then reads
    recipe: recipes.Recipe = recipes.NNUNET

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.recipe.lr
        self.weight_decay = self.recipe.weight_decay
        if self.recipe.epochs is not None:
            self.num_epochs = self.recipe.epochs

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = network_from_plans(cls.network_name, configuration_manager, num_input_channels,
                                     num_output_channels, enable_deep_supervision, overrides=cls.network_overrides,
                                     width_divisor=cls.plans_width_divisor, caller=cls.__name__)
        network.register_forward_pre_hook(refuse_nan_input)
        return network

    def _get_deep_supervision_scales(self):
        # Networks whose outputs do not follow the plans' pooling (transformer/Mamba encoders) declare their
        # deep-supervision scales; nnU-Net then downsamples the targets to exactly those sizes.
        scales = getattr(self.unwrapped_network, "deep_supervision_scales", None)
        if scales is None:
            return super()._get_deep_supervision_scales()
        if not self.enable_deep_supervision:
            return None
        dim = len(self.configuration_manager.patch_size)
        return [list(s) if isinstance(s, (list, tuple)) else [s] * dim for s in scales]

    @property
    def unwrapped_network(self) -> nn.Module:
        """The network without its DDP / torch.compile wrappers."""
        network = self.network
        network = getattr(network, "module", network)
        return getattr(network, "_orig_mod", network)

    def configure_optimizers(self):
        recipe = dataclasses.replace(self.recipe, lr=self.initial_lr, weight_decay=self.weight_decay)
        return recipes.build(recipe, self.network.parameters(), self.num_epochs)

    def initialize(self) -> None:
        super().initialize()
        self.print_to_log_file(f"nnunet-mamba: network {self.network_name}, selective-scan backend "
                               f"'{resolve_backend(self.device)}'")
        recipe = dataclasses.replace(self.recipe, lr=self.initial_lr, weight_decay=self.weight_decay)
        self.print_to_log_file(f"nnunet-mamba: {recipe.describe()}, {self.num_epochs} epochs")

    def on_validation_epoch_end(self, val_outputs: list) -> None:
        super().on_validation_epoch_end(val_outputs)
        if isinstance(self.lr_scheduler, recipes.PlateauScheduler):
            # all-gathered under DDP, so every rank takes the same decision
            self.lr_scheduler.report(self.logger.get_value("val_losses", step=-1))

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if isinstance(self.lr_scheduler, recipes.PlateauScheduler):
            # nnU-Net's checkpoint has no scheduler state: replay the validation losses it logged
            losses = self.logger.get_value("val_losses", step=None)[:self.current_epoch]
            self.lr_scheduler.replay(losses)

    def on_train_start(self) -> None:
        # nnU-Net's train/validation steps call autocast without a dtype, so they take the device's default one
        dtype = amp_dtype()
        if self.device.type == "cuda" and dtype != torch.get_autocast_dtype("cuda"):
            torch.set_autocast_dtype("cuda", dtype)
            if dtype == torch.bfloat16:
                self.grad_scaler = None  # nnU-Net's steps then call backward() and step() directly
        self.print_to_log_file(f"nnunet-mamba: autocast dtype {dtype if self.device.type == 'cuda' else 'off (CPU)'}")
        super().on_train_start()

class ShortRunMixin:
    """Few, short epochs: for smoke tests and ``nnunet-mamba demo``, never for real training. Seeded, so that a
    rerun on the same machine reproduces the result: the initial weights, and with ``nnUNet_n_proc_DA=0``
    (augmentation in the training process) the batches too; 8 unseeded iterations sometimes missed a class."""

    short_epochs = 2
    short_iterations = 4
    short_val_iterations = 2
    seed = 0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)
        self.num_epochs = self.short_epochs
        self.num_iterations_per_epoch = self.short_iterations
        self.num_val_iterations_per_epoch = self.short_val_iterations
