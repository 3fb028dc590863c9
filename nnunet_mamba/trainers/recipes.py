"""Training recipes: each network's optimiser and learning-rate schedule, as its paper or original code trains it.

One place builds them (:func:`build_optimizer`, :func:`build_scheduler`); a trainer names its :class:`Recipe`
(``nnUNetTrainerMamba.recipe``). Every schedule is a function of the epoch over the trainer's ``num_epochs``, set
from nnU-Net's ``lr_scheduler.step(current_epoch)`` at the start of each epoch, so a shortened run compresses the
whole recipe and resuming (``--c``) lands on the right learning rate.

The plateau schedule (ViM-UNet's) is the exception: it depends on the validation losses, so nnU-Net's
``step(current_epoch)`` leaves it alone and the trainer reports each epoch's validation loss to it
(:meth:`PlateauScheduler.report`). nnU-Net's checkpoint holds the optimiser state (the current learning rate) and
the logged validation losses, not the scheduler; on resume the trainer replays the logged losses through a fresh
scheduler (:meth:`PlateauScheduler.replay`), which restores its best loss and bad-epoch count exactly, with no
change to nnU-Net's checkpoint format. Under DDP every rank reports the same all-gathered loss, so all ranks
change the learning rate together.

Gradient clipping and autocast stay nnU-Net's for every recipe (its ``train_step`` clips to norm 12 and autocasts
on CUDA with ``NNUNET_MAMBA_AMP_DTYPE``); README "Training recipes" lists where the originals differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterable, Sequence

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("poly", "cosine", "linear", "plateau")


@dataclass(frozen=True)
class Recipe:
    """An optimiser and a learning-rate schedule; ``source`` says where the numbers come from."""

    name: str
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    source: str
    momentum: float = 0.0  # SGD
    nesterov: bool = False  # SGD
    betas: tuple[float, float] = (0.9, 0.999)  # Adam, AdamW
    eps: float = 1e-8  # Adam, AdamW
    poly_exponent: float = 0.9  # poly: lr * (1 - epoch / num_epochs) ** exponent
    min_lr: float = 0.0  # cosine: the floor it anneals to
    end_factor: float = 1.0  # linear: from lr to lr * end_factor
    plateau_factor: float = 0.5  # plateau: lr *= factor after `patience` epochs without a better validation loss
    plateau_patience: int = 10
    # epochs of nnU-Net's 250 iterations; None: nnU-Net's 1000 (where the original's epochs are passes over a
    # dataset of another size, they do not translate)
    epochs: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"recipe {self.name}: optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"recipe {self.name}: schedule {self.schedule!r} is not one of {SCHEDULES}")

    def describe(self) -> str:
        """One line for the training log."""
        if self.optimizer == "sgd":
            optimizer = f"SGD(lr {self.lr:g}, momentum {self.momentum:g}, nesterov {self.nesterov}"
        else:
            optimizer = f"{'Adam' if self.optimizer == 'adam' else 'AdamW'}(lr {self.lr:g}, betas {self.betas}, " \
                        f"eps {self.eps:g}"
        optimizer += f", weight decay {self.weight_decay:g})"
        schedule = {"poly": f"poly (exponent {self.poly_exponent:g}) to 0",
                    "cosine": f"cosine annealing to {self.min_lr:g}",
                    "linear": f"linear to {self.end_factor:g} x lr",
                    "plateau": f"x{self.plateau_factor:g} after {self.plateau_patience} epochs without a lower "
                               f"validation loss"}[self.schedule]
        return f"recipe {self.name}: {optimizer}, {schedule} over the run; source: {self.source}"


# nnU-Net's own (nnUNetTrainer.__init__ and configure_optimizers), which U-Mamba's trainers keep
NNUNET = Recipe("nnU-Net", "sgd", 1e-2, 3e-5, "poly", momentum=0.99, nesterov=True,
                source="nnU-Net v2 nnUNetTrainer.configure_optimizers")
# Swin-UMamba: AdamW, CosineAnnealingLR(T_max=num_epochs, eta_min=1e-6)
SWIN_UMAMBA = Recipe("Swin-UMamba", "adamw", 1e-4, 5e-2, "cosine", eps=1e-5, min_lr=1e-6,
                     source="JiarunLiu/Swin-UMamba nnunetv2/training/nnUNetTrainer/nnUNetTrainerSwinUMamba*.py")
# ViM-UNet: torch_em.default_segmentation_trainer (Adam) with the benchmark's ReduceLROnPlateau(min, 0.9, 10),
# stepped once per torch-em epoch on the validation loss; 1e5 iterations = 400 nnU-Net epochs
VIM_UNET = Recipe("ViM-UNet", "adam", 1e-4, 0.0, "plateau", plateau_factor=0.9, plateau_patience=10, epochs=400,
                  source="computational-cell-analytics/vimunet-benchmarking (torch_em.default_segmentation_trainer, "
                         "lr 1e-4, scheduler_kwargs mode min, factor 0.9, patience 10)")
# SegResMamba: Adam(1e-4, weight_decay=1e-5), CosineAnnealingLR(T_max=max_epochs) stepped per epoch (eta_min 0)
SEGRESMAMBA = Recipe("SegResMamba", "adam", 1e-4, 1e-5, "cosine", min_lr=0.0,
                     source="badhandas/SegResMamba brats_train.py")
# Flemme: Adam(3e-4, weight_decay=1e-8), LinearLR(1.0 -> 0.01) over the epochs, stepped per epoch
FLEMME = Recipe("Flemme", "adam", 3e-4, 1e-8, "linear", end_factor=0.01,
                source="wlsdzyzl/flemme resources/img/biomed_{2d,3d}/*/train_*_sem.yaml, flemme/trainer/train.py")


def build_optimizer(recipe: Recipe, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(parameters, recipe.lr, weight_decay=recipe.weight_decay, momentum=recipe.momentum,
                               nesterov=recipe.nesterov)
    cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return cls(parameters, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps, weight_decay=recipe.weight_decay)


class EpochScheduler(LRScheduler):
    """A learning rate that is a function of the epoch over ``num_epochs``, set by ``step(current_epoch)`` as
    nnU-Net calls it (``step()`` without an epoch counts on from the last one)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, num_epochs: int) -> None:
        self.initial_lr, self.num_epochs = initial_lr, num_epochs
        self.ctr = 0
        super().__init__(optimizer)

    def lr_at(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)


