"""Layers and blocks built on :mod:`nnunet_mamba.ops`."""
from .blocks import MambaLayer, ResidualConvBlock, UpsampleConv, conv_dim, stack_residual_blocks
from .mamba import Mamba

__all__ = ["Mamba", "MambaLayer", "ResidualConvBlock", "UpsampleConv", "conv_dim", "stack_residual_blocks"]
