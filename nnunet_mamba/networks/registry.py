"""Network registry, in the spirit of timm's: names map to constructors plus what a caller must know about them,
their pretrained weights included (the only registry: weights are found through the networks that take them)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import torch
from torch import nn

from .weights import PretrainedSpec, load_state_dict


@dataclass(frozen=True)
class PretrainedWeights:
    """Weights a network takes, and how: ``load(network, state_dict)`` copies a verified state dict into it."""

    spec: PretrainedSpec
    load: Callable[[nn.Module, Mapping[str, torch.Tensor]], object]


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    builder: Callable[..., nn.Module]
    dims: tuple[int, ...]
    summary: str
    needs_input_size: bool = False
    # built from the plans' U-Net layout (n_stages, features_per_stage, strides, ...); else a fixed architecture
    sized_by_plans: bool = False
    defaults: dict[str, object] = field(default_factory=dict)
    # weights name -> weights, the network's default first (register_pretrained fills it)
    pretrained: dict[str, PretrainedWeights] = field(default_factory=dict)

    @property
    def class_path(self) -> str:
        """What a plans file's ``architecture.network_class_name`` says for this network."""
        return f"{self.builder.__module__}.{self.builder.__qualname__}"


_REGISTRY: dict[str, NetworkSpec] = {}


def register_network(name: str, dims: tuple[int, ...], summary: str, needs_input_size: bool = False,
                     sized_by_plans: bool = False, **defaults) -> Callable:
    """Class/function decorator adding a network under ``name``; ``defaults`` are kwargs the caller may override."""
    def decorator(builder):
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} is already registered")
        _REGISTRY[name] = NetworkSpec(name, builder, tuple(dims), summary, needs_input_size, sized_by_plans,
                                      dict(defaults))
        return builder
    return decorator


def list_networks() -> list[str]:
    """Names of all registered networks, sorted."""
    return sorted(_REGISTRY)


def get_network_spec(name: str) -> NetworkSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown network {name!r}; registered: {', '.join(list_networks())}") from None


def register_pretrained(network: str, spec: PretrainedSpec,
                        load: Callable[[nn.Module, Mapping[str, torch.Tensor]], object]) -> None:
    """Attach the weights ``spec`` to the registered ``network``; the first attached are its default."""
    get_network_spec(network).pretrained[spec.name] = PretrainedWeights(spec, load)


def _all_weights() -> dict[str, PretrainedSpec]:
    return {name: weights.spec for spec in _REGISTRY.values() for name, weights in spec.pretrained.items()}


def list_pretrained() -> list[str]:
    """Names of the pretrained weights that registered networks take, sorted."""
    return sorted(_all_weights())


def get_pretrained_spec(name: str) -> PretrainedSpec:
    """The weights ``name`` (where to get them, what they hold)."""
    known = _all_weights()
    if name not in known:
        raise KeyError(f"unknown pretrained weights {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def create_network(name: str, pretrained: bool | str = False, weights_dir: str | Path | None = None,
                   **kwargs) -> nn.Module:
    """Build the registered network ``name``; kwargs are its constructor arguments (nnU-Net's arch kwargs).

    ``pretrained``: ``True`` for the network's default weights, or the name of weights it takes; they are read,
    verified, from the weights folder (``weights_dir``, else the default; ``nnunet-mamba download-weights NAME``
    puts them there).
    """
    spec = get_network_spec(name)
    network = spec.builder(**{**spec.defaults, **kwargs})
    if pretrained:
        if not spec.pretrained:
            raise ValueError(f"network {name!r} has no pretrained weights; known: {', '.join(list_pretrained())}")
        tag = next(iter(spec.pretrained)) if pretrained is True else pretrained
        if tag not in spec.pretrained:
            raise ValueError(f"network {name!r} takes the pretrained weights {', '.join(spec.pretrained)}, not "
                             f"{tag!r}")
        weights = spec.pretrained[tag]
        weights.load(network, load_state_dict(weights.spec, weights_dir))
    return network
