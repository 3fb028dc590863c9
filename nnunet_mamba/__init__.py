"""nnunet-mamba: Mamba-based segmentation networks for nnU-Net v2."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["create_network", "get_network_spec", "list_networks", "__version__"]


def __getattr__(name: str) -> Any:
    # The networks import torch and timm (seconds); importing them on first use keeps `nnunet-mamba --help` and
    # `nnunet-mamba env --exports` (run by every new shell that has it in its profile) fast.
    if name in __all__:
        from . import networks

        return getattr(networks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
