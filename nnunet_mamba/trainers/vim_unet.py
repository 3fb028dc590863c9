"""ViM-UNet trainers (2D)."""
from .base import ShortRunMixin, nnUNetTrainerMamba


class nnUNetTrainerViMUNetTiny(nnUNetTrainerMamba):
    network_name = "vim_unet_tiny"


class nnUNetTrainerViMUNetSmall(nnUNetTrainerMamba):
    network_name = "vim_unet_small"


class nnUNetTrainerViMUNetTiny_demo(ShortRunMixin, nnUNetTrainerViMUNetTiny):
    pass
