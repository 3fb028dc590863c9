"""What every network shares: input checks, zero padding to the total stride, cropping the outputs back.

Padding goes at the end of every axis, so that the output grids of every resolution stay anchored at the image
origin, like nnU-Net's downsampled deep-supervision targets: the output at scale s is cropped to ``round(size * s)``
voxels per axis, the size batchgeneratorsv2's ``DownsampleSegForDSTransform`` gives the target (Python's round,
halves to even). Zeros, because nnU-Net feeds z-score normalised images (0 is the mean intensity) and pads
too-small images with zeros itself.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from torch import nn

Output = torch.Tensor | list[torch.Tensor]
Scale = float | Sequence[float]


def check_positive_ints(**values: object) -> None:
    """Raise ValueError naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def per_stage(value: object, n_stages: int, name: str, broadcast: bool = True) -> list:
    """``value`` as a list of one entry per stage: a list or tuple of ``n_stages`` entries, or (``broadcast``) one
    value for every stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_stages:
            raise ValueError(f"{name} must have {n_stages} entries (one entry per stage), got {len(value)}: "
                             f"{list(value)}")
        return list(value)
    if not broadcast:
        raise ValueError(f"{name} must have {n_stages} entries (one entry per stage), got {value!r}")
    return [value] * n_stages


def pad_to_multiple(x: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """``x`` (batch, channels, *spatial) zero-padded at the end of every axis to a multiple of ``stride``."""
    pad = [-n % s for n, s in zip(x.shape[2:], stride)]
    if not any(pad):
        return x
    return F.pad(x, [p for amount in reversed(pad) for p in (0, amount)])


def crop_to(x: torch.Tensor, shape: Sequence[int], contiguous: bool = False) -> torch.Tensor:
    """``x`` cropped to the spatial ``shape`` from the origin (a view unless ``contiguous``)."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    x = x[(..., *(slice(0, n) for n in shape))]
    return x.contiguous() if contiguous else x


def scaled_shapes(spatial_shape: Sequence[int], scales: Sequence[Scale]) -> list[tuple[int, ...]]:
    """nnU-Net's target sizes at ``scales`` (one scale, or one per axis, per output): ``round(size * scale)``."""
    shapes = []
    for scale in scales:
        per_axis = scale if isinstance(scale, Sequence) else [scale] * len(spatial_shape)
        shapes.append(tuple(round(n * s) for n, s in zip(spatial_shape, per_axis)))
    return shapes


def refuse_nan_input(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: in inference (eval mode), refuse inputs holding NaN with a message naming the fix.

    Refused rather than replaced: nnU-Net's normalisation keeps NaN voxels, and a selective scan carries one NaN
    through its whole sequence (one NaN pixel turns every output of U-Mamba Bot to NaN), so such an image would
    give a meaningless segmentation and exit 0; which value should replace NaN (background, 0, the minimum) depends
    on the images, so the user decides. Training data is checked by nnU-Net itself (``nnUNetv2_plan_and_preprocess
    --verify_dataset_integrity`` reports NaN images), so training steps are not checked here.
    """
    if module.training or not args or not isinstance(args[0], torch.Tensor):
        return
    x = args[0]
    if torch.isnan(x).any():
        raise ValueError(f"nnunet-mamba: the network input holds {int(torch.isnan(x).sum())} NaN values (of "
                         f"{x.numel()}): the image has NaN voxels, which nnU-Net's normalisation keeps and the Mamba "
                         "scan would spread over the whole prediction. Replace them in the image (e.g. "
                         "numpy.nan_to_num, or the background value) and predict again.")


class SegmentationNetwork(AbstractDynamicNetworkArchitectures):
    """Base of our networks: ``check_input`` and, for networks that take any patch size, the padded forward.

    Subclasses set ``input_channels``, ``dim`` (spatial dimensions) and, to use :meth:`forward`,
    ``total_stride`` (an int or one per axis), ``deep_supervision_scales`` (nnU-Net's format, one entry per
    output, highest resolution first) and :meth:`_forward_padded`. Networks of one dimensionality set
    ``only_dim``, which the shape error names.
    """

    only_dim: int | None = None
    # copy the cropped outputs into contiguous memory (Swin-UMamba's choice)
    contiguous_outputs: bool = False
    input_channels: int
    dim: int
    total_stride: int | Sequence[int]
    deep_supervision_scales: Sequence[Scale]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError for an input this network cannot take (called by ``forward``, and by our trainers on
        an empty meta tensor of the plans' patch, before nnU-Net starts its data loaders)."""
        name = type(self).__name__
        if x.dim() != self.dim + 2:
            axes = "x, y, z" if self.dim == 3 else "x, y"
            if self.only_dim is None:
                why = f"it was built for {self.dim}D by its conv_op"
            else:
                guess = {4: " (the input looks like a 2D image)", 5: " (the input looks like a 3D volume)"}
                why = f"it is a {self.dim}D network, {self.dim}D only{guess.get(x.dim(), '')}"
            raise ValueError(f"{name} ({self.dim}D) expects input (batch, channels, {axes}), got shape "
                             f"{tuple(x.shape)}: {why}")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"{name} expected {self.input_channels} input channels (it was built for them), got "
                             f"{x.shape[1]}")
        self._check_spatial(tuple(x.shape[2:]))

    def _check_spatial(self, spatial: tuple[int, ...]) -> None:
        """Raise ValueError for a spatial size this network cannot take; any size by default."""

    def output_shapes(self, spatial_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Spatial shapes of the outputs with deep supervision: nnU-Net's target sizes at our scales."""
        return scaled_shapes(spatial_shape, self.deep_supervision_scales)

    def _forward_padded(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs for an input padded to the total stride, highest resolution first."""
        raise NotImplementedError

    def _returns_all(self) -> bool:
        """Whether ``forward`` returns every output (deep supervision) or the full-resolution one."""
        return self.decoder.deep_supervision

    def forward(self, x: torch.Tensor) -> Output:
        self.check_input(x)
        size = tuple(x.shape[2:])
        stride = self.total_stride
        outputs = self._forward_padded(pad_to_multiple(x, [stride] * self.dim if isinstance(stride, int) else stride))
        outputs = [crop_to(o, shape, self.contiguous_outputs) for o, shape in zip(outputs, self.output_shapes(size))]
        return outputs if self._returns_all() else outputs[0]


__all__ = ["SegmentationNetwork", "check_positive_ints", "crop_to", "pad_to_multiple", "per_stage", "refuse_nan_input",
           "scaled_shapes"]
