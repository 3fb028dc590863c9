"""Flemme's building blocks (Zhang et al., "Flemme: A Flexible and Modular Learning Platform for Medical Images"),
one implementation for 2D and 3D, chosen by ``conv_op`` (convolution blocks) or the tensor's rank (token blocks).

Convolution blocks (:mod:`.conv`) work on channels-first maps (batch, C, *spatial):
    FlemmeConvBlock     conv (k, same padding, bias) -> norm -> activation [-> multi-head self-attention, CAtten-U]
    FlemmeResConvBlock  paper Eq. 3: act(FlemmeConvBlock(x) -> conv -> norm  +  shortcut(x)), shortcut a 1x1 conv
                        when the widths differ
Token blocks work on channels-last maps (batch, *spatial, C), as the original's:
    SwinBlock        (:mod:`.swin`) x + W-MSA(LN(x)), then fc(x) + MLP(LN(x)); fc is linear when the width changes
    MambaBlock       (:mod:`.mamba`) paper Eq. 5: x + out_proj(LN(SSM(cross scan(act(dwconv(W x LN(x)))))) * act(z)),
                     then fc(x) + MLP(x) (the original has no norm before this MLP)
    Res*Block        two blocks, act(b2(b1(x)) + shortcut(x)); a Swin pair is one W-MSA and one SW-MSA block
    TokenMLP         (:mod:`.tokens`) Linear-act-Linear-act, as the original's (its DenseBlocks all activate)
Patch operations (:mod:`.patches`, token networks): PatchEmbedding, PatchMerging, PatchExpanding, PatchRecovery.
CombinationLayer (:mod:`.combination`) is H-SeM's fusion (paper Eq. 12).

Parameters (names aside) are the original's, so the networks built from these blocks reproduce the paper's
Table III counts exactly (tests/test_flemme.py): attention head width floor(C / heads) (3 heads on 32 channels
use 30), Mamba state size ceil(C / 6) and dt rank ceil(C / 16), no Linear in a patch expansion whose output width
already equals its input width. Deliberate differences in behaviour, none of which changes a parameter count:
- The second block of a residual pair keeps its SiLU gate, conv activation and MLP activation; the original
  passes ``activation=None`` to it, which silently made its gate, conv and MLP linear.
- Swin windows work on any map size (see :mod:`.swin`); the original asserts the map is a multiple of the window.
- CAtten-U's self-attention is added to the block output (a residual) instead of replacing it.
"""
from .combination import CombinationLayer
from .conv import FlemmeConvBlock, FlemmeResConvBlock, strided_conv, transposed_conv
from .mamba import SCAN_MODES, MambaBlock, ResMambaBlock, flemme_directions
from .patches import PatchEmbedding, PatchExpanding, PatchMerging, PatchRecovery
from .swin import ResSwinBlock, SwinBlock, WindowAttention
from .tokens import MultiHeadAttention, TokenMLP

__all__ = ["SCAN_MODES", "CombinationLayer", "FlemmeConvBlock", "FlemmeResConvBlock", "MambaBlock",
           "MultiHeadAttention", "PatchEmbedding", "PatchExpanding", "PatchMerging", "PatchRecovery",
           "ResMambaBlock", "ResSwinBlock", "SwinBlock", "TokenMLP", "WindowAttention", "flemme_directions",
           "strided_conv", "transposed_conv"]
