import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_mamba.layers.bimamba import BiMamba
from nnunet_mamba.layers.mamba import Mamba
from nnunet_mamba.networks.registry import create_network, get_network_spec
from nnunet_mamba.networks.vim_unet import VIM_CONFIGURATIONS, ViMUNet, apply_rope, rope_angles

# small networks: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(embed_dim=32, depth=2)  # shape tests: a 2-block, 32-dim encoder with the real decoder


def single_direction(bi: BiMamba, reverse: bool) -> Mamba:
    """A plain Mamba holding one branch of ``bi`` (the shared in_proj/out_proj plus that branch's parameters)."""
    suffix = "_b" if reverse else ""
    mamba = Mamba(bi.d_model, d_state=bi.d_state, d_conv=bi.d_conv, expand=bi.expand).double()
    state = {"in_proj.weight": bi.in_proj.weight, "out_proj.weight": bi.out_proj.weight,
             "A_log": getattr(bi, f"A{suffix}_log"), "D": getattr(bi, f"D{suffix}")}
    for name in ("conv1d", "x_proj", "dt_proj"):
        for key, value in getattr(bi, name + suffix).state_dict().items():
            state[f"{name}.{key}"] = value
    mamba.load_state_dict(state, strict=True)
    return mamba


@pytest.mark.parametrize("divide_out", [True, False])
def test_bimamba_is_a_forward_scan_plus_a_scan_of_the_reversed_sequence(divide_out):
    torch.manual_seed(0)
    bi = BiMamba(8, d_state=4, divide_out=divide_out).double()
    with torch.no_grad():  # make the two branches differ, so a mix-up of their parameters would show
        for name in ("A_b_log", "D_b"):
            getattr(bi, name).mul_(1.5)
        bi.conv1d_b.weight.normal_()
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    forward = single_direction(bi, reverse=False)(x)
    backward = single_direction(bi, reverse=True)(x.flip(1)).flip(1)
    expected = (forward + backward) / (2 if divide_out else 1)  # out_proj has no bias, so it is linear
    torch.testing.assert_close(bi(x), expected)


def test_bimamba_parameter_names_are_vims():
    names = {k for k, _ in BiMamba(16).named_parameters()}
    assert {"A_b_log", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias",
            "D_b", "in_proj.weight", "out_proj.weight"} <= names


@pytest.mark.parametrize("size,channels", [((50, 70), 1), ((80, 96), 3)])
def test_shapes_for_any_patch_size_and_channel_count(size, channels):
    network = ViMUNet(channels, 4, deep_supervision=True, input_size=size, **SMALL).eval()
    with torch.no_grad():
        out = network(torch.randn(1, channels, *size))
    # nnU-Net sizes deep-supervision targets round(size * scale) (DownsampleSegForDSTransform)
    expected = [tuple(round(s * f) for s, f in zip(size, scale)) for scale in ViMUNet.deep_supervision_scales]
    assert [tuple(o.shape) for o in out] == [(1, 4) + e for e in expected]


def test_training_step_reaches_both_scan_directions():
    torch.manual_seed(0)
    network = ViMUNet(2, 3, deep_supervision=True, input_size=(20, 28), **SMALL)
    out = network(torch.randn(2, 2, 20, 28))
    assert [tuple(o.shape[2:]) for o in out] == [(20, 28), (10, 14), (5, 7), (2, 4)]  # 2.5 rounds to 2, as nnU-Net
    sum(o.float().mean() for o in out).backward()
    grads = {n: p.grad for n, p in network.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "mixer" in n)


def test_deep_supervision_toggle():
    torch.manual_seed(0)
    network = ViMUNet(1, 3, deep_supervision=True, input_size=(32, 48), **SMALL).eval()
    x = torch.randn(1, 1, 32, 48)
    with torch.no_grad():
        many = network(x)
        network.decoder.deep_supervision = False
        single = network(x)
    assert isinstance(many, list) and len(many) == 4
    assert torch.is_tensor(single) and single.shape == (1, 3, 32, 48)
    torch.testing.assert_close(single, many[0])
    # the heads exist either way, so checkpoints load whatever the deep-supervision setting
    assert ViMUNet(1, 3, deep_supervision=False, input_size=(32, 48), **SMALL).state_dict().keys() == \
        network.state_dict().keys()


