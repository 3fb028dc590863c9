"""The plans adapter: constructor kwargs, and the network itself, from an nnU-Net plans configuration.

Pure torch (no nnU-Net import): a configuration is nnU-Net's ``ConfigurationManager`` or anything with its
attributes (``network_arch_init_kwargs``, ``network_arch_init_kwargs_req_import``, ``patch_size``,
``network_arch_class_name``). The patch size keeps its plans name, ``patch_size``, up to the constructors, which
call it ``input_size``. Also here: the strides that plans files must carry for networks of a fixed architecture.
"""
from __future__ import annotations

import inspect
import math
import pydoc
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from .base import Scale
from .registry import create_network, get_network_spec, list_networks


class PlansConfiguration(Protocol):
    """What the adapter reads of a plans configuration (nnU-Net's ``ConfigurationManager`` has it)."""

    network_arch_init_kwargs: dict
    network_arch_init_kwargs_req_import: Iterable[str]
    patch_size: Sequence[int]
    network_arch_class_name: str


def network_from_plans(name: str, configuration: PlansConfiguration, input_channels: int, num_classes: int,
                       deep_supervision: bool = True, overrides: Mapping[str, object] | None = None,
                       width_divisor: int = 1, caller: str | None = None) -> nn.Module:
    """The registered network ``name`` built for a plans configuration, checked against its patch size.

    ``overrides`` take precedence over the plans; ``width_divisor`` > 1 divides the plans' widths (at least 4
    channels; narrow smoke-test variants); ``caller`` (e.g. the trainer) is named in the errors.
    """
    spec = get_network_spec(name)
    patch_size = tuple(configuration.patch_size)
    if len(patch_size) not in spec.dims:
        supported = " and ".join(f"{d}D" for d in spec.dims)
        who = f"{caller} builds {spec.name}, which" if caller else spec.name
        raise ValueError(f"{who} supports {supported} configurations only; this configuration has a "
                         f"{len(patch_size)}D patch size {list(patch_size)}")
    kwargs = {**configuration_kwargs(name, configuration), **(overrides or {})}
    if width_divisor > 1 and "features_per_stage" in kwargs:
        kwargs["features_per_stage"] = [max(4, f // width_divisor) for f in kwargs["features_per_stage"]]
    network = create_network(name, input_channels=input_channels, num_classes=num_classes,
                             deep_supervision=deep_supervision, **kwargs)
    check = getattr(network, "check_input", None)
    if check is not None:
        # The network's own shape check on the plans' patch (an empty meta tensor): a patch it cannot train on
        # then stops nnUNetv2_train here, before nnU-Net starts its data-loader workers, whose EOFError would
        # otherwise be the last line printed.
        check(torch.empty((1, input_channels, *patch_size), device="meta"))
    return network


def configuration_kwargs(name: str, configuration: PlansConfiguration) -> dict:
    """Constructor kwargs for ``name`` from a plans configuration (classes imported, patch size added)."""
    kwargs = resolve_plan_imports(configuration.network_arch_init_kwargs,
                                  configuration.network_arch_init_kwargs_req_import)
    return plan_kwargs(name, kwargs, configuration.patch_size, configuration.network_arch_class_name)


# nnU-Net's ResEnc presets call the per-stage block count n_blocks_per_stage; our networks use n_conv_per_stage.
_PLAN_KWARG_ALIASES = {"n_blocks_per_stage": "n_conv_per_stage"}


def resolve_plan_imports(arch_kwargs: dict, requires_import: Iterable[str]) -> dict:
    """A plans configuration's ``arch_kwargs`` with the classes named in ``_kw_requires_import`` imported."""
    kwargs = dict(arch_kwargs)
    for key in requires_import:
        if isinstance(kwargs.get(key), str):
            located = pydoc.locate(kwargs[key])
            if located is None:
                raise ValueError(f"plans field architecture.arch_kwargs.{key}={kwargs[key]!r} cannot be imported")
            kwargs[key] = located
    return kwargs


def plan_kwargs(name: str, arch_kwargs: dict, patch_size: Sequence[int] | None = None,
                arch_class_name: str | None = None) -> dict:
    """Constructor kwargs for network ``name`` from a plans configuration's ``arch_kwargs``.

    ``arch_class_name`` is the configuration's ``architecture.network_class_name``. Plans written for this
    network (``nnunet-mamba plan``) are taken as they are, so a key the network does not take fails as it does
    in nnU-Net's own trainer. Other plans describe nnU-Net's U-Net: networks sized by the plans take that layout
    (aliases mapped, keys they do not take dropped), fixed architectures ignore it. The patch size is passed as
    ``input_size`` to networks that take one (so they can check it when built); an ``input_size`` already in the
    plans must equal it.
    """
    spec = get_network_spec(name)
    if arch_class_name == spec.class_path:
        kwargs = dict(arch_kwargs)
    else:
        owner = next((n for n in list_networks() if get_network_spec(n).class_path == arch_class_name), None)
        if owner is not None:
            raise ValueError(f"these plans were written for {owner} (architecture.network_class_name="
                             f"{arch_class_name}), not {name}: plan for it with `nnunet-mamba plan --arch {name}`")
        kwargs = dict(arch_kwargs) if spec.sized_by_plans else {}
        for old, new in _PLAN_KWARG_ALIASES.items():
            if old in kwargs:
                kwargs.setdefault(new, kwargs.pop(old))
        accepted = inspect.signature(spec.builder).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    takes_input_size = "input_size" in inspect.signature(spec.builder).parameters
    if patch_size is not None and takes_input_size:
        patch_size = tuple(int(n) for n in patch_size)
        if kwargs.get("input_size") is not None and tuple(int(n) for n in kwargs["input_size"]) != patch_size:
            raise ValueError(f"plans field architecture.arch_kwargs.input_size={list(kwargs['input_size'])} differs "
                             f"from patch_size={list(patch_size)}: the network is built for the patch size, edit both")
        kwargs["input_size"] = patch_size  # the constructors' name for the patch size
    elif spec.needs_input_size and kwargs.get("input_size") is None:
        raise ValueError(f"network {name!r} is built for one patch size: pass patch_size")
    return kwargs



def strides_for_scales(scales: Sequence[Scale], total_stride: Sequence[int]) -> list[list[int]]:
    """Per-stage strides that make nnU-Net reproduce a fixed network's deep-supervision scales.

    nnU-Net's trainer takes the scales as 1 / cumulative product of all strides but the last
    (``_get_deep_supervision_scales``); the last stride makes the product the network's total stride, the
    multiple that patches are padded to inside the network.
    """
    dim = len(total_stride)
    per_axis = [list(s) if isinstance(s, (list, tuple)) else [s] * dim for s in scales]
    strides = [[round(1 / s) for s in per_axis[0]]]
    strides += [[round(a / b) for a, b in zip(above, below)] for above, below in zip(per_axis, per_axis[1:])]
    reached = [math.prod(axis) for axis in zip(*strides)]
    return strides + [[t // r for t, r in zip(total_stride, reached)]]


def fixed_plan_strides(network: str, scales: Sequence[Scale], total_stride: Sequence[int],
                       strides: Sequence | None = None) -> list[list[int]]:
    """A fixed network's strides for plans files (:func:`strides_for_scales`); raises unless ``strides``, what the
    plans it is built from say (if anything), equal them: nnU-Net derives the target scales from these."""
    expected = strides_for_scales(scales, total_stride)
    given = None if strides is None else [list(s) if isinstance(s, (list, tuple)) else [s] * len(total_stride)
                                           for s in strides]
    if given is not None and given != expected:
        raise ValueError(f"{network} has a fixed architecture: plans field architecture.arch_kwargs.strides must be "
                         f"{expected} (nnU-Net derives the deep-supervision target sizes from it), got {list(strides)}")
    return expected
