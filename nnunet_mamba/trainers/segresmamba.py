"""SegResMamba trainer (3D): nnU-Net's Dice+CE with deep supervision at the network's own output strides, the
original's Adam (lr 1e-4, weight decay 1e-5) with cosine annealing; ``..._nnUNetRecipe``: nnU-Net's SGD recipe."""
from . import recipes
from .base import ShortRunMixin, nnUNetTrainerMamba


class nnUNetTrainerSegResMamba(nnUNetTrainerMamba):
    network_name = "segresmamba"
    recipe = recipes.SEGRESMAMBA


class nnUNetTrainerSegResMamba_nnUNetRecipe(nnUNetTrainerSegResMamba):
    recipe = recipes.NNUNET


class nnUNetTrainerSegResMamba_demo(ShortRunMixin, nnUNetTrainerSegResMamba):
    # the full-width network (77M parameters) takes many minutes per 3D smoke test on a CPU
    network_overrides = {"encoder_width": 8, "decoder_width": 16}
