import math

import pytest
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

import nnunet_mamba.ops.cross_scan as cross_scan_module
from nnunet_mamba.layers import Mamba
from nnunet_mamba.layers.tom import DIRECTIONS, ToM, inverse_order, scan_order
from nnunet_mamba.networks.registry import create_network, get_network_spec
from nnunet_mamba.networks.segresmamba import SegResMamba

# Reported in nnunet_mamba/networks/segresmamba.py; a change of the architecture must update both.
FULL_WIDTH_PARAMETERS = 76_805_576

SHAPE = (3, 4, 5)  # distinct sizes, so a mixed-up axis shows


# small networks: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(deep_supervision: bool = True, **kwargs) -> SegResMamba:
    torch.manual_seed(0)
    return SegResMamba(input_channels=2, num_classes=3, deep_supervision=deep_supervision, encoder_width=4,
                       decoder_width=8, d_state=4, **kwargs)


@pytest.mark.parametrize("shape", [SHAPE, (2, 1, 3), (1, 1, 1)])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_scan_orders_are_permutations_with_inverses(direction, shape):
    length = math.prod(shape)
    order = scan_order(shape, direction)
    inverse = inverse_order(order)
    assert torch.equal(order.sort().values, torch.arange(length))
    assert torch.equal(order[inverse], torch.arange(length))
    assert torch.equal(inverse[order], torch.arange(length))
    x = torch.randn(2, 3, length)
    assert torch.equal(x[..., order][..., inverse], x)


def test_forward_and_reverse_orders():
    length = math.prod(SHAPE)
    assert torch.equal(scan_order(SHAPE, "forward"), torch.arange(length))
    assert torch.equal(scan_order(SHAPE, "reverse"), torch.arange(length).flip(0))
    with pytest.raises(ValueError, match="direction"):
        scan_order(SHAPE, "diagonal")


