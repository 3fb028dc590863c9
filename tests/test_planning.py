"""``nnunet-mamba plan`` and the training-memory estimate (CPU, fast): plans files for nnU-Net's stock trainer,
hand edits through both routes, and the errors for edits a network cannot take."""
import copy
import functools
import importlib
import json
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import nnunet_plans, plain_unet_arch, plans_configuration

pytest.importorskip("nnunetv2")
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from nnunet_mamba.cli import main  # noqa: E402
from nnunet_mamba.networks import create_network, resolve_plan_imports  # noqa: E402
from nnunet_mamba.planning.baselines import MAX_DATASET_COVERED  # noqa: E402
from nnunet_mamba.planning.memory import estimate_training_memory_gib  # noqa: E402
from nnunet_mamba.planning.plans import PlanningError, plan_for_network  # noqa: E402
from nnunet_mamba.trainers import (nnUNetTrainerSegResMamba, nnUNetTrainerSwinUMambaScratch,  # noqa: E402
                                   nnUNetTrainerUMambaBot, nnUNetTrainerUMambaEnc, nnUNetTrainerViMUNetSmall)

CLASSES = 3  # dataset.json below: background + 2 labels
# the module, which nnunet_mamba.ops shadows with its function of the same name
backend_module = importlib.import_module("nnunet_mamba.ops.backend")


# small networks: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def configuration(name: str, patch, features, median, batch_size: int = 2) -> dict:
    """An nnU-Net 2.8 plans configuration, as nnUNetv2_plan_and_preprocess writes it."""
    return plans_configuration(patch, plain_unet_arch(len(patch), features), batch_size=batch_size, median=median,
                               data_identifier=f"nnUNetPlans_{name}")


def write_preprocessed(folder, configurations: dict, num_training: int = 6) -> str:
    """A dataset's nnU-Net preprocessed folder: dataset.json and nnUNetPlans.json (no images needed to plan)."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = configurations.get("3d_fullres", next(iter(configurations.values())))["median_image_size_in_voxels"]
    plans = nnunet_plans(configurations, ([1] + volume)[-3:])
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
               "numTraining": num_training, "file_ending": ".nii.gz"}
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return str(folder)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Small 2D and 3D nnU-Net plans (4-stage U-Nets)."""
    return write_preprocessed(tmp_path_factory.mktemp("preprocessed") / "Dataset001_X", {
        "2d": configuration("2d", [48, 64], [16, 32, 64, 128], [48, 64]),
        "3d_fullres": configuration("3d_fullres", [32, 48, 40], [16, 32, 64, 128], [32, 48, 40])})


def load_plans(path: str) -> PlansManager:
    with open(path) as f:
        return PlansManager(json.load(f))


def stock_build(plans: PlansManager, config: str, deep_supervision: bool = True) -> torch.nn.Module:
    """What nnU-Net's stock trainer and predictor build from the plans."""
    return nnUNetTrainer.build_network_architecture(plans, plans.get_configuration(config), 1, CLASSES,
                                                    deep_supervision)


def nnunet_target_shapes(plans: PlansManager, config: str) -> list:
    """The deep-supervision target shapes nnU-Net's stock trainer makes for a patch: its own scale derivation from
    the plans' strides, then its downsampling transform."""
    manager = plans.get_configuration(config)
    stub = SimpleNamespace(enable_deep_supervision=True, configuration_manager=manager)
    scales = nnUNetTrainer._get_deep_supervision_scales(stub)
    targets = DownsampleSegForDSTransform(scales)._apply_to_segmentation(torch.zeros(1, *manager.patch_size))
    return [tuple(t.shape[1:]) for t in targets]


def output_shapes(network: torch.nn.Module, patch) -> list:
    with torch.no_grad():
        return [tuple(o.shape[2:]) for o in network.train()(torch.zeros(2, 1, *patch))]


# --- the estimate ----------------------------------------------------------------------------------------------

def small_unet_kwargs(dim: int = 2, features=(16, 32, 64, 128)) -> dict:
    return resolve_plan_imports(plain_unet_arch(dim, features), ["conv_op", "norm_op", "dropout_op", "nonlin"])


