"""Network registry, in the spirit of timm's: names map to constructors plus what a caller must know about them."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    builder: Callable[..., nn.Module]
    dims: Tuple[int, ...]
    summary: str
    needs_input_size: bool = False
    defaults: Dict[str, object] = field(default_factory=dict)


_REGISTRY: Dict[str, NetworkSpec] = {}


def register_network(name: str, dims: Tuple[int, ...], summary: str, needs_input_size: bool = False,
                     **defaults) -> Callable:
    """Class/function decorator adding a network under ``name``; ``defaults`` are kwargs the caller may override."""
    def decorator(builder):
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} is already registered")
        _REGISTRY[name] = NetworkSpec(name, builder, tuple(dims), summary, needs_input_size, dict(defaults))
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


def plan_kwargs(name: str, arch_kwargs: dict, patch_size: Optional[Sequence[int]] = None) -> dict:
    """Constructor kwargs for network ``name`` from a plans configuration's (import-resolved) ``arch_kwargs``.

    Aliases are mapped, keys the network does not take are dropped (a fixed architecture ignores the plans'
    U-Net layout) and the patch size is passed as ``input_size`` to networks that are built for one.
    """
    spec = get_network_spec(name)
    kwargs = dict(arch_kwargs)
    for old, new in _PLAN_KWARG_ALIASES.items():
        if old in kwargs:
            kwargs.setdefault(new, kwargs.pop(old))
    accepted = inspect.signature(spec.builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if spec.needs_input_size:
        if patch_size is None:
            raise ValueError(f"network {name!r} is built for one patch size: pass patch_size")
        kwargs["input_size"] = tuple(int(p) for p in patch_size)
    return kwargs
