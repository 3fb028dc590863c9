"""Shim for nnU-Net's trainer lookup: point ``nnUNet_extTrainer`` at this folder (``eval "$(nnunet-mamba env)"``).

nnU-Net imports every module in the folder by its bare name; absolute imports keep our package intact.
"""
from nnunet_mamba.trainers import *  # noqa: F401,F403
