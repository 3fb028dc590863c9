import math

import pytest
import torch
import torch.nn.functional as F

from helpers import load_manifest
from nnunet_mamba.layers import Mamba, MambaLayer
from nnunet_mamba.ops import selective_scan_reference


def test_parameter_names_and_shapes_match_mamba_ssm():
    # mamba_layer.mamba.* in the U-Mamba Bot manifest is a mamba_ssm Mamba(d_model=512)
    manifest = load_manifest("umamba_bot_2d_plan320")["state_dict"]
    reference = [(k[len("mamba_layer.mamba."):], tuple(s)) for k, s in manifest if k.startswith("mamba_layer.mamba.")]
    ours = [(k, tuple(v.shape)) for k, v in Mamba(512).state_dict().items()]
    assert ours == reference


def test_initialisation_follows_mamba_ssm():
    layer = Mamba(64, d_state=16, dt_min=0.001, dt_max=0.1)
    torch.testing.assert_close(layer.A_log.exp(), torch.arange(1, 17.0).repeat(128, 1))
    assert torch.equal(layer.D, torch.ones(128))
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    bound = layer.dt_rank ** -0.5
    assert layer.dt_proj.weight.abs().max() <= bound
    assert layer.A_log._no_weight_decay and layer.D._no_weight_decay
    assert layer.dt_rank == math.ceil(64 / 16)


def test_forward_equals_the_definition():
    torch.manual_seed(0)
    layer = Mamba(8, d_state=4).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    xz = layer.in_proj(x).transpose(1, 2)
    u, z = xz.chunk(2, dim=1)
    u = F.silu(layer.conv1d(u)[..., :11])
    dt, B, C = torch.split(layer.x_proj(u.transpose(1, 2)), [layer.dt_rank, 4, 4], dim=-1)
    y = selective_scan_reference(u, (dt @ layer.dt_proj.weight.T).transpose(1, 2), -layer.A_log.exp(),
                                 B.transpose(1, 2), C.transpose(1, 2), layer.D, z, layer.dt_proj.bias, True)
    expected = layer.out_proj(y.transpose(1, 2))
    torch.testing.assert_close(layer(x), expected)


def test_mamba_layer_is_causal_along_tokens():
    torch.manual_seed(0)
    layer = MambaLayer(dim=4, channel_token=False)
    x = torch.randn(1, 4, 5, 6)
    y = layer(x)
    x2 = x.clone()
    x2[..., -1, -1] += 1.0  # change the last token only
    y2 = layer(x2)
    assert torch.equal(y.flatten(2)[..., :-1], y2.flatten(2)[..., :-1])
    assert not torch.equal(y.flatten(2)[..., -1], y2.flatten(2)[..., -1])


def test_mamba_layer_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="built for 4 channels"):
        MambaLayer(dim=4)(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="channel-token"):
        MambaLayer(dim=25, channel_token=True)(torch.randn(1, 8, 4, 4))


def test_mamba_rejects_bad_input():
    with pytest.raises(ValueError, match="d_model=8"):
        Mamba(8)(torch.randn(2, 5, 7))
