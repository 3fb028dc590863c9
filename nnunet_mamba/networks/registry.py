"""Network registry, in the spirit of timm's: names map to constructors plus what a caller must know about them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

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
