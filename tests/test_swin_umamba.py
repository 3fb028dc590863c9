"""Swin-UMamba / Swin-UMamba-dagger: parity with the original's state dicts, shapes, padding, weight loading."""
import pytest
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from einops import rearrange

from helpers import assert_manifest_output_shapes, distinct_ss2d, load_manifest
from nnunet_mamba.checkpoints import convert_swin_umamba_state_dict
from nnunet_mamba.layers.vss import SS2D, FinalPatchExpand_X4, PatchExpand, PatchMerging2D
from nnunet_mamba.networks import create_network, get_network_spec
from nnunet_mamba.networks.swin_umamba import SwinUMamba, SwinUMambaD  # registers both
from nnunet_mamba.networks.vmamba_weights import load_vmamba_encoder
from nnunet_mamba.ops import selective_scan_reference

MANIFESTS = {
    "swin_umamba_in1_cls14": (SwinUMamba, 1, 14),
    "swin_umamba_d_in1_cls14": (SwinUMambaD, 1, 14),
    "swin_umamba_d_in3_cls8": (SwinUMambaD, 3, 8),
}
# Same architecture, a fraction of the width and depth: for the tests that only exercise padding and plumbing.
SMALL = {SwinUMamba: dict(depths=(1, 1, 1, 1), embed_dim=16, stem_channels=8),
         SwinUMambaD: dict(depths=(1, 1, 1, 1), embed_dim=16)}


# small networks: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def full_networks():
    torch.manual_seed(0)
    return {name: cls(input_channels=cin, num_classes=classes, deep_supervision=True).eval()
            for name, (cls, cin, classes) in MANIFESTS.items()}


def small_network(cls, input_channels=1, num_classes=3, deep_supervision=True):
    torch.manual_seed(0)
    return cls(input_channels, num_classes, deep_supervision, **SMALL[cls]).eval()


@pytest.fixture(scope="module")
def vmamba_checkpoint():
    """A stand-in for VMamba-Tiny v0's checkpoint['model']: the real keys and shapes, random values."""
    generator = torch.Generator().manual_seed(1)
    return {key: torch.randn(shape, generator=generator)
            for key, shape in load_manifest("vmamba_tiny_v0_checkpoint")["state_dict"]}


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_state_dict_and_parameter_count_match_reference(full_networks, name):
    manifest = load_manifest(name)
    network = full_networks[name]
    # the manifests hold the original's keys: compare after the conversion that import-checkpoint applies
    original = {k: torch.empty(0) for k, _ in manifest["state_dict"]}
    expected = [[k, shape] for k, (_, shape) in zip(convert_swin_umamba_state_dict(original), manifest["state_dict"])]
    assert [[k, list(v.shape)] for k, v in network.state_dict().items()] == expected
    assert sum(p.numel() for p in network.parameters()) == manifest["num_params"]


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_forward_shapes_match_reference(full_networks, name):
    assert_manifest_output_shapes(full_networks[name], load_manifest(name))


@pytest.mark.parametrize("cls", [SwinUMamba, SwinUMambaD])
@pytest.mark.parametrize("size", [(48, 48), (80, 80), (96, 160), (50, 70)])
def test_any_patch_size_gives_nnunet_deep_supervision_sizes(cls, size):
    network = small_network(cls)
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        outputs = network(x)
    # the sizes nnU-Net gives the deep-supervision targets at the network's scales
    seg = torch.zeros(1, *size, dtype=torch.uint8)
    scales = [[s, s] for s in network.deep_supervision_scales]
    targets = DownsampleSegForDSTransform(scales)(segmentation=seg)["segmentation"]
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(t.shape[1:]) for t in targets]
    assert outputs[0].shape == (1, 3, *size)
    # padding is zeros at the bottom and right: the same as padding by hand and cropping the outputs
    pad = [-s % 32 for s in size]
    with torch.no_grad():
        padded = network(F.pad(x, (0, pad[1], 0, pad[0])))
    for out, ref in zip(outputs, padded):
        torch.testing.assert_close(out, ref[..., :out.shape[2], :out.shape[3]])


