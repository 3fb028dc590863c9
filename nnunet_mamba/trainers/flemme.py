"""Flemme trainers: every encoder x {SeM, H-SeM} (registry names ``flemme_<encoder>`` and ``flemme_<encoder>_hsem``).

Naming: ``nnUNetTrainerFlemme<Encoder>`` trains SeM, ``nnUNetTrainerFlemme<Encoder>_HSeM`` trains H-SeM, with
<Encoder> one of ResNet, UNet, CAttenU, SwinU, MambaU; ``..._demo`` variants are the short smoke-test runs.

SeM has one output: nnU-Net's Dice+CE on it, no deep supervision. H-SeM returns the fused prediction and one side
prediction per decoder stage (and the bottleneck); the pyramid loss of the paper (Eq. 13-14) replaces nnU-Net's
deep-supervision weighting:

    L = L(y, x') + lambda * mean_i L(S(y, x'_i), x'_i)

with L nnU-Net's Dice+CE, x' the fused prediction, x'_i the side predictions and S(y, x'_i) the target at the
side's size (nnU-Net's target down-sampling at the network's ``deep_supervision_scales``). The weights are
[1, lambda / n, ..., lambda / n], not normalised (nnU-Net normalises its own weights to sum 1).
``pyramid_lambda`` (default 1, the paper's) is a class attribute; ``NNUNET_MAMBA_PYRAMID_LAMBDA`` overrides it.

All train with Flemme's recipe (Adam, lr 3e-4, weight decay 1e-8, linear decay to 0.01 x lr);
``..._nnUNetRecipe`` variants with nnU-Net's SGD recipe, for comparison.
"""
from __future__ import annotations

import os

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from . import recipes
from .base import ShortRunMixin, nnUNetTrainerMamba

PYRAMID_LAMBDA_ENV = "NNUNET_MAMBA_PYRAMID_LAMBDA"


def pyramid_loss_weights(num_sides: int, lam: float) -> list[float]:
    """Loss weights of [fused, side_1, ..., side_n] for Flemme's pyramid loss (Eq. 13-14)."""
    if num_sides < 1:
        raise ValueError(f"the pyramid loss needs at least one side prediction, got {num_sides}")
    if lam < 0:
        raise ValueError(f"the pyramid loss weight lambda must be >= 0, got {lam}")
    return [1.0] + [lam / num_sides] * num_sides


class nnUNetTrainerFlemmeSeM(nnUNetTrainerMamba):
    """SeM: one prediction, nnU-Net's Dice+CE without deep supervision."""

    recipe = recipes.FLEMME

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False


class nnUNetTrainerFlemmeHSeM(nnUNetTrainerMamba):
    """H-SeM: fused and side predictions, trained with the pyramid loss."""

    recipe = recipes.FLEMME
    pyramid_lambda: float = 1.0

    @property
    def pyramid_weight(self) -> float:
        value = os.environ.get(PYRAMID_LAMBDA_ENV, "").strip()
        if not value:
            return self.pyramid_lambda
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{PYRAMID_LAMBDA_ENV}={value!r} is not a number") from None

    def _build_loss(self):
        loss = super()._build_loss()  # nnU-Net's Dice+CE (or Dice+BCE for regions), wrapped for deep supervision
        if isinstance(loss, DeepSupervisionWrapper):
            num_sides = len(self._get_deep_supervision_scales()) - 1
            loss.weight_factors = tuple(pyramid_loss_weights(num_sides, self.pyramid_weight))
            self.print_to_log_file(f"nnunet-mamba: H-SeM pyramid loss, lambda {self.pyramid_weight}, weights "
                                   f"{[round(w, 4) for w in loss.weight_factors]}")
        return loss


class nnUNetTrainerFlemmeResNet(nnUNetTrainerFlemmeSeM):
    network_name = "flemme_resnet"


class nnUNetTrainerFlemmeUNet(nnUNetTrainerFlemmeSeM):
    network_name = "flemme_unet"


class nnUNetTrainerFlemmeCAttenU(nnUNetTrainerFlemmeSeM):
    network_name = "flemme_cattenu"


class nnUNetTrainerFlemmeSwinU(nnUNetTrainerFlemmeSeM):
    network_name = "flemme_swinu"


class nnUNetTrainerFlemmeMambaU(nnUNetTrainerFlemmeSeM):
    network_name = "flemme_mambau"


class nnUNetTrainerFlemmeResNet_HSeM(nnUNetTrainerFlemmeHSeM):
    network_name = "flemme_resnet_hsem"


class nnUNetTrainerFlemmeUNet_HSeM(nnUNetTrainerFlemmeHSeM):
    network_name = "flemme_unet_hsem"


class nnUNetTrainerFlemmeCAttenU_HSeM(nnUNetTrainerFlemmeHSeM):
    network_name = "flemme_cattenu_hsem"


class nnUNetTrainerFlemmeSwinU_HSeM(nnUNetTrainerFlemmeHSeM):
    network_name = "flemme_swinu_hsem"


class nnUNetTrainerFlemmeMambaU_HSeM(nnUNetTrainerFlemmeHSeM):
    network_name = "flemme_mambau_hsem"


class nnUNetTrainerFlemmeResNet_nnUNetRecipe(nnUNetTrainerFlemmeResNet):
    recipe = recipes.NNUNET


class nnUNetTrainerFlemmeUNet_nnUNetRecipe(nnUNetTrainerFlemmeUNet):
    recipe = recipes.NNUNET


class nnUNetTrainerFlemmeCAttenU_nnUNetRecipe(nnUNetTrainerFlemmeCAttenU):
    recipe = recipes.NNUNET


class nnUNetTrainerFlemmeSwinU_nnUNetRecipe(nnUNetTrainerFlemmeSwinU):
    recipe = recipes.NNUNET


class nnUNetTrainerFlemmeMambaU_nnUNetRecipe(nnUNetTrainerFlemmeMambaU):
    recipe = recipes.NNUNET


class nnUNetTrainerFlemmeResNet_HSeM_nnUNetRecipe(nnUNetTrainerFlemmeResNet_HSeM):
    recipe = recipes.NNUNET


class nnUNetTrainerFlemmeUNet_HSeM_nnUNetRecipe(nnUNetTrainerFlemmeUNet_HSeM):
    recipe = recipes.NNUNET


class nnUNetTrainerFlemmeCAttenU_HSeM_nnUNetRecipe(nnUNetTrainerFlemmeCAttenU_HSeM):
    recipe = recipes.NNUNET


class nnUNetTrainerFlemmeSwinU_HSeM_nnUNetRecipe(nnUNetTrainerFlemmeSwinU_HSeM):
    recipe = recipes.NNUNET


class nnUNetTrainerFlemmeMambaU_HSeM_nnUNetRecipe(nnUNetTrainerFlemmeMambaU_HSeM):
    recipe = recipes.NNUNET


class nnUNetTrainerFlemmeMambaU_demo(ShortRunMixin, nnUNetTrainerFlemmeMambaU):
    # at the plans' widths a 3D H-SeM smoke test takes ~15 minutes on a 2-core CPU
    plans_width_divisor = 8
    network_overrides = {"num_blocks": 1}


class nnUNetTrainerFlemmeMambaU_HSeM_demo(ShortRunMixin, nnUNetTrainerFlemmeMambaU_HSeM):
    plans_width_divisor = 8
    network_overrides = {"num_blocks": 1}
