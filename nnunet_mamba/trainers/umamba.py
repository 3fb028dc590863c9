"""U-Mamba trainers, under the original repository's names; nnU-Net's recipe, as the original's trainers keep."""
from .base import ShortRunMixin, nnUNetTrainerMamba


class nnUNetTrainerUMambaBot(nnUNetTrainerMamba):
    network_name = "umamba_bot"


class nnUNetTrainerUMambaEnc(nnUNetTrainerMamba):
    network_name = "umamba_enc"


class nnUNetTrainerUMambaBot_demo(ShortRunMixin, nnUNetTrainerUMambaBot):
    pass


class nnUNetTrainerUMambaEnc_demo(ShortRunMixin, nnUNetTrainerUMambaEnc):
    pass
