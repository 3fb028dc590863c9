"""nnU-Net trainers for our networks. Importing this module needs nnunetv2."""
from .base import ShortRunMixin, nnUNetTrainerMamba, plans_network_kwargs
from .umamba import (nnUNetTrainerUMambaBot, nnUNetTrainerUMambaBot_demo, nnUNetTrainerUMambaEnc,
                     nnUNetTrainerUMambaEnc_demo)

__all__ = ["ShortRunMixin", "nnUNetTrainerMamba", "plans_network_kwargs", "nnUNetTrainerUMambaBot",
           "nnUNetTrainerUMambaBot_demo", "nnUNetTrainerUMambaEnc", "nnUNetTrainerUMambaEnc_demo"]


def list_trainers() -> list:
    """Names of all trainer classes this package provides (for ``nnunet-mamba list``)."""
    return sorted(name for name in __all__ if name.startswith("nnUNetTrainer") and name != "nnUNetTrainerMamba")
