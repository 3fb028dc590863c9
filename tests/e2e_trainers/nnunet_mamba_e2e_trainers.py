"""Trainers of the end-to-end tests only: tests/helpers.nnunet adds this folder to ``nnUNet_extTrainer``, which the
README's one-liner keeps next to ours. Each ``<demo>_e2e`` is a ``_demo`` trainer (two epochs, seeded) with one
training and one validation iteration per epoch: a round trip that checks a trainer trains, saves, reloads and
predicts through nnU-Net's commands needs no more, and on a CPU the iterations of the large networks are most of
its time. The demos whose Dice the tests check keep their own iterations.
"""
from nnunet_mamba.trainers import (nnUNetTrainerFlemmeMambaU_demo, nnUNetTrainerFlemmeMambaU_HSeM_demo,
                                   nnUNetTrainerSegResMamba_demo, nnUNetTrainerSwinUMamba_demo,
                                   nnUNetTrainerSwinUMambaD_demo, nnUNetTrainerUMambaBot_demo,
                                   nnUNetTrainerUMambaEnc_demo, nnUNetTrainerViMUNetTiny_demo)

for _demo in (nnUNetTrainerUMambaBot_demo, nnUNetTrainerUMambaEnc_demo, nnUNetTrainerSwinUMamba_demo,
              nnUNetTrainerSwinUMambaD_demo, nnUNetTrainerViMUNetTiny_demo, nnUNetTrainerFlemmeMambaU_demo,
              nnUNetTrainerFlemmeMambaU_HSeM_demo, nnUNetTrainerSegResMamba_demo):
    _name = f"{_demo.__name__}_e2e"
    globals()[_name] = type(_name, (_demo,), {"short_iterations": 1, "short_val_iterations": 1, "__module__": __name__})
del _demo, _name
