"""A training-memory estimate that needs no GPU: the peak of one nnU-Net training step, computed on the CPU.

The estimate is the peak of one nnU-Net training step as ``torch.cuda.max_memory_allocated`` reports it
(fp16 autocast, Dice+CE with deep supervision, SGD with momentum). The network's forward pass and the loss run
under ``FakeTensorMode`` (tensors with shapes and dtypes but no storage) with bfloat16 autocast on the CPU (2-byte
elements, as fp16 on CUDA), so it needs neither a GPU nor mamba-ssm, and the Mamba layers count with what they
really save. Every tensor autograd saves for the backward pass is summed, each storage once, and::

    estimate = saved + TRANSIENT_FACTOR x largest saved tensor + 2 x parameter bytes

Parameters and SGD's momentum stay resident; gradients are not added because nnU-Net zeroes them with
``set_to_none``, so they are allocated during the backward pass while the saved activations are being freed. The
transient term stands for the backward pass's temporaries (gradients of the largest activations, workspaces);
its factor is the one fitted constant, fitted to peaks measured on a GPU (the comparison is in the README,
"Planning", and docs/measurements.md).
"""
from __future__ import annotations

import itertools
import pydoc
from collections.abc import Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.multiprocessing.reductions import StorageWeakRef

from ..networks import create_network
from .baselines import BASELINES

TRANSIENT_FACTOR = 1.2  # fitted to measured peaks, see the module docstring


def build_network(name: str, arch_kwargs: dict, in_channels: int, num_classes: int) -> nn.Module:
    """A registered network, or a baseline of ``BASELINES``, from constructor kwargs, with deep supervision."""
    if name in BASELINES:
        return pydoc.locate(BASELINES[name])(input_channels=in_channels, num_classes=num_classes,
                                             deep_supervision=True, **arch_kwargs)
    return create_network(name, input_channels=in_channels, num_classes=num_classes, deep_supervision=True,
                          **arch_kwargs)


def training_loss(num_outputs: int) -> nn.Module:
    """nnU-Net's default loss: Dice + CE on each output, weighted 1, 1/2, 1/4, ... with the lowest one at 0."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    # plain floats, no tensors: the loss is also built under FakeTensorMode
    weights = [1 / 2 ** i for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(loss, [w / sum(weights) for w in weights])


def network_memory_gib(network: nn.Module, in_channels: int, patch_size: Sequence[int], batch_size: int) -> float:
    """Estimated peak GiB of one training step of ``network`` (in training mode); see the module docstring."""
    saved: dict[StorageWeakRef, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[StorageWeakRef(storage)] = storage.nbytes()
        return tensor

    # non-fake inputs allowed: constants a network keeps outside its parameters and buffers become fake on use
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        state = {name: mode.from_tensor(t) for name, t in itertools.chain(network.named_parameters(),
                                                                           network.named_buffers())}
        resident = {StorageWeakRef(t.untyped_storage()) for t in state.values()}
        image = torch.empty(batch_size, in_channels, *patch_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = functional_call(network, state, (image,))
            outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            targets = [torch.zeros(batch_size, 1, *o.shape[2:]) for o in outputs]
            # held until the sum below: the graph keeps every saved storage alive, so none is freed and its
            # address reused by a later one (which would merge their entries)
            loss = training_loss(len(outputs))(outputs, targets)
        activations = [n for ref, n in saved.items() if ref not in resident]
        total = sum(activations) + TRANSIENT_FACTOR * max(activations, default=0)
        del loss
    parameters = sum(p.numel() * p.element_size() for p in network.parameters())
    return (total + 2 * parameters) / 2 ** 30


def estimate_training_memory_gib(network_name: str, arch_kwargs: dict, patch_size: Sequence[int], batch_size: int,
                                 num_classes: int, in_channels: int) -> float:
    """Estimated peak GiB of one nnU-Net training step (fp16 autocast, SGD) on a GPU, computed on the CPU.

    ``arch_kwargs`` are the constructor kwargs of ``network_name`` (a registered network or a baseline),
    classes imported, ``input_size`` included where the network needs it (:func:`nnunet_mamba.plan_kwargs` makes
    them from a plans configuration).
    """
    network = build_network(network_name, arch_kwargs, in_channels, num_classes)
    return network_memory_gib(network, in_channels, patch_size, batch_size)
