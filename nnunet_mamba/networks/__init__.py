"""Segmentation networks: pure PyTorch, importable without nnU-Net."""
from .registry import NetworkSpec, create_network, get_network_spec, list_networks, register_network
from .umamba import UMamba, UMambaBot, UMambaEnc

__all__ = ["NetworkSpec", "create_network", "get_network_spec", "list_networks", "register_network",
           "UMamba", "UMambaBot", "UMambaEnc"]
