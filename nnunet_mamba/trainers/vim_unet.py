"""ViM-UNet trainers (2D): the original's Adam (lr 1e-4) with ReduceLROnPlateau on the validation loss;
``..._nnUNetRecipe``: nnU-Net's SGD recipe on the same network, for comparison."""
from . import recipes
from .base import ShortRunMixin, nnUNetTrainerMamba


class nnUNetTrainerViMUNetTiny(nnUNetTrainerMamba):
    network_name = "vim_unet_tiny"
    recipe = recipes.VIM_UNET


class nnUNetTrainerViMUNetSmall(nnUNetTrainerMamba):
    network_name = "vim_unet_small"
    recipe = recipes.VIM_UNET


class nnUNetTrainerViMUNetTiny_nnUNetRecipe(nnUNetTrainerViMUNetTiny):
    recipe = recipes.NNUNET


class nnUNetTrainerViMUNetSmall_nnUNetRecipe(nnUNetTrainerViMUNetSmall):
    recipe = recipes.NNUNET


class nnUNetTrainerViMUNetTiny_demo(ShortRunMixin, nnUNetTrainerViMUNetTiny):
    pass
