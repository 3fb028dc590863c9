"""Segmentation networks: pure PyTorch, importable without nnU-Net."""
from .registry import (NetworkSpec, PretrainedWeights, create_network, get_network_spec, get_pretrained_spec,
                       list_networks, list_pretrained, register_network, register_pretrained)
from .plans import (configuration_kwargs, fixed_plan_strides, network_from_plans, plan_kwargs, resolve_plan_imports,
                    strides_for_scales)
from .flemme import FlemmeNet, flemme_table3
from .segresmamba import SegResMamba
from .swin_umamba import SwinUMamba, SwinUMambaD
from .vmamba_weights import VMAMBA_TINY, load_vmamba_encoder
from .umamba import UMamba, UMambaBot, UMambaEnc
from .vim_unet import ViMUNet

__all__ = ["NetworkSpec", "PretrainedWeights", "create_network", "get_network_spec", "get_pretrained_spec",
           "list_networks", "list_pretrained", "register_network", "register_pretrained",
           "configuration_kwargs", "fixed_plan_strides", "network_from_plans", "plan_kwargs", "resolve_plan_imports",
           "strides_for_scales",
           "FlemmeNet", "flemme_table3",
           "SegResMamba", "SwinUMamba", "SwinUMambaD", "VMAMBA_TINY", "load_vmamba_encoder",
           "UMamba", "UMambaBot", "UMambaEnc", "ViMUNet"]