def test_estimate_grows_with_batch_and_patch():
    kwargs = small_unet_kwargs()

    def estimate(patch, batch):
        return estimate_training_memory_gib("umamba_bot", kwargs, patch, batch, CLASSES, 1)

    base = estimate([64, 64], 2)
    assert estimate([64, 64], 4) > base * 1.2
    assert estimate([128, 64], 2) > base * 1.2


def test_estimate_includes_the_mamba_layers():
    kwargs = small_unet_kwargs()
    patch = [64, 64]
    plain = estimate_training_memory_gib("plainconvunet", kwargs, patch, 2, CLASSES, 1)
    bot = estimate_training_memory_gib("umamba_bot", kwargs, patch, 2, CLASSES, 1)
    enc = estimate_training_memory_gib("umamba_enc", {**kwargs, "input_size": patch}, patch, 2, CLASSES, 1)
    assert plain < bot < enc


def test_estimate_needs_neither_mamba_ssm_nor_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # importing it now fails
    monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "cuda")  # even a forced CUDA backend is not used
    backend_module._mamba_ssm_kernels.cache_clear()
    try:
        estimate = estimate_training_memory_gib("umamba_enc", {**small_unet_kwargs(), "input_size": [64, 64]},
                                                [64, 64], 2, CLASSES, 1)
    finally:
        backend_module._mamba_ssm_kernels.cache_clear()
    assert 0 < estimate < 1


# --- fixed architectures: strides that reproduce their deep-supervision outputs ----------------------------------

FIXED = {  # network, constructor kwargs for a small instance, a patch (not a multiple of the total stride)
    "swin_umamba": ({}, (40, 56)),
    "swin_umamba_d": ({"depths": (1, 1, 1, 1)}, (40, 56)),
    "vim_unet_tiny": ({"depth": 1, "input_size": (40, 56)}, (40, 56)),
    "segresmamba": ({"encoder_width": 4, "decoder_width": 8}, (34, 20, 24)),
}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_plan_strides_make_nnunet_derive_the_networks_output_sizes(name):
    kwargs, patch = FIXED[name]
    torch.manual_seed(0)
    network = create_network(name, input_channels=1, num_classes=CLASSES, deep_supervision=True, **kwargs)
    strides = network.plan_strides
    manager = SimpleNamespace(pool_op_kernel_sizes=strides, patch_size=list(patch))
    plans = SimpleNamespace(get_configuration=lambda _: manager)
    assert nnunet_target_shapes(plans, "x") == output_shapes(network, patch)
    # and the network checks them: the strides of a 6-stage nnU-Net U-Net are refused, naming the field
    unet_strides = [[1] * len(patch)] + [[2] * len(patch)] * 5
    with pytest.raises(ValueError, match=rf"arch_kwargs.strides must be {re.escape(str(strides))}"):
        create_network(name, input_channels=1, num_classes=CLASSES, strides=unet_strides, **kwargs)


# --- the planner ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _planned(dataset: str, name: str, config: str) -> str:
    with open(plan_for_network(dataset, name, [config], log=lambda _: None)) as f:
        return f.read()


def plans_for(dataset, name: str, config: str) -> dict:
    """Our planner's plans for one configuration, planned once per module; a fresh copy to edit."""
    return json.loads(_planned(dataset, name, config))


def test_umamba_plans_work_with_the_stock_trainer(dataset):
    path = plan_for_network(dataset, "umamba_bot", log=lambda _: None)
    assert path.endswith("nnUNetMambaPlans_umamba_bot.json")
    plans = load_plans(path)
    assert plans.plans_name == "nnUNetMambaPlans_umamba_bot"
    for config in ("2d", "3d_fullres"):
        manager = plans.get_configuration(config)
        assert manager.data_identifier == f"nnUNetPlans_{config}"  # nnU-Net's preprocessed data is reused
        assert manager.network_arch_class_name == "nnunet_mamba.networks.umamba.UMambaBot"
        assert manager.network_arch_init_kwargs["input_size"] == manager.patch_size
        network = stock_build(plans, config)
        assert type(network).__name__ == "UMambaBot" and network.decoder.deep_supervision
        assert output_shapes(network, manager.patch_size) == nnunet_target_shapes(plans, config)


