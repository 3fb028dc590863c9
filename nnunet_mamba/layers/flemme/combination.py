"""H-SeM's combination layer (Flemme paper Eq. 12)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..blocks import conv_dim



class CombinationLayer(nn.Module):
    """H-SeM's fusion (paper Eq. 12): every prediction resized to the output size (nearest), plus its own
    learnable position encoding, concatenated, fused by a 1x1 convolution.

    The original learns each encoding at the full output size (classes x patch voxels per input: 44M parameters
    for its BraTS patch). Here each is a ``grid``^dim map (truncated-normal init, std 0.02, as the original's),
    upsampled (bi/trilinear) to the output size: ``inputs`` x classes x ``grid``^dim parameters whatever the patch
    size, and any patch size works.
    """

    def __init__(self, conv_op: type[_ConvNd], inputs: int, channels: int, grid: int = 8) -> None:
        super().__init__()
        self.dim = conv_dim(conv_op)
        self.position_encodings = nn.Parameter(torch.zeros(inputs, channels, *[grid] * self.dim))
        trunc_normal_(self.position_encodings, std=0.02)
        self.fuse = conv_op(inputs * channels, channels, 1)

    def forward(self, predictions: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        if len(predictions) != self.position_encodings.shape[0]:
            raise ValueError(f"CombinationLayer was built for {self.position_encodings.shape[0]} predictions, got "
                             f"{len(predictions)}")
        size = tuple(size)
        mode = "bilinear" if self.dim == 2 else "trilinear"
        encodings = F.interpolate(self.position_encodings, size=size, mode=mode, align_corners=False)
        resized = [p if tuple(p.shape[2:]) == size else F.interpolate(p, size=size, mode="nearest")
                   for p in predictions]
        return self.fuse(torch.cat([p + e.to(p.dtype) for p, e in zip(resized, encodings)], dim=1))
