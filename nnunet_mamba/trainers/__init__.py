"""nnU-Net trainers for our networks. Importing this module needs nnunetv2."""
from .base import ShortRunMixin, nnUNetTrainerMamba, plans_network_kwargs
from .flemme import (nnUNetTrainerFlemmeCAttenU, nnUNetTrainerFlemmeCAttenU_HSeM, nnUNetTrainerFlemmeHSeM,
                     nnUNetTrainerFlemmeMambaU, nnUNetTrainerFlemmeMambaU_demo, nnUNetTrainerFlemmeMambaU_HSeM,
                     nnUNetTrainerFlemmeMambaU_HSeM_demo, nnUNetTrainerFlemmeResNet, nnUNetTrainerFlemmeResNet_HSeM,
                     nnUNetTrainerFlemmeSeM, nnUNetTrainerFlemmeSwinU, nnUNetTrainerFlemmeSwinU_HSeM,
                     nnUNetTrainerFlemmeUNet, nnUNetTrainerFlemmeUNet_HSeM)
from .segresmamba import nnUNetTrainerSegResMamba, nnUNetTrainerSegResMamba_demo
from .swin_umamba import (nnUNetTrainerSwinUMamba, nnUNetTrainerSwinUMamba_demo, nnUNetTrainerSwinUMambaD,
                          nnUNetTrainerSwinUMambaD_demo, nnUNetTrainerSwinUMambaDScratch,
                          nnUNetTrainerSwinUMambaScratch, nnUNetTrainerSwinUMambaScratch_demo)
from .umamba import (nnUNetTrainerUMambaBot, nnUNetTrainerUMambaBot_demo, nnUNetTrainerUMambaEnc,
                     nnUNetTrainerUMambaEnc_demo)
from .vim_unet import nnUNetTrainerViMUNetSmall, nnUNetTrainerViMUNetTiny, nnUNetTrainerViMUNetTiny_demo

__all__ = ["ShortRunMixin", "nnUNetTrainerMamba", "plans_network_kwargs",
           "nnUNetTrainerFlemmeCAttenU", "nnUNetTrainerFlemmeCAttenU_HSeM", "nnUNetTrainerFlemmeMambaU",
           "nnUNetTrainerFlemmeMambaU_demo", "nnUNetTrainerFlemmeMambaU_HSeM", "nnUNetTrainerFlemmeMambaU_HSeM_demo",
           "nnUNetTrainerFlemmeResNet", "nnUNetTrainerFlemmeResNet_HSeM", "nnUNetTrainerFlemmeSwinU",
           "nnUNetTrainerFlemmeSwinU_HSeM", "nnUNetTrainerFlemmeUNet", "nnUNetTrainerFlemmeUNet_HSeM",
           # bases of the SeM and H-SeM trainers (no network of their own)
           "nnUNetTrainerFlemmeHSeM", "nnUNetTrainerFlemmeSeM",
           "nnUNetTrainerSegResMamba",
           "nnUNetTrainerSegResMamba_demo", "nnUNetTrainerSwinUMamba",
           "nnUNetTrainerSwinUMamba_demo", "nnUNetTrainerSwinUMambaD", "nnUNetTrainerSwinUMambaD_demo",
           "nnUNetTrainerSwinUMambaDScratch", "nnUNetTrainerSwinUMambaScratch", "nnUNetTrainerSwinUMambaScratch_demo",
           "nnUNetTrainerUMambaBot",
           "nnUNetTrainerUMambaBot_demo", "nnUNetTrainerUMambaEnc", "nnUNetTrainerUMambaEnc_demo",
           "nnUNetTrainerViMUNetSmall", "nnUNetTrainerViMUNetTiny", "nnUNetTrainerViMUNetTiny_demo"]


def list_trainers() -> list:
    """Names of all trainer classes this package provides (for ``nnunet-mamba list``)."""
    bases = {"nnUNetTrainerMamba", "nnUNetTrainerFlemmeSeM", "nnUNetTrainerFlemmeHSeM"}
    return sorted(name for name in __all__ if name.startswith("nnUNetTrainer") and name not in bases)
