"""SegResMamba trainer (3D): nnU-Net's Dice+CE with deep supervision at the network's own output strides."""
from .base import ShortRunMixin, nnUNetTrainerMamba


class nnUNetTrainerSegResMamba(nnUNetTrainerMamba):
    network_name = "segresmamba"


class nnUNetTrainerSegResMamba_demo(ShortRunMixin, nnUNetTrainerSegResMamba):
    pass