class CosineAnnealingScheduler(EpochScheduler):
    """Cosine annealing from ``initial_lr`` to ``min_lr`` over ``max_steps`` (torch's CosineAnnealingLR in closed
    form, as the originals step it once per epoch)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int, min_lr: float) -> None:
        self.min_lr = min_lr
        super().__init__(optimizer, initial_lr, max_steps)

    def lr_at(self, epoch: int) -> float:
        progress = min(epoch, self.num_epochs) / max(self.num_epochs, 1)
        return self.min_lr + 0.5 * (self.initial_lr - self.min_lr) * (1 + math.cos(math.pi * progress))


class LinearScheduler(EpochScheduler):
    """torch's LinearLR in closed form: the factor goes from 1 to ``end_factor`` over ``num_epochs``."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, num_epochs: int,
                 end_factor: float) -> None:
        self.end_factor = end_factor
        super().__init__(optimizer, initial_lr, num_epochs)

    def lr_at(self, epoch: int) -> float:
        progress = min(epoch, self.num_epochs) / max(self.num_epochs, 1)
        return self.initial_lr * (1 + (self.end_factor - 1) * progress)


class PlateauScheduler(ReduceLROnPlateau):
    """ReduceLROnPlateau on the validation loss. nnU-Net's ``step(current_epoch)`` is ignored (an epoch number is
    not a metric); the trainer calls :meth:`report` once per epoch with the validation loss."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, factor: float, patience: int) -> None:
        self.initial_lr = initial_lr
        super().__init__(optimizer, mode="min", factor=factor, patience=patience)

    def step(self, metrics=None, epoch=None) -> None:  # noqa: ARG002 - nnU-Net passes the epoch here
        pass

    def report(self, validation_loss: float) -> None:
        super().step(float(validation_loss))

    def replay(self, validation_losses: Sequence[float]) -> None:
        """Rebuild the state after resuming: from the initial learning rate through every logged loss."""
        fresh = PlateauScheduler(self.optimizer, self.initial_lr, self.factor, self.patience)
        for group in self.optimizer.param_groups:
            group["lr"] = self.initial_lr
        for loss in validation_losses:
            fresh.report(loss)
        self.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "optimizer"})


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, num_epochs: int) -> LRScheduler:
    if recipe.schedule == "poly":
        return PolyLRScheduler(optimizer, recipe.lr, num_epochs, exponent=recipe.poly_exponent)
    if recipe.schedule == "cosine":
        return CosineAnnealingScheduler(optimizer, recipe.lr, num_epochs, recipe.min_lr)
    if recipe.schedule == "linear":
        return LinearScheduler(optimizer, recipe.lr, num_epochs, recipe.end_factor)
    return PlateauScheduler(optimizer, recipe.lr, recipe.plateau_factor, recipe.plateau_patience)


def build(recipe: Recipe, parameters: Iterable[torch.nn.Parameter],
          num_epochs: int) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """The optimiser and scheduler of ``recipe`` (what ``configure_optimizers`` returns)."""
    optimizer = build_optimizer(recipe, parameters)
    return optimizer, build_scheduler(recipe, optimizer, num_epochs)


__all__: list[str] = ["Recipe", "NNUNET", "SWIN_UMAMBA", "VIM_UNET", "SEGRESMAMBA", "FLEMME", "build",
                      "build_optimizer", "build_scheduler", "CosineAnnealingScheduler", "LinearScheduler",
                      "PlateauScheduler"]
