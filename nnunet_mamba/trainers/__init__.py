"""nnU-Net trainers for our networks. Importing this module needs nnunetv2."""
from . import recipes
from .base import ShortRunMixin, nnUNetTrainerMamba
from .flemme import (nnUNetTrainerFlemmeSeM, nnUNetTrainerFlemmeHSeM, nnUNetTrainerFlemmeResNet,
                     nnUNetTrainerFlemmeUNet, nnUNetTrainerFlemmeCAttenU, nnUNetTrainerFlemmeSwinU,
                     nnUNetTrainerFlemmeMambaU, nnUNetTrainerFlemmeResNet_HSeM, nnUNetTrainerFlemmeUNet_HSeM,
                     nnUNetTrainerFlemmeCAttenU_HSeM, nnUNetTrainerFlemmeSwinU_HSeM, nnUNetTrainerFlemmeMambaU_HSeM,
                     nnUNetTrainerFlemmeResNet_nnUNetRecipe, nnUNetTrainerFlemmeUNet_nnUNetRecipe,
                     nnUNetTrainerFlemmeCAttenU_nnUNetRecipe, nnUNetTrainerFlemmeSwinU_nnUNetRecipe,
                     nnUNetTrainerFlemmeMambaU_nnUNetRecipe, nnUNetTrainerFlemmeResNet_HSeM_nnUNetRecipe,
                     nnUNetTrainerFlemmeUNet_HSeM_nnUNetRecipe, nnUNetTrainerFlemmeCAttenU_HSeM_nnUNetRecipe,
                     nnUNetTrainerFlemmeSwinU_HSeM_nnUNetRecipe, nnUNetTrainerFlemmeMambaU_HSeM_nnUNetRecipe,
                     nnUNetTrainerFlemmeMambaU_demo, nnUNetTrainerFlemmeMambaU_HSeM_demo)
from .segresmamba import (nnUNetTrainerSegResMamba, nnUNetTrainerSegResMamba_nnUNetRecipe,
                          nnUNetTrainerSegResMamba_demo)
from .swin_umamba import (nnUNetTrainerSwinUMambaScratch, nnUNetTrainerSwinUMamba, nnUNetTrainerSwinUMambaDScratch,
                          nnUNetTrainerSwinUMambaD, nnUNetTrainerSwinUMamba_demo, nnUNetTrainerSwinUMambaD_demo,
                          nnUNetTrainerSwinUMambaScratch_demo,
                          nnUNetTrainerSwinUMambaScratch_nnUNetRecipe, nnUNetTrainerSwinUMambaDScratch_nnUNetRecipe)
from .swin_umamba import nnUNetTrainerSwinUMambaAdaptedLoading, nnUNetTrainerSwinUMambaDAdaptedLoading
from .umamba import (nnUNetTrainerUMambaBot, nnUNetTrainerUMambaEnc, nnUNetTrainerUMambaBot_demo,
                     nnUNetTrainerUMambaEnc_demo)
from .vim_unet import (nnUNetTrainerViMUNetTiny, nnUNetTrainerViMUNetSmall, nnUNetTrainerViMUNetTiny_nnUNetRecipe,
                       nnUNetTrainerViMUNetSmall_nnUNetRecipe, nnUNetTrainerViMUNetTiny_demo)

__all__ = ["ShortRunMixin", "nnUNetTrainerMamba", "recipes", "nnUNetTrainerFlemmeSeM",
           "nnUNetTrainerFlemmeHSeM", "nnUNetTrainerFlemmeResNet", "nnUNetTrainerFlemmeUNet",
           "nnUNetTrainerFlemmeCAttenU", "nnUNetTrainerFlemmeSwinU", "nnUNetTrainerFlemmeMambaU",
           "nnUNetTrainerFlemmeResNet_HSeM", "nnUNetTrainerFlemmeUNet_HSeM", "nnUNetTrainerFlemmeCAttenU_HSeM",
           "nnUNetTrainerFlemmeSwinU_HSeM", "nnUNetTrainerFlemmeMambaU_HSeM", "nnUNetTrainerFlemmeResNet_nnUNetRecipe",
           "nnUNetTrainerFlemmeUNet_nnUNetRecipe", "nnUNetTrainerFlemmeCAttenU_nnUNetRecipe",
           "nnUNetTrainerFlemmeSwinU_nnUNetRecipe", "nnUNetTrainerFlemmeMambaU_nnUNetRecipe",
           "nnUNetTrainerFlemmeResNet_HSeM_nnUNetRecipe", "nnUNetTrainerFlemmeUNet_HSeM_nnUNetRecipe",
           "nnUNetTrainerFlemmeCAttenU_HSeM_nnUNetRecipe", "nnUNetTrainerFlemmeSwinU_HSeM_nnUNetRecipe",
           "nnUNetTrainerFlemmeMambaU_HSeM_nnUNetRecipe", "nnUNetTrainerFlemmeMambaU_demo",
           "nnUNetTrainerFlemmeMambaU_HSeM_demo", "nnUNetTrainerSegResMamba", "nnUNetTrainerSegResMamba_nnUNetRecipe",
           "nnUNetTrainerSegResMamba_demo", "nnUNetTrainerSwinUMambaScratch", "nnUNetTrainerSwinUMamba",
           "nnUNetTrainerSwinUMambaDScratch", "nnUNetTrainerSwinUMambaD", "nnUNetTrainerSwinUMamba_demo",
           "nnUNetTrainerSwinUMambaD_demo", "nnUNetTrainerSwinUMambaScratch_nnUNetRecipe",
           "nnUNetTrainerSwinUMambaDScratch_nnUNetRecipe", "nnUNetTrainerUMambaBot", "nnUNetTrainerUMambaEnc",
           "nnUNetTrainerUMambaBot_demo", "nnUNetTrainerUMambaEnc_demo", "nnUNetTrainerViMUNetTiny",
           "nnUNetTrainerViMUNetSmall", "nnUNetTrainerViMUNetTiny_nnUNetRecipe",
           "nnUNetTrainerViMUNetSmall_nnUNetRecipe", "nnUNetTrainerViMUNetTiny_demo",
           "nnUNetTrainerSwinUMambaAdaptedLoading", "nnUNetTrainerSwinUMambaDAdaptedLoading",
           "nnUNetTrainerSwinUMambaScratch_demo"]


def list_trainers() -> list:
    """Names of all trainer classes this package provides (for ``nnunet-mamba list``)."""
    # bases without a network of their own (the SeM and H-SeM trainers')
    bases = {"nnUNetTrainerMamba", "nnUNetTrainerFlemmeSeM", "nnUNetTrainerFlemmeHSeM"}
    return sorted(name for name in __all__ if name.startswith("nnUNetTrainer") and name not in bases)
