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


# Initial values for torch.manual_seed(0) of tiny layers, computed with the layers' own initialisation code before
# it was shared in layers.ssm.init_mamba_ssm_ (commit 0e69cf1): the shared function must draw in the same order
# (ToM: conv1d, then x_proj, dt_proj weight, dt_proj bias; SS2D and Flemme's block: x_proj, dt_proj weight, the dt
# bias direction by direction), so that a seed still gives the same network. (first, second, last) entries.
_PINNED_INIT = {
    "ss2d": {
        "x_proj_weight": (-0.3176046, -0.1676116, 0.08146042),
        "dt_projs_weight": (0.1963809, -0.7424895, 0.3912426),
        "dt_projs_bias": (-2.837744, -2.2531, -6.660843),
        "out_proj.weight": (-0.2412758, -0.05712807, 0.2732633),
    },
    "tom": {
        "conv1d_weight": (0.2496575, 0.1046507, 0.3421124),
        "x_proj_weight": (-0.2765513, -0.1853084, 0.1383252),
        "dt_proj_weight": (0.7551676, 0.9996148, 0.225855),
        "dt_proj_bias": (-6.162028, -6.876242, -2.514579),
    },
    "flemme": {
        "x_proj_weight": (-0.3176046, -0.1676116, 0.01001017),
        "dt_projs_weight": (-0.8666099, 0.4953779, 0.2941227),
        "dt_projs_bias": (-3.834161, -2.849443, -5.454621),
        "norm2.weight": (1, 1, 1),
        "out_proj.weight": (-0.3504238, 0.1595919, 0.1041411),
    },
    "mamba": {
        "x_proj.weight": (-0.3367943, -0.006354817, -0.02556957),
        "dt_proj.weight": (-0.1926153, -0.1963427, 0.3766992),
        "dt_proj.bias": (-6.677002, -4.756282, -3.126792),
        "out_proj.weight": (-0.04079811, -0.1578286, 0.2982183),
    },
}


def _tiny_layer(kind: str) -> torch.nn.Module:
    from nnunet_mamba.layers.flemme import MambaBlock
    from nnunet_mamba.layers.tom import ToM
    from nnunet_mamba.layers.vss import SS2D
    return {"ss2d": lambda: SS2D(d_model=4, d_state=2), "tom": lambda: ToM(dim=4, d_state=2),
            "flemme": lambda: MambaBlock(4, 4, dim=2, scan="cross", d_state=2),
            "mamba": lambda: Mamba(d_model=4, d_state=2)}[kind]()


@pytest.mark.parametrize("kind", sorted(_PINNED_INIT))
def test_initial_weights_for_a_seed_are_pinned(kind):
    torch.manual_seed(0)
    state = _tiny_layer(kind).state_dict()
    for name, (first, second, last) in _PINNED_INIT[kind].items():
        values = state[name].flatten()
        got = torch.stack([values[0], values[1], values[-1]])
        expected = torch.tensor([first, second, last], dtype=got.dtype)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=name)


def test_init_mamba_ssm_draws_in_the_documented_order():
    from nnunet_mamba.layers.ssm import init_mamba_ssm_
    k, d_inner, rank, n = 3, 8, 2, 4
    for per_direction in (False, True):
        x_proj, dt_w = torch.empty(k, rank + 2 * n, d_inner), torch.empty(k, d_inner, rank)
        dt_b = torch.empty(k, d_inner)
        torch.manual_seed(5)
        init_mamba_ssm_(dt_w, dt_b, torch.empty(k, n), torch.empty(k), x_proj, dt_bias_per_direction=per_direction)
        torch.manual_seed(5)
        expect_x = torch.empty(k, rank + 2 * n, d_inner).uniform_(-d_inner ** -0.5, d_inner ** -0.5)
        expect_w = torch.empty(k, d_inner, rank).uniform_(-rank ** -0.5, rank ** -0.5)
        u = torch.stack([torch.rand(d_inner) for _ in range(k)]) if per_direction else torch.rand(k, d_inner)
        dt = torch.exp(u * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        assert torch.equal(x_proj, expect_x) and torch.equal(dt_w, expect_w)
        torch.testing.assert_close(dt_b, dt + torch.log(-torch.expm1(-dt)), rtol=0, atol=0)


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


@pytest.mark.parametrize("channel_token", [False, True])
def test_mamba_layer_residual_adds_the_input_and_no_parameters(channel_token):
    torch.manual_seed(0)
    plain = MambaLayer(dim=20 if channel_token else 4, channel_token=channel_token)
    residual = MambaLayer(dim=20 if channel_token else 4, channel_token=channel_token, residual=True)
    residual.load_state_dict(plain.state_dict())  # same keys and shapes: original checkpoints load
    x = torch.randn(2, 4, 4, 5)
    torch.testing.assert_close(residual(x), plain(x) + x)


def test_mamba_layer_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="built for 4 channels"):
        MambaLayer(dim=4)(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="channel-token"):
        MambaLayer(dim=25, channel_token=True)(torch.randn(1, 8, 4, 4))


def test_mamba_rejects_bad_input():
    with pytest.raises(ValueError, match="d_model=8"):
        Mamba(8)(torch.randn(2, 5, 7))
