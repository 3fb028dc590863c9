"""Shim for nnU-Net's trainer lookup: the learning benchmark's ``<Trainer>_learnbench`` variants.

Separate from ``nnunet_mamba_trainers.py`` so that they stay out of ``nnunet-mamba list``.
"""
from nnunet_mamba.trainers.learning import *  # noqa: F401,F403
