import copy

import pytest
import torch
from torch import nn

from helpers import assert_manifest_output_shapes, load_manifest, manifest_kwargs
import nnunet_mamba
from nnunet_mamba.checkpoints import CheckpointError, convert_umamba_state_dict
from nnunet_mamba.layers import MambaLayer

MANIFESTS = {
    "umamba_bot_2d_plan320": "umamba_bot",
    "umamba_enc_2d_plan320": "umamba_enc",
    "umamba_bot_3d_plan128": "umamba_bot",
    "umamba_enc_3d_plan128": "umamba_enc",
}


@pytest.mark.parametrize("manifest_name", list(MANIFESTS))
def test_parameter_count_and_state_dict_match_reference(manifest_name):
    manifest = load_manifest(manifest_name)
    network = nnunet_mamba.create_network(MANIFESTS[manifest_name], **manifest_kwargs(manifest))
    assert sum(p.numel() for p in network.parameters()) == manifest["num_params"]
    reference = [(k, tuple(s)) for k, s in manifest["state_dict"] if not k.startswith("decoder.encoder.")]
    assert [(k, tuple(v.shape)) for k, v in network.state_dict().items()] == reference


@pytest.mark.parametrize("manifest_name", ["umamba_bot_2d_plan320", "umamba_enc_3d_plan128"])
def test_reference_state_dict_loads_through_conversion(manifest_name):
    manifest = load_manifest(manifest_name)
    network = nnunet_mamba.create_network(MANIFESTS[manifest_name], **manifest_kwargs(manifest))
    original = {}
    for key, shape in manifest["state_dict"]:  # the original stores the encoder twice (decoder.encoder.*)
        twin = key[len("decoder."):] if key.startswith("decoder.encoder.") else None
        original[key] = original[twin] if twin in original else torch.randn(shape)
    converted = convert_umamba_state_dict(original)
    network.load_state_dict(converted, strict=True)
    key = "encoder.stages.1.0.conv1.weight"
    assert torch.equal(network.state_dict()[key], original[key])
    broken = dict(original)
    broken["decoder.encoder.stages.1.0.conv1.weight"] = torch.zeros_like(original[key])
    with pytest.raises(CheckpointError, match="differ from their encoder"):
        convert_umamba_state_dict(broken)


@pytest.mark.parametrize("manifest_name", ["umamba_bot_2d_plan320", "umamba_enc_2d_plan320"])
def test_forward_shapes_match_reference(manifest_name):
    manifest = load_manifest(manifest_name)
    network = nnunet_mamba.create_network(MANIFESTS[manifest_name], **manifest_kwargs(manifest)).eval()
    assert_manifest_output_shapes(network, manifest)


def small_plan(dim, **extra):
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    return dict(input_channels=2, n_stages=4, features_per_stage=[8, 16, 32, 32], conv_op=conv,
                kernel_sizes=[[3] * dim] * 4, strides=[[1] * dim] + [[2] * dim] * 3, n_conv_per_stage=[2, 2, 2, 2],
                num_classes=3, n_conv_per_stage_decoder=[2, 2, 2], conv_bias=True,
                norm_op=nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                deep_supervision=True, **extra)


@pytest.mark.parametrize("name,dim,size", [("umamba_bot", 3, (16, 24, 8)), ("umamba_enc", 3, (16, 24, 8)),
                                           ("umamba_bot", 2, (40, 24)), ("umamba_enc", 2, (40, 24))])
def test_small_plans_train_one_step(name, dim, size):
    extra = {"input_size": size} if name == "umamba_enc" else {}
    network = nnunet_mamba.create_network(name, **small_plan(dim, **extra))
    out = network(torch.randn(2, 2, *size))
    assert [tuple(o.shape[2:]) for o in out] == [size, tuple(s // 2 for s in size), tuple(s // 4 for s in size)]
    sum(o.mean() for o in out).backward()
    assert all(p.grad is not None for n, p in network.named_parameters() if "mamba" in n)


def test_enc_switches_to_channel_tokens_on_small_maps():
    network = nnunet_mamba.create_network("umamba_enc", **small_plan(2, input_size=(16, 16)))
    layers = network.encoder.mamba_layers
    # 2D: every other stage counted back from the bottleneck -> stages 1 and 3; stage 3 map is 2x2 = 4 <= 32
    assert [type(m).__name__ for m in layers] == ["Identity", "MambaLayer", "Identity", "MambaLayer"]
    assert not layers[1].channel_token and layers[3].channel_token and layers[3].dim == 4


@pytest.mark.parametrize("name", ["umamba_bot", "umamba_enc"])
def test_mamba_residual_is_a_plans_switch_with_the_original_keys(name):
    plan = small_plan(3, input_size=(16, 16, 16))
    original = nnunet_mamba.create_network(name, **plan)
    residual = nnunet_mamba.create_network(name, **plan, mamba_residual=True)
    residual.load_state_dict(original.state_dict())
    layers = [m for m in residual.modules() if isinstance(m, MambaLayer)]
    assert layers and all(m.residual for m in layers)
    assert not any(m.residual for m in original.modules() if isinstance(m, MambaLayer))


def test_channel_tokens_off_keeps_voxel_tokens_and_any_input_size():
    network = nnunet_mamba.create_network("umamba_enc", **small_plan(2, input_size=(16, 16)), channel_tokens=False)
    layers = [m for m in network.encoder.mamba_layers if isinstance(m, MambaLayer)]
    assert len(layers) == 2 and not any(m.channel_token for m in layers) and layers[1].dim == 32
    assert [tuple(o.shape[2:]) for o in network(torch.randn(1, 2, 24, 32))][0] == (24, 32)  # not fixed to 16x16


def test_caller_lists_are_not_modified():
    plan = small_plan(2)
    before = copy.deepcopy(plan)
    nnunet_mamba.create_network("umamba_bot", **plan)
    assert plan == before


def test_clear_errors():
    with pytest.raises(ValueError, match="needs input_size"):
        nnunet_mamba.create_network("umamba_enc", **small_plan(2))
    with pytest.raises(ValueError, match="conv_op must be"):
        nnunet_mamba.create_network("umamba_bot", **{**small_plan(2), "conv_op": nn.Conv1d})
    with pytest.raises(ValueError, match="kernel_sizes must have 3 entries"):
        nnunet_mamba.create_network("umamba_bot", **{**small_plan(3), "kernel_sizes": [[3, 3]] * 4})
    with pytest.raises(ValueError, match="features_per_stage must have 4 entries"):
        nnunet_mamba.create_network("umamba_bot", **{**small_plan(2), "features_per_stage": [8, 16]})
    network = nnunet_mamba.create_network("umamba_bot", **small_plan(2))
    with pytest.raises(ValueError, match=r"\(2D\) expects input"):
        network(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="divisible by the total stride"):
        network(torch.randn(1, 2, 20, 16))
    with pytest.raises(ValueError, match="single voxel at the bottleneck"):
        network(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="expected 2 input channels"):
        network(torch.randn(1, 3, 16, 16))
    enc = nnunet_mamba.create_network("umamba_enc", **small_plan(2, input_size=(16, 16)))
    with pytest.raises(ValueError, match=r"built for input_size=\(16, 16\)"):
        enc(torch.randn(1, 2, 32, 32))
    with pytest.raises(KeyError, match="unknown network 'umamba'"):
        nnunet_mamba.create_network("umamba")
