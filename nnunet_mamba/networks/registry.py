"""Network registry, in the spirit of timm's: names map to constructors plus what a caller must know about them."""
from __future__ import annotations

import inspect
import math
import pydoc
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from torch import nn


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    builder: Callable[..., nn.Module]
    dims: Tuple[int, ...]
    summary: str
    needs_input_size: bool = False
    # built from the plans' U-Net layout (n_stages, features_per_stage, strides, ...); else a fixed architecture
    sized_by_plans: bool = False
    defaults: Dict[str, object] = field(default_factory=dict)

    @property
    def class_path(self) -> str:
        """What a plans file's ``architecture.network_class_name`` says for this network."""
        return f"{self.builder.__module__}.{self.builder.__qualname__}"


_REGISTRY: Dict[str, NetworkSpec] = {}


def register_network(name: str, dims: Tuple[int, ...], summary: str, needs_input_size: bool = False,
                     sized_by_plans: bool = False, **defaults) -> Callable:
    """Class/function decorator adding a network under ``name``; ``defaults`` are kwargs the caller may override."""
    def decorator(builder):
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} is already registered")
        _REGISTRY[name] = NetworkSpec(name, builder, tuple(dims), summary, needs_input_size, sized_by_plans,
                                      dict(defaults))
        return builder
    return decorator


def list_networks() -> List[str]:
    """Names of all registered networks, sorted."""
    return sorted(_REGISTRY)


def get_network_spec(name: str) -> NetworkSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown network {name!r}; registered: {', '.join(list_networks())}") from None


def create_network(name: str, **kwargs) -> nn.Module:
    """Build the registered network ``name``; kwargs are its constructor arguments (nnU-Net's arch kwargs)."""
    spec = get_network_spec(name)
    return spec.builder(**{**spec.defaults, **kwargs})


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


def plan_kwargs(name: str, arch_kwargs: dict, patch_size: Optional[Sequence[int]] = None,
                arch_class_name: Optional[str] = None) -> dict:
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
        owner = next((s.name for s in _REGISTRY.values() if s.class_path == arch_class_name), None)
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
        patch = [int(p) for p in patch_size]
        if kwargs.get("input_size") is not None and [int(i) for i in kwargs["input_size"]] != patch:
            raise ValueError(f"plans field architecture.arch_kwargs.input_size={list(kwargs['input_size'])} differs "
                             f"from patch_size={patch}: the network is built for the patch size, edit both")
        kwargs["input_size"] = tuple(patch)
    elif spec.needs_input_size and kwargs.get("input_size") is None:
        raise ValueError(f"network {name!r} is built for one patch size: pass patch_size")
    return kwargs


Scale = Union[float, Sequence[float]]


def strides_for_scales(scales: Sequence[Scale], total_stride: Sequence[int]) -> List[List[int]]:
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
                       strides: Optional[Sequence] = None) -> List[List[int]]:
    """A fixed network's strides for plans files (:func:`strides_for_scales`); raises unless ``strides``, what the
    plans it is built from say (if anything), equal them: nnU-Net derives the target scales from these."""
    expected = strides_for_scales(scales, total_stride)
    given = None if strides is None else [list(s) if isinstance(s, (list, tuple)) else [s] * len(total_stride)
                                           for s in strides]
    if given is not None and given != expected:
        raise ValueError(f"{network} has a fixed architecture: plans field architecture.arch_kwargs.strides must be "
                         f"{expected} (nnU-Net derives the deep-supervision target sizes from it), got {list(strides)}")
    return expected