def test_inter_slice_order_has_the_slice_axis_fastest():
    depth, height, width = SHAPE
    order = scan_order(SHAPE, "inter_slice")
    d, rest = order // (height * width), order % (height * width)
    h, w = rest // width, rest % width
    t = torch.arange(order.numel())
    assert torch.equal(d, t % depth)  # consecutive tokens: the same in-plane voxel on consecutive slices
    assert torch.equal(h * width + w, t // depth)  # then the in-plane position advances in C order


def _reference_mambas(tom: ToM) -> list:
    """Three mamba-ssm-style layers holding the ToM's shared projections and each direction's SSM parameters."""
    layers = []
    for g in range(len(DIRECTIONS)):
        layer = Mamba(tom.dim, d_state=tom.d_state, d_conv=tom.d_conv, expand=tom.d_inner // tom.dim)
        layer.load_state_dict({
            "in_proj.weight": tom.in_proj.weight, "out_proj.weight": tom.out_proj.weight,
            "conv1d.weight": tom.conv1d_weight[g].unsqueeze(1), "conv1d.bias": tom.conv1d_bias[g],
            "x_proj.weight": tom.x_proj_weight[g], "dt_proj.weight": tom.dt_proj_weight[g],
            "dt_proj.bias": tom.dt_proj_bias[g], "A_log": tom.A_log[g], "D": tom.D[g]})
        layers.append(layer)
    return layers


def test_tom_is_the_sum_of_three_directional_mambas():
    torch.manual_seed(0)
    tom = ToM(8, d_state=4)
    x = torch.randn(2, 8, *SHAPE)
    with torch.no_grad():
        tokens = tom.norm(x.flatten(2).transpose(1, 2))
        expected = 0
        for direction, mamba in zip(DIRECTIONS, _reference_mambas(tom)):
            order = scan_order(SHAPE, direction)
            expected = expected + mamba(tokens[:, order])[:, inverse_order(order)]
        torch.testing.assert_close(tom(x), expected.transpose(1, 2).reshape(x.shape), atol=1e-5, rtol=1e-4)


def test_each_direction_scans_its_own_order(monkeypatch):
    torch.manual_seed(0)
    tom = ToM(4, d_state=4)
    with torch.no_grad():  # identity-like: the causal conv passes each token through unchanged
        tom.conv1d_weight.zero_()
        tom.conv1d_weight[..., -1] = 1
        tom.conv1d_bias.zero_()
    seen = {}

    def identity_scan(u, delta, A, B, C, *args, **kwargs):  # a spy that is also an identity SSM: y = u
        seen.update(u=u, B=B, C=C)
        return u

    monkeypatch.setattr(cross_scan_module, "selective_scan", identity_scan)  # the scan its directions fold into
    projected = []
    tom.in_proj.register_forward_hook(lambda module, args, out: projected.append(out))
    x = torch.randn(1, 4, *SHAPE)
    with torch.no_grad():
        out = tom(x)
    u, z = projected[0].transpose(1, 2).chunk(2, dim=1)  # voxel order, (batch, d_inner, L)
    d_inner, length = tom.d_inner, math.prod(SHAPE)
    assert seen["u"].shape == (1, len(DIRECTIONS) * d_inner, length)
    assert seen["B"].shape == seen["C"].shape == (1, len(DIRECTIONS), tom.d_state, length)  # one group each
    for g, direction in enumerate(DIRECTIONS):
        block = seen["u"][:, g * d_inner:(g + 1) * d_inner]
        torch.testing.assert_close(block, F.silu(u[..., scan_order(SHAPE, direction)]))
    # every direction's output is mapped back to voxel order before the sum
    expected = tom.out_proj((3 * F.silu(u) * F.silu(z)).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("patch", [(40, 56, 72), (33, 47, 61)])
def test_outputs_match_nnunet_deep_supervision_targets(patch):
    network = tiny().eval()
    with torch.no_grad():
        outputs = network(torch.randn(1, 2, *patch))
    targets = DownsampleSegForDSTransform(ds_scales=SegResMamba.deep_supervision_scales)(
        segmentation=torch.zeros(1, *patch, dtype=torch.uint8))["segmentation"]
    assert [tuple(o.shape) for o in outputs] == [(1, 3, *t.shape[1:]) for t in targets]
    assert [tuple(t.shape[1:]) for t in targets] == SegResMamba.output_shapes(patch)
    assert all(torch.isfinite(o).all() for o in outputs)


def test_deep_supervision_toggle_and_every_parameter_trains():
    network = tiny()
    x = torch.randn(1, 2, 34, 17, 20)
    outputs = network(x)
    assert isinstance(outputs, list) and len(outputs) == len(SegResMamba.deep_supervision_strides)
    sum(o.square().mean() for o in outputs).backward()
    # the released code never calls its Mamba layers; here every parameter, the ToMs' included, gets a gradient
    unused = [n for n, p in network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []
    network.decoder.deep_supervision = False
    with torch.no_grad():
        single = network(x)
    assert torch.is_tensor(single) and single.shape == (1, 3, 34, 17, 20)
    torch.testing.assert_close(single, outputs[0].detach())


def test_invalid_inputs_raise():
    network = tiny()
    with pytest.raises(ValueError, match="3D only"):
        network(torch.randn(1, 2, 32, 32))
    with pytest.raises(ValueError, match="input channels"):
        network(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="larger than 32"):
        network(torch.randn(1, 2, 32, 32, 32))  # training mode
    with pytest.raises(ValueError, match="num_classes"):
        SegResMamba(input_channels=1, num_classes=0)


def test_registered_and_buildable_from_the_registry():
    spec = get_network_spec("segresmamba")
    assert spec.dims == (3,) and not spec.needs_input_size
    network = create_network("segresmamba", input_channels=1, num_classes=5, encoder_width=4, decoder_width=8)
    assert network.decoder.deep_supervision is False
    assert network.decoder.seg_layers[-1].out_channels == 5


def test_full_width_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        network = SegResMamba(input_channels=1, num_classes=14)
    count = sum(p.numel() for p in network.parameters())
    print(f"SegResMamba full width (48/96, 1 input channel, 14 classes): {count:,} parameters")
    assert network.adapters[-1][-1].out_channels == 768  # the paper's decoder input
    assert count == FULL_WIDTH_PARAMETERS