def test_three_dimensional_configurations_raise():
    with pytest.raises(ValueError, match="2D only"):
        ViMUNet(1, 2, input_size=(32, 64, 64), **SMALL)
    with pytest.raises(ValueError, match="2D only"):
        ViMUNet(1, 2, input_size=(64, 64), conv_op=nn.Conv3d, **SMALL)
    network = ViMUNet(1, 2, input_size=(64, 64), conv_op=nn.Conv2d, **SMALL)
    with pytest.raises(ValueError, match="2D only"):
        network(torch.randn(1, 1, 8, 64, 64))
    with pytest.raises(ValueError, match="input channels"):
        network(torch.randn(1, 2, 64, 64))
    with pytest.raises(ValueError, match="input_size"):
        ViMUNet(1, 2, **SMALL)


@pytest.mark.parametrize("configuration, cls_index", [("paper", 0), ("later", 3), ("later_no_cls", None)])
def test_position_embedding_is_interpolated_for_other_input_sizes(configuration, cls_index):
    torch.manual_seed(0)
    network = ViMUNet(1, 2, input_size=(40, 32), configuration=configuration, **SMALL).eval()  # a 3x2 token grid
    encoder = network.encoder
    assert encoder.position_embedding((3, 2)) is encoder.pos_embed
    table = encoder.pos_embed
    if cls_index is not None:  # the class token's entry sits where the token does: 0, or 6 // 2 = 3
        cls_entry = table[:, cls_index:cls_index + 1]
        table = torch.cat([table[:, :cls_index], table[:, cls_index + 1:]], 1)
    table = table.reshape(1, 3, 2, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(table, size=(2, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    if cls_index is not None:  # 8 patches: the middle token goes to 4
        at = 0 if configuration == "paper" else 4
        expected = torch.cat([expected[:, :at], cls_entry, expected[:, at:]], 1)
    torch.testing.assert_close(encoder.position_embedding((2, 4)), expected)
    with torch.no_grad():
        assert network(torch.randn(1, 1, 30, 60)).shape == (1, 2, 30, 60)  # a 2x4 grid instead of 3x2


def test_rope_angles_are_vims_formula():
    # hustvl/Vim vim/rope.py VisionRotaryEmbeddingFast(dim=embed_dim // 2, pt_seq_len=14, ft_seq_len=grid):
    # freqs_k = 10000^(-2k / half), k < half / 2, each used by a channel pair; the first half of the channels
    # rotates by the row position i / gh * 14, the second by the column position j / gw * 14
    grid, dim = (3, 5), 16
    half = dim // 2
    angles = rope_angles(grid, dim, dtype=torch.float64)
    assert angles.shape == (15, dim)
    for i in range(3):
        for j in range(5):
            for c in range(dim):
                position = i / 3 * 14 if c < half else j / 5 * 14
                k = (c % half) // 2
                assert angles[i * 5 + j, c].item() == pytest.approx(position * 10000 ** (-2 * k / half), rel=1e-12)


def test_apply_rope_rotates_channel_pairs():
    theta = torch.tensor([[0.3, 0.3, -1.1, -1.1]], dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0, -0.5, 4.0]], dtype=torch.float64)
    expected = [1 * math.cos(0.3) - 2 * math.sin(0.3), 2 * math.cos(0.3) + 1 * math.sin(0.3),
                -0.5 * math.cos(-1.1) - 4 * math.sin(-1.1), 4 * math.cos(-1.1) - 0.5 * math.sin(-1.1)]
    torch.testing.assert_close(apply_rope(x, theta), torch.tensor([expected], dtype=torch.float64))


def vim_forward_reference(encoder, image):
    """torch-em's ViM.forward_features + forward (paper time, commit 33239758, and later), written as Vim computes
    it: Add -> Norm -> Mixer blocks carrying (hidden_states, residual), RoPE applied to both before every block
    (token 0 left unrotated), the class token inserted before the position embedding is added, the first token
    removed at the end. Uses the encoder's own parameters."""
    x = encoder.patch_embed(image)
    grid = tuple(x.shape[2:])
    x = x.flatten(2).transpose(1, 2)
    m = x.shape[1]
    if encoder.cls_position is not None:
        at = 0 if encoder.cls_position == "first" else m // 2
        x = torch.cat([x[:, :at], encoder.cls_token.expand(x.shape[0], -1, -1), x[:, at:]], 1)
    x = x + encoder.pos_embed
    angles = torch.cat([torch.zeros(1, encoder.embed_dim, dtype=x.dtype), rope_angles(grid, encoder.embed_dim,
                                                                                        dtype=x.dtype)])
    hidden, residual = x, None
    for layer in encoder.layers:
        if encoder.rope:
            hidden = apply_rope(hidden, angles)
            residual = None if residual is None else apply_rope(residual, angles)
        residual = hidden if residual is None else hidden + residual
        hidden = layer.mixer(layer.norm(residual))
    out = encoder.norm_f(hidden + residual)
    if encoder.cls_position is not None:
        out = out[:, 1:]
    return out.transpose(1, 2).reshape(x.shape[0], -1, *grid)


@pytest.mark.parametrize("configuration", sorted(VIM_CONFIGURATIONS))
def test_encoder_equals_torch_ems_forward(configuration):
    torch.manual_seed(0)
    encoder = ViMUNet(1, 2, input_size=(48, 64), configuration=configuration, **SMALL).encoder.double().eval()
    assert encoder.rope == (configuration == "paper")
    assert all(layer.mixer.divide_out == (configuration != "paper") for layer in encoder.layers)
    image = torch.randn(2, 1, 48, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(image), vim_forward_reference(encoder, image))


def test_paper_class_token_shapes_every_patch_token():
    torch.manual_seed(0)
    encoder = ViMUNet(1, 2, input_size=(48, 64), **SMALL).encoder.double().eval()
    image = torch.randn(1, 1, 48, 64, dtype=torch.float64)
    with torch.no_grad():
        before = encoder(image)
        encoder.cls_token.add_(1.0)
        after = encoder(image)
    assert ((before - after).abs().flatten(2).amin(-1) > 0).all()  # every token of every channel moved
    assert not hasattr(ViMUNet(1, 2, input_size=(48, 64), configuration="later_no_cls", **SMALL).encoder,
                       "cls_token")


def test_registry_and_glue_kwargs():
    for name, dim in (("vim_unet_tiny", 192), ("vim_unet_small", 384)):
        spec = get_network_spec(name)
        assert spec.dims == (2,) and spec.needs_input_size and spec.defaults["embed_dim"] == dim
    network = create_network("vim_unet_tiny", input_channels=1, num_classes=2, deep_supervision=True,
                             input_size=(64, 64), depth=1, conv_op=nn.Conv2d)
    assert network.encoder.embed_dim == 192 and len(network.encoder.layers) == 1


# The paper-time torch-em models (3 input channels, 2 output channels, img_size 1024) have 18,499,690 (Tiny) and
# 39,175,018 (Small) parameters; ours lack the ImageNet head and add three deep-supervision heads; the class token
# and its position-embedding entry are there (see the vim_unet module docstring). RoPE has no parameters.
@pytest.mark.parametrize("name,embed_dim,paper,ours", [("vim_unet_tiny", 192, 18_499_690, 18_307_592),
                                                       ("vim_unet_small", 384, 39_175_018, 38_790_920)])
def test_parameter_count_parity(name, embed_dim, paper, ours):
    network = create_network(name, input_channels=3, num_classes=2, input_size=(1024, 1024))
    assert sum(p.numel() for p in network.parameters()) == ours
    head = embed_dim * 1000 + 1000
    ds_heads = sum(c * 2 + 2 for c in (256, 128, 64))
    assert ours == paper - head + ds_heads
    # torch-em's with_cls_token=False: no class token, no position-embedding entry for it (one block suffices)
    counts = {c: sum(p.numel() for p in create_network(name, input_channels=3, num_classes=2, depth=1,
                                                       input_size=(1024, 1024), configuration=c).parameters())
              for c in ("paper", "later_no_cls")}
    assert counts["paper"] - counts["later_no_cls"] == 2 * embed_dim
