"""Swin-UMamba trainers under the original repository's names.

As the original: AdamW (lr 1e-4, weight decay 0.05, eps 1e-5) with cosine annealing to 1e-6 over the run; the
pretrained variants start the VMamba encoder from ImageNet weights and keep it frozen for the first
``freeze_epochs`` (10) epochs.

Freezing is done by dropping the frozen parameters' gradients right before each optimizer step, not by toggling
``requires_grad``: DDP fixes the set of parameters it synchronises when it wraps the network, so toggling would
either need ``find_unused_parameters=True`` (the original's workaround) or leave the unfrozen encoder unsynchronised
across GPUs. Because the schedule is a function of ``current_epoch`` only, resuming (``--c``) inside the frozen
epochs continues it correctly.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..networks import load_vmamba_encoder
from ..pretrained import load_pretrained_state_dict
from .base import ShortRunMixin, nnUNetTrainerMamba


class CosineAnnealingScheduler(LRScheduler):
    """Cosine annealing from ``initial_lr`` to ``min_lr`` over ``max_steps``, set from the epoch number the way
    nnU-Net steps its schedulers (``step(current_epoch)``), so resuming lands on the right learning rate."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int, min_lr: float) -> None:
        self.initial_lr, self.max_steps, self.min_lr = initial_lr, max_steps, min_lr
        self.ctr = 0
        super().__init__(optimizer)

    def step(self, current_step: int = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        progress = min(current_step, self.max_steps) / max(self.max_steps, 1)
        lr = self.min_lr + 0.5 * (self.initial_lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)


class nnUNetTrainerSwinUMambaScratch(nnUNetTrainerMamba):
    network_name = "swin_umamba"
    pretrained_weights: str = ""  # a name in nnunet_mamba.pretrained; empty: train from scratch
    freeze_epochs = 0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.weight_decay = 5e-2

    def initialize(self) -> None:
        super().initialize()
        if self.pretrained_weights:
            # raises FileNotFoundError naming `nnunet-mamba download-weights ...` when the file is missing
            state_dict = load_pretrained_state_dict(self.pretrained_weights)
            report = load_vmamba_encoder(self.unwrapped_network, state_dict)
            self.print_to_log_file(f"nnunet-mamba: {self.pretrained_weights} ImageNet weights: {report}")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay,
                                      eps=1e-5)
        scheduler = CosineAnnealingScheduler(optimizer, self.initial_lr, self.num_epochs, 1e-6)
        if self.freeze_epochs:
            frozen = self.unwrapped_network.pretrained_encoder_parameters()
            optimizer.register_step_pre_hook(lambda *_: self._drop_frozen_gradients(frozen))
        return optimizer, scheduler

    def encoder_frozen(self) -> bool:
        return self.current_epoch < self.freeze_epochs

    def _drop_frozen_gradients(self, parameters) -> None:
        # AdamW skips parameters without a gradient entirely (no update, no weight decay, no moment change)
        if self.encoder_frozen():
            for p in parameters:
                p.grad = None

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.encoder_frozen():
            self.print_to_log_file(f"pretrained encoder frozen (epoch {self.current_epoch} < {self.freeze_epochs})")


class nnUNetTrainerSwinUMamba(nnUNetTrainerSwinUMambaScratch):
    pretrained_weights = "vmamba-tiny"
    freeze_epochs = 10


class nnUNetTrainerSwinUMambaDScratch(nnUNetTrainerSwinUMambaScratch):
    network_name = "swin_umamba_d"


class nnUNetTrainerSwinUMambaD(nnUNetTrainerSwinUMamba):
    network_name = "swin_umamba_d"


class nnUNetTrainerSwinUMamba_demo(ShortRunMixin, nnUNetTrainerSwinUMamba):
    freeze_epochs = 1


class nnUNetTrainerSwinUMambaD_demo(ShortRunMixin, nnUNetTrainerSwinUMambaD):
    freeze_epochs = 1
