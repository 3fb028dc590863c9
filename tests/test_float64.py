"""Every registered network runs in float64 on CPU (numerical checks are done in float64), and a gradcheck of a
tiny U-Mamba: analytical gradients of the whole network, Mamba layer included, against finite differences."""
import pytest
import torch
from torch import nn

from nnunet_mamba.networks import create_network, get_network_spec, list_networks

# small networks: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _plan(dim: int, widths=(4, 6, 8, 8)) -> dict:
    """A tiny nnU-Net style U-Net layout (4 stages, total stride 8)."""
    return dict(n_stages=len(widths), features_per_stage=list(widths), conv_op=nn.Conv3d if dim == 3 else nn.Conv2d,
                kernel_sizes=[[3] * dim] * len(widths), strides=[[1] * dim] + [[2] * dim] * (len(widths) - 1))


def _umamba(dim: int, size: tuple) -> dict:
    plan = _plan(dim)
    return dict(plan, n_conv_per_stage=[1] * 4, n_conv_per_stage_decoder=[1] * 3, conv_bias=True,
                norm_op=nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d, norm_op_kwargs={"affine": True},
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, input_size=size)


def _tiny(name: str, dim: int, size: tuple) -> dict:
    """Constructor kwargs of a tiny ``name`` network for inputs of ``size``."""
    if name.startswith("flemme_"):
        return dict(_plan(dim), num_blocks=1, middle_depth=1)
    if name.startswith("umamba_"):
        kwargs = _umamba(dim, size)
        return kwargs if name == "umamba_enc" else {k: v for k, v in kwargs.items() if k != "input_size"}
    if name == "swin_umamba":
        return dict(depths=(1, 1, 1, 1), embed_dim=16, stem_channels=8)
    if name == "swin_umamba_d":
        return dict(depths=(1, 1, 1, 1), embed_dim=16)
    if name == "segresmamba":
        return dict(encoder_width=4, decoder_width=8, d_state=4)
    if name.startswith("vim_unet_"):
        return dict(embed_dim=16, depth=2, input_size=size)
    raise AssertionError(f"no tiny configuration for {name}: add one here")


# a bottleneck of at least 2 per axis, which instance norms need: total stride 8 (the tiny plans), 16 (ViM-UNet),
# 32 (Swin-UMamba, SegResMamba)
SIZES = {2: (64, 64), 3: (16, 16, 16)}
SEGRESMAMBA_SIZE = (64, 64, 64)
CASES = [(name, dim) for name in list_networks() for dim in get_network_spec(name).dims]


@pytest.mark.parametrize("name, dim", CASES)
def test_every_network_runs_in_float64(name, dim):
    torch.manual_seed(0)
    size = SEGRESMAMBA_SIZE if name == "segresmamba" else SIZES[dim]
    network = create_network(name, input_channels=1, num_classes=2, deep_supervision=False,
                             **_tiny(name, dim, size)).double().eval()
    with torch.no_grad():
        out = network(torch.randn(1, 1, *size, dtype=torch.float64))
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert out.dtype == torch.float64 and out.shape == (1, 2, *size) and out.isfinite().all()


def test_gradcheck_of_a_tiny_umamba():
    # U-Mamba Bot: conv encoder, Mamba layer at the bottleneck (2x2 tokens), conv decoder; every input element
    # checked
    torch.manual_seed(0)
    kwargs = {k: v for k, v in _umamba(2, (16, 16)).items() if k != "input_size"}
    kwargs.update(features_per_stage=[2, 2, 4, 4], nonlin=nn.LeakyReLU, nonlin_kwargs=None)
    network = create_network("umamba_bot", input_channels=1, num_classes=2, deep_supervision=False,
                             **kwargs).double().eval()
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(network, (x,), eps=1e-6, atol=1e-5)
