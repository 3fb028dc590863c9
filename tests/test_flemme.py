"""Flemme networks: blocks in 2D/3D, Swin windows and Mamba cross scans against dense references, the paper's
Table III parameter counts, H-SeM outputs against nnU-Net's deep-supervision targets, registry and plans."""
import math

import pytest
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from torch._subclasses.fake_tensor import is_fake

from helpers import load_manifest
from nnunet_mamba.layers.flemme import (CombinationLayer, FlemmeConvBlock, MambaBlock, PatchEmbedding, PatchExpanding,
                                        PatchMerging, PatchRecovery, FlemmeResConvBlock, ResMambaBlock, ResSwinBlock,
                                        SwinBlock, flemme_directions, strided_conv)
from nnunet_mamba.networks import create_network, get_network_spec, list_networks, plan_kwargs
from nnunet_mamba.networks.flemme import BUILDING_BLOCKS, ENCODERS, TABLE3_PARAMETERS, FlemmeNet, flemme_table3
from nnunet_mamba.networks.flemme_layout import FlemmeLayout
from nnunet_mamba.ops import scan_orders

# small networks: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

CONV = {2: torch.nn.Conv2d, 3: torch.nn.Conv3d}
SIZES = {2: (9, 14), 3: (5, 6, 7)}  # odd, distinct: a mixed-up axis shows
# padded to 16 per axis inside the tiny networks (total stride 8): a bottleneck of 2 per axis, so that every
# parameter matters (a single bottleneck token would make attention biases irrelevant)
NETWORK_SIZES = {2: (9, 14), 3: (9, 10, 11)}


def tiny(name: str, dim: int, deep_supervision: bool = True, **kwargs) -> FlemmeNet:
    """Three levels below the patch embedding (total stride 8), widths 4..12, one block per stage."""
    torch.manual_seed(0)
    options = {"n_stages": 4, "features_per_stage": [4, 6, 8, 12], "conv_op": CONV[dim],
               "strides": [[1] * dim] + [[2] * dim] * 3, "num_blocks": 1, "middle_depth": 1, **kwargs}
    return create_network(name, input_channels=2, num_classes=3, deep_supervision=deep_supervision, **options).eval()


def parameter_count(module: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))


# ---- blocks ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [2, 3])
def test_convolution_blocks_keep_the_map_and_change_the_width(dim):
    x = torch.randn(2, 3, *SIZES[dim])
    norm = {"norm_op": torch.nn.InstanceNorm2d if dim == 2 else torch.nn.InstanceNorm3d,
            "norm_op_kwargs": {"affine": True}, "nonlin": torch.nn.LeakyReLU, "nonlin_kwargs": None}
    for block in (FlemmeConvBlock(CONV[dim], 3, 5, 3, **norm), FlemmeResConvBlock(CONV[dim], 3, 5, 3, **norm),
                  FlemmeConvBlock(CONV[dim], 3, 5, [1] + [3] * (dim - 1), **norm, attention_heads=2)):
        assert block(x).shape == (2, 5, *SIZES[dim])
    assert isinstance(FlemmeResConvBlock(CONV[dim], 5, 5, 3, **norm).shortcut, torch.nn.Identity)


@pytest.mark.parametrize("dim", [2, 3])
def test_strided_convolutions_divide_and_multiply_exactly(dim):
    stride = [1, 2, 3][:dim] if dim == 3 else [2, 3]
    x = torch.randn(1, 2, *[6 * s for s in stride])
    down = strided_conv(CONV[dim], 2, 4, stride)
    up = strided_conv(CONV[dim], 4, 2, stride, transposed=True)
    assert down(x).shape == (1, 4, *[6] * dim)
    assert up(down(x)).shape == x.shape


