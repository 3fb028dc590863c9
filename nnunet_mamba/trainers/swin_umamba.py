"""Swin-UMamba trainers under the original repository's names.

As the original: AdamW (lr 1e-4, weight decay 0.05, eps 1e-5) with cosine annealing to 1e-6 over the run; the
pretrained variants start the VMamba encoder from ImageNet weights and keep it frozen for the first
``freeze_epochs`` (10) epochs.

Freezing (:func:`freeze_while`) zeroes the frozen parameters' gradients as backward produces them and drops them
right before each optimizer step, not by toggling ``requires_grad``: DDP fixes the set of parameters it
synchronises when it wraps the network, so toggling would either need ``find_unused_parameters=True`` (the
original's workaround) or leave the unfrozen encoder unsynchronised across GPUs. Zeroing keeps the frozen gradients
out of nnU-Net's gradient clipping (as with the original's ``requires_grad=False``, whose parameters have no
gradient to clip), and every rank still hands DDP a gradient for every parameter. Because the schedule is a
function of ``current_epoch`` only, which nnU-Net advances identically on every rank and saves in its checkpoints,
all ranks freeze and unfreeze at the same step, and resuming (``--c``) inside the frozen epochs continues it
correctly.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..networks import load_vmamba_encoder
from ..pretrained import load_pretrained_state_dict
from . import recipes
from .base import ShortRunMixin, nnUNetTrainerMamba
from .recipes import CosineAnnealingScheduler  # noqa: F401 - its former home


def freeze_while(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.nn.Parameter],
                 frozen: Callable[[], bool]) -> list:
    """Keep ``parameters`` unchanged by ``optimizer`` while ``frozen()``; returns the hooks' removable handles.

    While frozen, a hook on each parameter replaces its gradient by zeros as backward computes it (before DDP
    averages it across ranks and before gradient clipping, so clipping sees only the trained parameters'
    gradients), and an optimizer step pre-hook then drops these gradients, so that AdamW skips the parameters
    entirely (no update, no weight decay, no moment or step-count change). The parameters keep
    ``requires_grad``, so DDP (without ``find_unused_parameters``) gets a gradient for each of them every step.
    """
    parameters = list(parameters)

    def zero_gradient(grad: torch.Tensor):
        return torch.zeros_like(grad) if frozen() else None  # None: the gradient as computed

    def drop_gradients(*_) -> None:
        if frozen():
            for p in parameters:
                p.grad = None

    handles = [p.register_hook(zero_gradient) for p in parameters]
    handles.append(optimizer.register_step_pre_hook(drop_gradients))
    return handles


class nnUNetTrainerSwinUMambaScratch(nnUNetTrainerMamba):
    network_name = "swin_umamba"
    pretrained_weights: str = ""  # a name in nnunet_mamba.pretrained; empty: train from scratch
    faithful_loading = True  # load_vmamba_encoder(faithful=...): the original's patch-embedding loading
    freeze_epochs = 0
    recipe = recipes.SWIN_UMAMBA

    def initialize(self) -> None:
        super().initialize()
        if self.pretrained_weights:
            # raises FileNotFoundError naming `nnunet-mamba download-weights ...` when the file is missing
            state_dict = load_pretrained_state_dict(self.pretrained_weights)
            report = load_vmamba_encoder(self.unwrapped_network, state_dict, faithful=self.faithful_loading)
            # counts only: the report's key lists run to hundreds of names
            self.print_to_log_file(
                f"nnunet-mamba: {self.pretrained_weights} ImageNet weights: {len(report.loaded)} tensors loaded "
                f"({len(report.adapted)} adapted to the input channels), {len(report.skipped)} skipped, "
                f"{len(report.unexpected)} unexpected, {len(report.missing)} encoder tensors not in the checkpoint")

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        if self.freeze_epochs:
            # nnU-Net calls this before wrapping the network in DDP; the hooks hold the parameters themselves,
            # which DDP (and SyncBatchNorm's conversion) keep
            freeze_while(optimizer, self.unwrapped_network.pretrained_encoder_parameters(), self.encoder_frozen)
        return optimizer, scheduler

    def encoder_frozen(self) -> bool:
        return self.current_epoch < self.freeze_epochs

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


class nnUNetTrainerSwinUMambaAdaptedLoading(nnUNetTrainerSwinUMamba):
    """Swin-UMamba leaving all of its patch embedding (which reads the stem) as initialised."""
    faithful_loading = False


class nnUNetTrainerSwinUMambaDAdaptedLoading(nnUNetTrainerSwinUMambaD):
    """Swin-UMamba-dagger loading its patch embedding with the RGB kernel adapted to the input channels."""
    faithful_loading = False


class nnUNetTrainerSwinUMambaScratch_nnUNetRecipe(nnUNetTrainerSwinUMambaScratch):
    recipe = recipes.NNUNET


class nnUNetTrainerSwinUMambaDScratch_nnUNetRecipe(nnUNetTrainerSwinUMambaDScratch):
    recipe = recipes.NNUNET


class nnUNetTrainerSwinUMambaScratch_demo(ShortRunMixin, nnUNetTrainerSwinUMambaScratch):
    """A narrow, shallow Swin-UMamba from scratch (no ImageNet weights to fit): for fine-tuning smoke tests,
    ``nnUNetv2_train ... -pretrained_weights``, on a CPU."""

    network_overrides = {"depths": (1, 1, 1, 1), "embed_dim": 16, "stem_channels": 8}
