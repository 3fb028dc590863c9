"""Folder that ``nnUNet_extTrainer`` points at; installed as ``nnunet_mamba.nnUNet_trainers``."""