@pytest.mark.parametrize("dim", [2, 3])
def test_patch_operations(dim):
    factor = [2] * dim if dim == 2 else [1, 2, 2]
    image = torch.randn(2, 3, *[4 * f for f in factor])
    tokens = PatchEmbedding(CONV[dim], 3, 8, factor)(image)
    assert tokens.shape == (2, *[4] * dim, 8)  # channels last
    merged = PatchMerging(8, 6, factor)(tokens)
    assert merged.shape == (2, *[4 // f for f in factor], 6)
    assert PatchExpanding(6, 5, factor)(merged).shape == (2, *[4] * dim, 5)
    assert PatchRecovery(CONV[dim], 8, 3, factor)(tokens).shape == image.shape  # channels first again
    # like the original, no linear map where the expansion keeps the width
    assert isinstance(PatchExpanding(4 * math.prod(factor), 4, factor).expand, torch.nn.Identity)


def test_patch_merging_concatenates_in_the_original_order():
    # flemme/block/swin.py PatchMergingBlock.merge (commit 0be9dade): the first axis' offset varies fastest
    x = torch.randn(2, 4, 6, 3)
    original_2d = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    v = torch.randn(1, 4, 2, 6, 3)
    original_3d = torch.cat([v[:, 0::2, 0::2, 0::2], v[:, 1::2, 0::2, 0::2], v[:, 0::2, 1::2, 0::2],
                             v[:, 1::2, 1::2, 0::2], v[:, 0::2, 0::2, 1::2], v[:, 1::2, 0::2, 1::2],
                             v[:, 0::2, 1::2, 1::2], v[:, 1::2, 1::2, 1::2]], -1)
    # an anisotropic factor extends that order
    anisotropic = torch.cat([x[:, i::2, j::3] for j in range(3) for i in range(2)], -1)
    for tokens, factor, expected in ((x, (2, 2), original_2d), (v, (2, 2, 2), original_3d), (x, (2, 3), anisotropic)):
        merging = PatchMerging(3, expected.shape[-1], factor)
        with torch.no_grad():
            merging.reduction.weight.copy_(torch.eye(expected.shape[-1]))
        torch.testing.assert_close(merging(tokens), merging.norm(expected), rtol=0, atol=0)


def test_patch_expanding_is_depth_to_space():
    # the original's rearrange 'b h w (p1 p2 c) -> b (h p1) (w p2) c': the first axis' offset varies slowest
    y = torch.randn(2, 2, 2, 6 * 3)
    expected = y.unflatten(-1, (2, 3, 3)).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 6, 3)
    torch.testing.assert_close(PatchExpanding(18, 3, (2, 3), norm=False)(y), expected, rtol=0, atol=0)


def _hand_mlp(block, x):
    """The original's MLP (Linear-SiLU-Linear-SiLU, flemme/block/common.py DenseBlocks) from the block's weights."""
    first, second = block.mlp[0], block.mlp[2]
    return F.silu(F.linear(F.silu(F.linear(x, first.weight, first.bias)), second.weight, second.bias))


@pytest.mark.parametrize("dim", [2, 3])
def test_token_block_mlps_activate_their_output_as_the_original(dim):
    # with the token mixer's output projection zeroed, a block is fc(x) + MLP(LN(x)) (Swin) or fc(x) + MLP(x)
    # (Mamba, no norm before its MLP); the MLP written out by hand
    torch.manual_seed(0)
    x = torch.randn(1, *SIZES[dim], 6, dtype=torch.float64)
    swin = SwinBlock(6, 8, [4] * dim, num_heads=2).double().eval()
    mamba = MambaBlock(6, 8, dim).double().eval()
    with torch.no_grad():
        swin.attn.proj.weight.zero_()
        swin.attn.proj.bias.zero_()
        mamba.out_proj.weight.zero_()
    torch.testing.assert_close(swin(x), swin.fc(x) + _hand_mlp(swin, swin.norm2(x)))
    torch.testing.assert_close(mamba(x), mamba.fc(x) + _hand_mlp(mamba, x))


@pytest.mark.parametrize("dim", [2, 3])
def test_token_blocks_keep_any_map_size(dim):
    size = SIZES[dim]
    x = torch.randn(2, *size, 6)
    window = [4] * dim
    blocks = [SwinBlock(6, 8, window, num_heads=3, shifted=True), ResSwinBlock(6, 8, window, num_heads=2),
              ResMambaBlock(6, 8, dim, scan="cross", flip_scan=True)]
    blocks += [MambaBlock(6, 8, dim, scan=mode) for mode in (["single", "cross"] if dim == 2
                                                            else ["single", "simplified", "cross"])]
    for block in blocks:
        assert block.eval()(x).shape == (2, *size, 8)


def dense_swin_reference(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The block computed token by token: attention over all tokens, allowed only within a (rolled, padded) window
    and shift region, with the relative position bias looked up per pair; no partitioning, no padding."""
    size, dim = x.shape[1:-1], x.dim() - 2
    window = [min(w, n) for w, n in zip(block.window_size, size)]
    shift = [w // 2 if block.shifted and n > w else 0 for w, n in zip(window, size)]
    padded = [-(-n // w) * w for n, w in zip(size, window)]
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in size], indexing="ij"), -1).reshape(-1, dim)
    rolled = torch.stack([(coords[:, a] - shift[a]) % padded[a] for a in range(dim)], -1)
    # Swin's shift regions along each axis, in the rolled frame: the rest, the last window less the shift, the shift
    regions = torch.stack([(rolled[:, a] >= padded[a] - window[a]).long() + (rolled[:, a] >= padded[a] - shift[a])
                           if shift[a] else torch.zeros_like(rolled[:, a]) for a in range(dim)], -1)
    windows = rolled // torch.tensor(window)
    allowed = ((windows[:, None] == windows[None]).all(-1) & (regions[:, None] == regions[None]).all(-1))
    relative = rolled[:, None] - rolled[None]
    index = torch.zeros_like(relative[..., 0])
    for a, w in enumerate(block.window_size):
        index = index * (2 * w - 1) + relative[..., a] + w - 1
    index = torch.where(allowed, index, 0)  # pairs in different windows have no bias (and are masked)
    attn = block.attn
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)  # (heads, L, L)
    tokens = block.norm1(x).reshape(x.shape[0], -1, x.shape[-1])
    q, k, v = attn.qkv(tokens).unflatten(-1, (3, attn.num_heads, attn.head_dim)).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * attn.head_dim ** -0.5 + bias
    out = attn.proj((logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2).flatten(2))
    y = x + out.reshape(x.shape)
    return block.fc(y) + block.mlp(block.norm2(y))


@pytest.mark.parametrize("size, window", [((5, 11), (4, 4)), ((3, 9), (4, 4)), ((8, 8), (4, 4)),
                                          ((3, 5, 6), (2, 4, 4)), ((4, 2, 7), (2, 4, 3))])
@pytest.mark.parametrize("shifted", [False, True])
def test_swin_block_equals_dense_windowed_attention(size, window, shifted):
    torch.manual_seed(0)
    block = SwinBlock(6, 6, window, num_heads=2, shifted=shifted).eval()
    x = torch.randn(2, *size, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), dense_swin_reference(block, x))


# ---- Mamba cross scan --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim, mode, directions", [(2, "single", 1), (2, "cross", 2), (3, "single", 1),
                                                   (3, "simplified", 2), (3, "cross", 6)])
@pytest.mark.parametrize("flip", [False, True])
def test_flemme_scan_modes_give_distinct_directions(dim, mode, directions, flip):
    orders = scan_orders(SIZES[dim], flemme_directions(dim, mode, flip))
    assert orders.shape == (directions * (2 if flip else 1), math.prod(SIZES[dim]))
    assert len({tuple(o.tolist()) for o in orders}) == len(orders)
    assert torch.equal(orders[0], torch.arange(orders.shape[1]))  # the first direction is image order
    if flip:  # the original's flip_scan: every direction again, reversed
        assert torch.equal(orders[directions:], orders[:directions].flip(1))


def test_scan_directions_follow_the_original_permutation_tables():
    grid2 = torch.arange(6 * 7).view(6, 7)
    assert torch.equal(scan_orders((6, 7), flemme_directions(2, "cross"))[1], grid2.t().reshape(-1))
    grid3 = torch.arange(3 * 4 * 5).view(3, 4, 5)
    simplified = scan_orders((3, 4, 5), flemme_directions(3, "simplified"))
    assert torch.equal(simplified[1], grid3.permute(2, 1, 0).reshape(-1))
    cross = scan_orders((3, 4, 5), flemme_directions(3, "cross"))
    permutations = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    for order, permutation in zip(cross, permutations):
        assert torch.equal(order, grid3.permute(permutation).reshape(-1))
    with pytest.raises(ValueError, match="scan mode"):
        flemme_directions(2, "simplified")


def test_mamba_block_directions_and_parameters():
    block = MambaBlock(32, 64, dim=2, scan="cross", flip_scan=True)
    assert block.directions == ("hw", "wh", "-hw", "-wh")
    inner, state, rank = 64, math.ceil(32 / 6), math.ceil(32 / 16)  # the original's defaults
    assert block.x_proj_weight.shape == (4, rank + 2 * state, inner)
    assert block.dt_projs_weight.shape == (4, inner, rank)
    assert block.A_logs.shape == (4 * inner, state) and block.Ds.shape == (4 * inner,)
    with pytest.raises(ValueError, match="scan mode"):
        MambaBlock(8, 8, dim=3, scan="diagonal")


# ---- combination layer and Table III -----------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [2, 3])
def test_combination_layer_is_small_and_takes_any_size(dim):
    layer = CombinationLayer(CONV[dim], inputs=4, channels=3, grid=8)
    assert parameter_count(layer) == 4 * 3 * 8 ** dim + (12 * 3 + 3)
    size = SIZES[dim]
    predictions = [torch.randn(2, 3, *[math.ceil(n / 2 ** i) for n in size]) for i in range(4)]
    assert layer(predictions, size).shape == (2, 3, *size)
    with pytest.raises(ValueError, match="4 predictions"):
        layer(predictions[:3], size)


@pytest.mark.parametrize("encoder", sorted(TABLE3_PARAMETERS))
def test_table3_parameter_counts_match_the_original(encoder):
    reference = load_manifest("flemme_table3")["networks"][encoder]
    network = flemme_table3(encoder)
    assert parameter_count(network) == TABLE3_PARAMETERS[encoder] == reference["parameters"]
    for row in reference["breakdown"]:
        assert parameter_count(network, row["ours"] + ".") == row["parameters"], row
    assert sum(row["parameters"] for row in reference["breakdown"]) == reference["parameters"]
    assert network(torch.randn(1, 1, 64, 64)).shape == (1, 1, 64, 64)


# ---- networks ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("architecture", ["", "_hsem"])
def test_every_network_trains_in_2d_and_3d(encoder, architecture, dim):
    network = tiny(f"flemme_{encoder}{architecture}", dim)  # eval: stochastic depth cannot drop a block by chance
    outputs = network(torch.randn(2, 2, *NETWORK_SIZES[dim]))
    outputs = outputs if isinstance(outputs, list) else [outputs]
    assert outputs[0].shape == (2, 3, *NETWORK_SIZES[dim])
    sum(o.square().mean() for o in outputs).backward()
    assert [n for n, p in network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize("encoder, block", [(e, b) for e in ENCODERS for b in BUILDING_BLOCKS[e][1:]])
def test_alternative_building_blocks(encoder, block):
    network = tiny(f"flemme_{encoder}", 2, building_block=block)
    assert network(torch.randn(1, 2, 16, 24)).shape == (1, 3, 16, 24)


@pytest.mark.parametrize("dim, size", [(2, (48, 80)), (2, (37, 45)), (3, (20, 28, 36)), (3, (13, 18, 11))])
def test_hsem_outputs_match_nnunet_deep_supervision_targets(dim, size):
    encoder = "mambau" if dim == 2 else "swinu"
    network = tiny(f"flemme_{encoder}_hsem", dim)
    x = torch.randn(1, 2, *size)
    with torch.no_grad():
        outputs = network(x)
        network.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
        fused = network(x)
    scales = network.deep_supervision_scales
    assert scales == [[1.0] * dim, [1 / 2] * dim, [1 / 4] * dim, [1 / 8] * dim]  # fused, levels, bottleneck
    targets = DownsampleSegForDSTransform(scales)(segmentation=torch.zeros(1, *size, dtype=torch.uint8))
    assert [o.shape[2:] for o in outputs] == [t.shape[1:] for t in targets["segmentation"]]
    assert [o.shape[:2] for o in outputs] == [(1, 3)] * 4
    torch.testing.assert_close(fused, outputs[0])
    # padding happens at the end of every axis: the same as padding by hand and cropping every output
    pad = [-n % 8 for n in size]
    network.decoder.deep_supervision = True
    with torch.no_grad():
        padded = network(F.pad(x, [p for amount in reversed(pad) for p in (0, amount)]))
    for out, ref in zip(outputs, padded):
        torch.testing.assert_close(out, ref[(..., *(slice(0, n) for n in out.shape[2:]))])


def test_sem_returns_one_tensor_whatever_deep_supervision_says():
    network = tiny("flemme_unet", 2, deep_supervision=True)
    assert isinstance(network(torch.randn(1, 2, 16, 16)), torch.Tensor)
    assert network.deep_supervision_scales == [[1.0, 1.0]]


def test_anisotropic_plans_strides():
    network = tiny("flemme_swinu_hsem", 3, strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]])
    assert network.layout.patch_stride == (1, 2, 2) and network.total_stride == (2, 8, 8)
    assert network.deep_supervision_scales[1:] == [[1, 1 / 2, 1 / 2], [1 / 2, 1 / 4, 1 / 4], [1 / 2, 1 / 8, 1 / 8]]
    outputs = network(torch.randn(1, 2, 5, 20, 12))
    assert [tuple(o.shape[2:]) for o in outputs] == [(5, 20, 12), (5, 10, 6), (2, 5, 3), (2, 2, 2)]


def test_layout_from_nnunet_default_2d_plans():
    layout = FlemmeLayout.from_plans(2, 7, [32, 64, 128, 256, 512, 512, 512], [[1, 1]] + [[2, 2]] * 6, None, 2)
    assert layout.patch_channels == 32 and layout.patch_stride == (2, 2)
    assert layout.level_channels == (64, 128, 256, 512, 512)
    assert layout.middle_channels == (512, 512)
    assert layout.level_scales()[-1] == (64, 64)


def test_registry_and_nnunet_plans():
    names = [n for n in list_networks() if n.startswith("flemme_")]
    assert names == sorted(f"flemme_{e}{a}" for e in ENCODERS for a in ("", "_hsem"))
    assert all(get_network_spec(n).dims == (2, 3) and get_network_spec(n).sized_by_plans for n in names)
    # nnU-Net's own plans: keys Flemme does not use are dropped, norm and nonlinearity reach the conv blocks
    arch = {"n_stages": 4, "features_per_stage": [4, 6, 8, 12], "conv_op": torch.nn.Conv2d,
            "kernel_sizes": [[3, 3]] * 4, "strides": [[1, 1]] + [[2, 2]] * 3, "n_conv_per_stage": [2] * 4,
            "n_conv_per_stage_decoder": [2] * 3, "conv_bias": True, "norm_op": torch.nn.InstanceNorm2d,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": torch.nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}
    for name in ("flemme_unet_hsem", "flemme_mambau"):
        kwargs = plan_kwargs(name, arch, patch_size=(40, 56),
                             arch_class_name="dynamic_network_architectures.architectures.unet.PlainConvUNet")
        network = create_network(name, input_channels=1, num_classes=2, deep_supervision=True, **kwargs)
        out = network(torch.randn(1, 1, 40, 56))
        assert (out[0] if isinstance(out, list) else out).shape == (1, 2, 40, 56)
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in create_network(
        "flemme_unet", input_channels=1, num_classes=2, **plan_kwargs("flemme_unet", arch)).modules())


def test_wrong_input_and_options_raise():
    network = tiny("flemme_unet", 2)
    with pytest.raises(ValueError, match="2D"):
        network(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="2 input channels"):
        network(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="n_stages >= 3"):
        tiny("flemme_unet", 2, n_stages=2, features_per_stage=[4, 8], strides=[[1, 1], [2, 2]])
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny("flemme_unet", 2, features_per_stage=[4, 8])
    with pytest.raises(ValueError, match="window_size: not an option of the mambau"):
        tiny("flemme_mambau", 2, window_size=4)
    with pytest.raises(ValueError, match="building_block"):
        tiny("flemme_swinu", 2, building_block="mamba")
    with pytest.raises(ValueError, match="scan mode"):
        tiny("flemme_mambau", 2, scan="simplified")
    with pytest.raises(TypeError, match="abstract"):
        FlemmeNet(1, 1, 4, [4, 6, 8, 12], torch.nn.Conv2d, [[1, 1]] + [[2, 2]] * 3)


def test_memory_estimate_under_fake_tensors_leaves_real_forwards_working():
    from nnunet_mamba.planning.memory import network_memory_gib

    size = (12, 20)  # a size no other test uses: the index tables and masks are first built under FakeTensorMode
    for name in ("flemme_swinu_hsem", "flemme_mambau"):
        network = tiny(name, 2).train()
        assert network_memory_gib(network, 2, size, 2) > 0
        out = network.eval()(torch.randn(1, 2, *size))
        out = out[0] if isinstance(out, list) else out
        # a fake table in a cache would make this output fake too (with the right shape)
        assert not is_fake(out) and out.shape == (1, 3, *size) and out.isfinite().all()


# ---- the original's state dicts ----------------------------------------------------------------------------------

def _original_block_key(rest: str, mamba: bool) -> str:
    """Our block parameter name as the original's (flemme/block/swin.py, vmamba.py, common.py at 0be9dade)."""
    renames = [("norm1.", "norm1.norm."), ("norm2.", "norm2.norm."), ("attn.", "atten."),
               ("mlp.0.", "mlp.mlp.0.linear."), ("mlp.2.", "mlp.mlp.1.linear."),
               ("fc.", "fc.linear." if mamba else "dense.")]
    for ours, original in renames:
        if rest.startswith(ours):
            return original + rest[len(ours):]
    return rest


_ORIGINAL_MODULES = {"encoder.patch_embed.proj.": "encoder.patch_emb.conv.", "encoder.downsamples.": "encoder.down.",
                     "decoder.upsamples.": "decoder.up.",
                     "decoder.seg_layers.recovery.proj.": "decoder.patch_recov.conv.",
                     "decoder.seg_layers.recovery.expand.": "decoder.patch_recov.expand."}


def original_flemme_state_dict(network, mamba: bool) -> dict:
    """The state dict of the original network our ``network`` corresponds to, written out by hand."""
    stage = "ssm" if mamba else "trans"
    original = {}
    for key, value in network.state_dict().items():
        parts = key.split(".")
        if parts[1] in ("stages", "middle"):
            container = {"stages": f"d_{stage}" if parts[0] == "encoder" else f"u_{stage}", "middle": "middle"}
            head = f"{parts[0]}.{container[parts[1]]}.{parts[2]}.building_blocks.{parts[3]}."
            original[head + _original_block_key(".".join(parts[4:]), mamba)] = value
        else:
            ours = next(p for p in _ORIGINAL_MODULES if key.startswith(p))
            original[_ORIGINAL_MODULES[ours] + key[len(ours):]] = value
    return original


@pytest.mark.parametrize("encoder", ["swinu", "mambau"])
def test_original_flemme_state_dicts_convert_into_ours(encoder):
    from nnunet_mamba.checkpoints import convert_flemme_state_dict

    network = flemme_table3(encoder)
    original = original_flemme_state_dict(network, mamba=encoder == "mambau")
    # names read off the original's code
    spot = {"swinu": ["encoder.patch_emb.conv.weight", "encoder.d_trans.0.building_blocks.1.norm1.norm.weight",
                      "encoder.middle.1.building_blocks.0.atten.relative_position_bias_table",
                      "encoder.d_trans.0.building_blocks.0.dense.weight", "decoder.up.0.expand.weight",
                      "decoder.u_trans.1.building_blocks.0.mlp.mlp.1.linear.weight",
                      "decoder.patch_recov.expand.expand.weight", "encoder.down.1.reduction.weight"],
            "mambau": ["encoder.d_ssm.1.building_blocks.0.x_proj_weight", "encoder.middle.0.building_blocks.1.Ds",
                       "decoder.u_ssm.0.building_blocks.0.fc.linear.weight", "decoder.patch_recov.conv.bias",
                       "encoder.d_ssm.0.building_blocks.0.mlp.mlp.0.linear.bias", "encoder.down.0.norm.bias"]}
    assert set(spot[encoder]) <= set(original)
    # the original's module totals (tests/reference/flemme_table3.json, counted from its code)
    for module in load_manifest("flemme_table3")["networks"][encoder]["breakdown"]:
        prefix = module["original"] + "."
        assert sum(v.numel() for k, v in original.items() if k.startswith(prefix)) == module["parameters"]
    # the original also stores the window attention's index table (and the shifted blocks' mask)
    buffers = {"encoder.d_trans.0.building_blocks.0.atten.relative_position_index": torch.zeros(64, 64),
               "encoder.d_trans.0.building_blocks.1.atten_mask": torch.zeros(4, 64, 64)} if encoder == "swinu" else {}
    converted = convert_flemme_state_dict({**original, **buffers})
    assert converted.keys() == network.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in network.state_dict().items())
    with pytest.raises(ValueError, match="no place"):
        convert_flemme_state_dict({**original, "decoder.final.0.building_blocks.0.conv.weight": torch.zeros(1)})
