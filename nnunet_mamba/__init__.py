"""nnunet-mamba: Mamba-based segmentation networks for nnU-Net v2."""
from .networks import create_network, get_network_spec, list_networks

__version__ = "0.1.0"

__all__ = ["create_network", "get_network_spec", "list_networks", "__version__"]