@pytest.mark.parametrize("cls", [SwinUMamba, SwinUMambaD])
def test_wrong_input_raises(cls):
    network = small_network(cls, input_channels=2)
    with pytest.raises(ValueError, match="2D network"):
        network(torch.randn(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match="2 input channels"):
        network(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name, cls", [("swin_umamba", SwinUMamba), ("swin_umamba_d", SwinUMambaD)])
def test_registry_and_deep_supervision_switch(name, cls):
    assert get_network_spec(name).dims == (2,)
    network = create_network(name, input_channels=2, num_classes=4, deep_supervision=False, **SMALL[cls]).eval()
    assert isinstance(network, cls)
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        single = network(x)
        network.decoder.deep_supervision = True  # what nnU-Net's set_deep_supervision_enabled does
        several = network(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, 4, 64, 64)
    assert len(several) == 4
    torch.testing.assert_close(several[0], single)


@pytest.mark.parametrize("cls", [SwinUMamba, SwinUMambaD])
def test_every_parameter_gets_a_gradient_with_deep_supervision(cls):
    network = small_network(cls)  # in eval mode, so that stochastic depth cannot drop a block by chance
    sum(o.mean() for o in network(torch.randn(2, 1, 64, 64))).backward()
    assert [n for n, p in network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_pretrained_encoder_parameters_exclude_patch_embedding():
    network = small_network(SwinUMambaD)
    frozen = {id(p) for p in network.pretrained_encoder_parameters()}
    names = {n for n, p in network.named_parameters() if id(p) in frozen}
    assert names and all(n.startswith("vssm_encoder.") and ".patch_embed." not in f".{n}" for n in names)
    assert id(network.vssm_encoder.patch_embed.proj.weight) not in frozen
    assert not frozen & {id(p) for p in network.decoder.parameters()}


def per_direction_ss2d(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D written out direction by direction: four separate scans with ungrouped B and C."""
    u, z = m.in_proj(x).chunk(2, dim=-1)
    u = m.act(m.conv2d(u.permute(0, 3, 1, 2)))
    batch, d, height, width = u.shape
    sequences = [u.flatten(2), u.transpose(2, 3).flatten(2)]
    sequences += [s.flip(-1) for s in sequences]
    ys = []
    for k, seq in enumerate(sequences):
        dt, B, C = torch.einsum("bdl,cd->bcl", seq, m.x_proj_weight[k]).split([m.dt_rank, m.d_state, m.d_state], 1)
        dt = torch.einsum("brl,dr->bdl", dt, m.dt_projs_weight[k])
        own = slice(k * d, (k + 1) * d)
        ys.append(selective_scan_reference(seq, dt, -torch.exp(m.A_logs[own]), B, C, m.Ds[own],
                                           delta_bias=m.dt_projs_bias[k], delta_softplus=True))
    rows = (ys[0] + ys[2].flip(-1)).view(batch, d, height, width)
    cols = (ys[1] + ys[3].flip(-1)).view(batch, d, width, height).transpose(2, 3)
    y = m.out_norm((rows + cols).permute(0, 2, 3, 1))
    return m.out_proj(y * F.silu(z))


def test_ss2d_single_grouped_scan_equals_four_directional_scans():
    m = distinct_ss2d()
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)  # not square: a transposition mistake would show
    torch.testing.assert_close(m(x), per_direction_ss2d(m, x), rtol=1e-5, atol=1e-6)


def test_patch_merging_and_expanding_match_their_definitions():
    merge = PatchMerging2D(6)
    x = torch.randn(2, 4, 6, 6)
    quads = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    torch.testing.assert_close(merge(x), merge.reduction(merge.norm(quads)))
    for expand, p in ((PatchExpand(8), 2), (FinalPatchExpand_X4(8), 4)):
        x = torch.randn(2, 3, 5, 8)
        shuffled = rearrange(expand.expand(x), "b h w (p1 p2 c) -> b (h p1) (w p2) c", p1=p, p2=p)
        torch.testing.assert_close(expand(x), expand.norm(shuffled))


def _clear_encoder(network):
    with torch.no_grad():
        for key, value in network.state_dict().items():
            if key.startswith("vssm_encoder."):
                value.zero_()


@pytest.mark.parametrize("faithful", [True, False])
def test_loader_fills_swin_umamba_encoder_but_not_its_patch_embedding(full_networks, vmamba_checkpoint, faithful):
    network = full_networks["swin_umamba_in1_cls14"]
    _clear_encoder(network)  # the networks are shared between tests: undo an earlier test's loading
    before = {k: v.clone() for k, v in network.state_dict().items()}
    report = load_vmamba_encoder(network, vmamba_checkpoint, faithful=faithful)
    state = network.state_dict()
    key = "layers.2.blocks.8.self_attention.x_proj_weight"
    assert not torch.equal(before[f"vssm_encoder.{key}"], vmamba_checkpoint[key])
    assert torch.equal(state[f"vssm_encoder.{key}"], vmamba_checkpoint[key])
    assert torch.equal(state["vssm_encoder.downsamples.1.reduction.weight"],
                       vmamba_checkpoint["layers.1.downsample.reduction.weight"])
    # the original's skip list names patch_embed.norm.weight twice, so it loads patch_embed.norm.bias
    embedding_skipped = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight"]
    embedding_skipped += [] if faithful else ["patch_embed.norm.bias"]
    assert sorted(report.skipped) == sorted(["norm.weight", "norm.bias", "head.weight", "head.bias"]
                                            + embedding_skipped)
    assert len(report.loaded) == 212 - 4 - len(embedding_skipped) and report.adapted == [] and report.missing == []
    bias = "vssm_encoder.patch_embed.norm.bias"
    assert torch.equal(state[bias], vmamba_checkpoint["patch_embed.norm.bias"] if faithful else before[bias])
    unchanged = [k for k in state if not k.startswith("vssm_encoder.") or (".patch_embed." in k and k != bias)]
    assert all(torch.equal(state[k], before[k]) for k in unchanged)


@pytest.mark.parametrize("name, faithful, embedding", [("swin_umamba_d_in1_cls14", True, "skipped"),
                                                       ("swin_umamba_d_in1_cls14", False, "adapted"),
                                                       ("swin_umamba_d_in3_cls8", True, "loaded"),
                                                       ("swin_umamba_d_in3_cls8", False, "loaded")])
def test_loader_fills_swin_umamba_d_encoder_and_its_patch_embedding(full_networks, vmamba_checkpoint, name,
                                                                    faithful, embedding):
    network = full_networks[name]
    _clear_encoder(network)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    # a whole training checkpoint is accepted too: only its 'model' is read
    report = load_vmamba_encoder(network, {"model": vmamba_checkpoint, "optimizer": {}, "epoch": 292},
                                 faithful=faithful)
    state = network.state_dict()
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"]
    assert len(report.loaded) == 212 - 4 - (4 if embedding == "skipped" else 0) and report.missing == []
    assert sorted(report.skipped) == sorted(["norm.weight", "norm.bias", "head.weight", "head.bias"]
                                            + (keys if embedding == "skipped" else []))
    assert torch.equal(state["vssm_encoder.layers.3.blocks.1.self_attention.dt_projs_bias"],
                       vmamba_checkpoint["layers.3.blocks.1.self_attention.dt_projs_bias"])
    if embedding == "skipped":  # the original: a kernel for other than the network's channels skips all four
        assert all(torch.equal(state[f"vssm_encoder.{k}"], before[f"vssm_encoder.{k}"]) for k in keys)
    else:
        assert all(torch.equal(state[f"vssm_encoder.{k}"], vmamba_checkpoint[k]) for k in keys[1:])
        rgb = vmamba_checkpoint["patch_embed.proj.weight"]
        expected = rgb.sum(dim=1, keepdim=True) if embedding == "adapted" else rgb  # grey seen as R = G = B
        torch.testing.assert_close(state["vssm_encoder.patch_embed.proj.weight"], expected)
    assert report.adapted == (["vssm_encoder.patch_embed.proj.weight"] if embedding == "adapted" else [])
    assert all(torch.equal(v, before[k]) for k, v in state.items() if not k.startswith("vssm_encoder."))


def test_loader_rejects_foreign_and_mismatched_checkpoints(vmamba_checkpoint):
    network = small_network(SwinUMambaD)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(ValueError, match="no tensor of the checkpoint matches"):
        load_vmamba_encoder(network, {"encoder.stages.0.0.conv1.weight": torch.zeros(32, 1, 3, 3)})
    with pytest.raises(ValueError, match="do not fit"):  # a narrower network than VMamba-Tiny
        load_vmamba_encoder(network, vmamba_checkpoint)
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items())
    with pytest.raises(TypeError, match="SwinUMamba"):
        load_vmamba_encoder(torch.nn.Linear(2, 2), vmamba_checkpoint)


def test_loader_strictness_on_missing_and_unexpected_keys(full_networks, vmamba_checkpoint):
    network = full_networks["swin_umamba_d_in3_cls8"]
    partial = {k: v for k, v in vmamba_checkpoint.items() if not k.startswith("layers.3.")}
    with pytest.raises(ValueError, match="missing"):
        load_vmamba_encoder(network, partial)
    report = load_vmamba_encoder(network, partial, strict=False)
    assert report.missing and all(k.startswith("vssm_encoder.layers.3.") for k in report.missing)
    deeper = dict(vmamba_checkpoint, **{"layers.2.blocks.9.ln_1.weight": torch.ones(384)})  # e.g. VMamba-Small
    with pytest.raises(ValueError, match="unexpected"):
        load_vmamba_encoder(network, deeper)
    assert load_vmamba_encoder(network, deeper, strict=False).unexpected == ["layers.2.blocks.9.ln_1.weight"]


def test_pretrained_trainers_load_as_the_original_unless_named_adapted():
    from nnunet_mamba.trainers import (nnUNetTrainerSwinUMamba, nnUNetTrainerSwinUMambaAdaptedLoading,
                                       nnUNetTrainerSwinUMambaD, nnUNetTrainerSwinUMambaDAdaptedLoading)

    assert nnUNetTrainerSwinUMamba.faithful_loading and nnUNetTrainerSwinUMambaD.faithful_loading
    for trainer, network in ((nnUNetTrainerSwinUMambaAdaptedLoading, "swin_umamba"),
                             (nnUNetTrainerSwinUMambaDAdaptedLoading, "swin_umamba_d")):
        assert not trainer.faithful_loading and trainer.network_name == network
        assert trainer.pretrained_weights == "vmamba-tiny" and trainer.freeze_epochs == 10