def test_patch_shrinks_to_the_memory_target_by_nnunets_rules(tmp_path):
    # nnU-Net's patch for a wide image: U-Mamba Enc needs ~0.17 GiB there at batch 2, the target is 0.1
    folder = write_preprocessed(tmp_path / "Dataset002_Y", {
        "2d": configuration("2d", [128, 192], [16, 32, 64, 128, 256, 256], [128, 384])}, num_training=1000)
    target = 0.1
    plans = load_plans(plan_for_network(folder, "umamba_enc", gpu_memory_gib=target, log=lambda _: None))
    manager = plans.get_configuration("2d")
    patch, arch = manager.patch_size, manager.network_arch_init_kwargs
    # the axis that is largest relative to the median image shrinks first, as in nnU-Net's planner
    assert patch[0] < 128 and patch[1] <= 192
    assert arch["n_stages"] == len(arch["strides"]) == len(arch["features_per_stage"]) == len(arch["kernel_sizes"])
    total_stride = np.prod(arch["strides"], axis=0)
    assert all(p % s == 0 for p, s in zip(patch, total_stride)) and arch["input_size"] == patch
    assert manager.batch_size >= 2
    assert plans.plans["nnunet_mamba"]["estimated_training_gib"]["2d"] <= target
    stock_build(plans, "2d")


@pytest.mark.parametrize("num_training,batch_size", [(400, round(400 * MAX_DATASET_COVERED)), (6, 2)])
def test_batch_grows_into_free_memory_up_to_5_percent_of_the_dataset(tmp_path, num_training, batch_size):
    folder = write_preprocessed(tmp_path / "Dataset003_Z", {
        "2d": configuration("2d", [32, 32], [8, 16, 32], [32, 32])}, num_training=num_training)
    plans = load_plans(plan_for_network(folder, "umamba_bot", log=lambda _: None))
    assert plans.get_configuration("2d").batch_size == batch_size


def test_configurations_the_network_cannot_take_are_refused(dataset):
    with pytest.raises(PlanningError, match=r"swin_umamba is 2D only, configuration '3d_fullres' is 3D.*use -c 2d"):
        plan_for_network(dataset, "swin_umamba", ["3d_fullres"], log=lambda _: None)
    with pytest.raises(PlanningError, match="3d_lowres"):
        plan_for_network(dataset, "umamba_bot", ["3d_lowres"], log=lambda _: None)
    # by default only what the network supports is planned
    plans = load_plans(plan_for_network(dataset, "segresmamba", log=lambda _: None))
    assert plans.available_configurations == ["3d_fullres"]


@pytest.mark.parametrize("name,config,cls", [("swin_umamba", "2d", "SwinUMamba"), ("vim_unet_small", "2d", "ViMUNet"),
                                             ("segresmamba", "3d_fullres", "SegResMamba")])
def test_fixed_architecture_plans_work_with_the_stock_trainer(dataset, name, config, cls):
    plans = PlansManager(plans_for(dataset, name, config))
    manager = plans.get_configuration(config)
    network = stock_build(plans, config)
    assert type(network).__name__ == cls
    assert manager.network_arch_init_kwargs["strides"] == network.plan_strides
    total_stride = np.prod(network.plan_strides, axis=0)
    assert all(p % s == 0 for p, s in zip(manager.patch_size, total_stride))
    if name == "vim_unet_small":  # the registry's settings travel in the plans, the stock trainer has no registry
        assert network.encoder.embed_dim == 384 and manager.network_arch_init_kwargs["input_size"] == manager.patch_size


# --- hand-edited plans: honoured by our trainers and by the stock trainer, or refused when built ------------------

def both_routes(plans: dict, config: str, trainer) -> list:
    manager = PlansManager(plans)
    return [stock_build(manager, config),
            trainer.build_network_architecture(manager, manager.get_configuration(config), 1, CLASSES, True)]


def test_hand_edited_umamba_plans_are_honoured(dataset):
    plans = plans_for(dataset, "umamba_bot", "2d")
    cfg = plans["configurations"]["2d"]
    cfg.update(patch_size=[32, 40], batch_size=5)
    cfg["architecture"]["arch_kwargs"].update(
        n_stages=3, features_per_stage=[8, 16, 24], kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]],
        n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1], input_size=[32, 40])
    for network in both_routes(plans, "2d", nnUNetTrainerUMambaBot):
        assert network.encoder.output_channels == [8, 16, 24]
        assert output_shapes(network, [32, 40])[0] == (32, 40)
    assert PlansManager(plans).get_configuration("2d").batch_size == 5  # what both trainers read


