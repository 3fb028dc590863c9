"""SegResMamba trainer (3D): nnU-Net's Dice+CE with deep supervision at the network's own output strides."""
from .base import ShortRunMixin, nnUNetTrainerMamba


class nnUNetTrainerSegResMamba(nnUNetTrainerMamba):
    network_name = "segresmamba"


class nnUNetTrainerSegResMamba_demo(ShortRunMixin, nnUNetTrainerSegResMamba):
    # the full-width network (77M parameters) takes many minutes per 3D smoke test on a CPU
    network_overrides = {"encoder_width": 8, "decoder_width": 16}
