"""Every registered network runs in float64 on CPU (numerical checks are done in float64), and a gradcheck of a
tiny U-Mamba: analytical gradients of the whole network, Mamba layer included, against finite differences."""
import pytest
import torch
from helpers import tiny_network_kwargs
from torch import nn

from nnunet_mamba.networks import create_network, get_network_spec, list_networks

# small networks: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


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
                             **tiny_network_kwargs(name, dim, size)).double().eval()
    with torch.no_grad():
        out = network(torch.randn(1, 1, *size, dtype=torch.float64))
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert out.dtype == torch.float64 and out.shape == (1, 2, *size) and out.isfinite().all()


def test_gradcheck_of_a_tiny_umamba():
    # U-Mamba Bot: conv encoder, Mamba layer at the bottleneck (2x2 tokens), conv decoder; every input element
    # checked
    torch.manual_seed(0)
    kwargs = tiny_network_kwargs("umamba_bot", 2, (16, 16))
    kwargs.update(features_per_stage=[2, 2, 4, 4], nonlin=nn.LeakyReLU, nonlin_kwargs=None)
    network = create_network("umamba_bot", input_channels=1, num_classes=2, deep_supervision=False,
                             **kwargs).double().eval()
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(network, (x,), eps=1e-6, atol=1e-5)
