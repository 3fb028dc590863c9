"""Layers and blocks built on :mod:`nnunet_mamba.ops`."""
import warnings

# timm (imported by our layers and networks, all of which import this package first) uses torch.jit.interface,
# which torch >= 2.9 deprecates with a FutureWarning at import time; it says nothing to our users.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface", category=FutureWarning)
    import timm  # noqa: F401

from .blocks import MambaLayer, ResidualConvBlock, UpsampleConv, conv_dim, stack_residual_blocks
from .mamba import Mamba

__all__ = ["Mamba", "MambaLayer", "ResidualConvBlock", "UpsampleConv", "conv_dim", "stack_residual_blocks"]