@pytest.mark.parametrize("name,config,trainer,edit,check", [
    ("segresmamba", "3d_fullres", nnUNetTrainerSegResMamba, {"encoder_width": 4, "decoder_width": 8},
     lambda n: n.encoder.stem.out_channels == 4),
    ("swin_umamba", "2d", nnUNetTrainerSwinUMambaScratch, {"depths": [1, 1, 1, 1]},
     lambda n: [len(layer.blocks) for layer in n.vssm_encoder.layers] == [1, 1, 1, 1]),
    ("vim_unet_small", "2d", nnUNetTrainerViMUNetSmall, {"depth": 2, "input_size": [32, 48]},
     lambda n: len(n.encoder.layers) == 2 and n.encoder.grid_size == (2, 3)),
])
def test_hand_edited_fixed_architecture_plans_are_honoured(dataset, name, config, trainer, edit, check):
    plans = plans_for(dataset, name, config)
    cfg = plans["configurations"][config]
    cfg["architecture"]["arch_kwargs"].update(edit)
    if "input_size" in edit:
        cfg["patch_size"] = edit["input_size"]
    for network in both_routes(plans, config, trainer):
        assert check(network)


def test_bad_edits_fail_when_built_naming_the_field(dataset):
    plans = plans_for(dataset, "umamba_bot", "2d")
    cfg = plans["configurations"]["2d"]
    arch = cfg["architecture"]["arch_kwargs"]
    # a patch the strides cannot take (total stride 8): both routes, with the allowed values
    bad = copy.deepcopy(plans)
    bad["configurations"]["2d"].update(patch_size=[44, 64])
    bad["configurations"]["2d"]["architecture"]["arch_kwargs"]["input_size"] = [44, 64]
    for build in (lambda: both_routes(bad, "2d", nnUNetTrainerUMambaBot)[0],
                  lambda: both_routes(bad, "2d", nnUNetTrainerUMambaBot)[1]):
        with pytest.raises(ValueError, match=r"patch_size \(input_size\) \[44, 64\].*multiple of the total stride "
                                             r"\[8, 8\].*e\.g\. \[48, 64\]"):
            build()
    # the patch edited, input_size forgotten: our trainers say which fields must agree
    stale = copy.deepcopy(plans)
    stale["configurations"]["2d"]["patch_size"] = [32, 64]
    manager = PlansManager(stale)
    with pytest.raises(ValueError, match=r"input_size=\[48, 64\] differs from patch_size=\[32, 64\]"):
        nnUNetTrainerUMambaBot.build_network_architecture(manager, manager.get_configuration("2d"), 1, CLASSES, True)
    # per-stage lists that do not match n_stages
    arch["features_per_stage"] = [16, 32]
    with pytest.raises(ValueError, match="features_per_stage must have 4 entries"):
        stock_build(PlansManager(plans), "2d")
    # a fixed architecture's strides
    swin = plans_for(dataset, "swin_umamba", "2d")
    swin["configurations"]["2d"]["architecture"]["arch_kwargs"]["strides"] = [[1, 1], [2, 2], [2, 2]]
    with pytest.raises(ValueError, match=r"strides must be \[\[1, 1\], \[2, 2\], \[2, 2\], \[2, 2\], \[4, 4\]\]"):
        stock_build(PlansManager(swin), "2d")
    # plans for one network given to another network's trainer
    manager = PlansManager(plans_for(dataset, "umamba_bot", "2d"))
    with pytest.raises(ValueError, match=r"written for umamba_bot.*nnunet-mamba plan --arch umamba_enc"):
        nnUNetTrainerUMambaEnc.build_network_architecture(manager, manager.get_configuration("2d"), 1, CLASSES, True)


def test_benchmark_prints_the_estimate_next_to_the_measurement(dataset, capsys):
    path = plan_for_network(dataset, "umamba_bot", ["2d"], log=lambda _: None)
    assert main(["benchmark", "umamba_bot", "--plans", path, "-c", "2d", "--steps", "1", "--warmup", "0",
                 "--device", "cpu", "--estimate"]) == 0
    header, row = capsys.readouterr().out.splitlines()[-2:]
    assert "est GiB" in header
    assert row.split()[0] == "umamba_bot" and 0 < float(row.split()[-3]) < 1
