"""Segmentation networks: pure PyTorch, importable without nnU-Net."""
from .registry import NetworkSpec, create_network, get_network_spec, list_networks, register_network
from .plans import (configuration_kwargs, fixed_plan_strides, network_from_plans, plan_kwargs, resolve_plan_imports,
                    strides_for_scales)
from .flemme import FlemmeNet, flemme_table3
from .segresmamba import SegResMamba
from .swin_umamba import SwinUMamba, SwinUMambaD, load_vmamba_encoder
from .umamba import UMamba, UMambaBot, UMambaEnc
from .vim_unet import ViMUNet

__all__ = ["NetworkSpec", "create_network", "get_network_spec", "list_networks", "register_network",
           "configuration_kwargs", "fixed_plan_strides", "network_from_plans", "plan_kwargs", "resolve_plan_imports",
           "strides_for_scales",
           "FlemmeNet", "flemme_table3",
           "SegResMamba", "SwinUMamba", "SwinUMambaD", "load_vmamba_encoder", "UMamba", "UMambaBot", "UMambaEnc",
           "ViMUNet"]
