"""Plain helpers shared by the test modules (fixtures live in conftest.py). Imported as ``import helpers``:
pytest's default import mode puts tests/ on sys.path, as running a test file as a script does."""
from __future__ import annotations

import json
import os
import pydoc
import re
import subprocess
import sys

import torch
from torch import nn

BIN = os.path.dirname(sys.executable)  # the console scripts of the Python that runs the tests
E2E_TRAINERS = os.path.join(os.path.dirname(__file__), "e2e_trainers")  # the end-to-end tests' short trainers
REFERENCE = os.path.join(os.path.dirname(__file__), "reference")
PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
CLASS_KEYS = ["conv_op", "norm_op", "dropout_op", "nonlin"]  # the arch_kwargs nnU-Net resolves to classes
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 4,
                "file_ending": ".nii.gz"}
TINY_SWIN_UMAMBA_D = {"depths": [1, 1, 1, 1], "embed_dim": 8, "d_state": 4}  # a Swin-UMamba† that trains in seconds


def load_manifest(name: str) -> dict:
    """tests/reference/<name>.json: a network as the original code builds it (constructor config, parameter count,
    state-dict keys, output shapes); the README's "Parameter counts equal the original implementations" paragraph
    gives the figures."""
    with open(os.path.join(REFERENCE, f"{name}.json")) as f:
        return json.load(f)


def manifest_kwargs(manifest: dict) -> dict:
    """The manifest's constructor config with class paths resolved, as nnU-Net resolves plans."""
    config = dict(manifest["config"])
    for key in CLASS_KEYS:
        if isinstance(config.get(key), str):
            config[key] = pydoc.locate(config[key])
    return config


def assert_manifest_output_shapes(network: nn.Module, manifest: dict) -> None:
    """The network's outputs, with deep supervision and without, have the manifest's shapes (a list of outputs
    with it, one tensor without); deep supervision is left on."""
    try:
        for deep_supervision in (True, False):
            expected = manifest[f"output_shapes_deep_supervision_{deep_supervision}"]
            network.decoder.deep_supervision = deep_supervision
            with torch.no_grad():
                out = network(torch.randn(expected["input"]))
            assert isinstance(out, list) == deep_supervision
            assert [list(o.shape) for o in (out if deep_supervision else [out])] == expected["outputs"]
    finally:
        network.decoder.deep_supervision = True


def distinct_ss2d(d_model: int = 16, d_state: int = 16) -> nn.Module:
    """A float64 SS2D (seeded) whose four directions' parameters clearly differ, so that a direction mixed up with
    another shows."""
    from nnunet_mamba.layers.vss import SS2D

    torch.manual_seed(0)
    m = SS2D(d_model, d_state=d_state).double()
    with torch.no_grad():
        m.A_logs.add_(torch.rand_like(m.A_logs))
        m.Ds.copy_(torch.randn_like(m.Ds))
    return m


def relative_error(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference ``b`` (at least ``floor``),
    in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def scan_inputs(batch: int, dim: int, length: int, n: int, groups: int | None = None,
                dtype: torch.dtype = torch.float64, seed: int = 0, draw_dtype: torch.dtype | None = None) -> dict:
    """Random selective-scan inputs (u, delta, A, B, C, D, z, delta_bias) on the CPU; B and C grouped when ``groups``
    is set. Drawn in ``draw_dtype`` (default ``dtype``); the sequences are cast to ``dtype``, while A, D and
    delta_bias stay in ``draw_dtype`` (the kernels take their parameters in float32 whatever the input dtype)."""
    draw_dtype = draw_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    shape_bc = (batch, n, length) if groups is None else (batch, groups, n, length)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=draw_dtype)  # noqa: E731
    return dict(
        u=rand(batch, dim, length).to(dtype),
        delta=(0.5 * rand(batch, dim, length)).to(dtype),
        A=-(torch.rand(dim, n, generator=g, dtype=draw_dtype) * 2 + 0.1),
        B=rand(*shape_bc).to(dtype),
        C=rand(*shape_bc).to(dtype),
        D=rand(dim),
        z=rand(batch, dim, length).to(dtype),
        delta_bias=rand(dim),
    )


def plain_unet_arch(dim: int, features, n_conv: int = 2) -> dict:
    """nnU-Net's plans arch_kwargs (class paths as strings) for a PlainConvUNet with len(features) stages of
    stride 2."""
    n = len(features)
    return {"n_stages": n, "features_per_stage": list(features), "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [[3] * dim] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
            "n_conv_per_stage": [n_conv] * n, "n_conv_per_stage_decoder": [n_conv] * (n - 1), "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


def plans_configuration(patch, arch_kwargs: dict, network_class_name: str = PLAIN_CONV_UNET,
                        kw_requires_import: list | None = None, batch_size: int = 2, median=None,
                        data_identifier: str = "x") -> dict:
    """An nnU-Net 2.8 plans configuration, as nnUNetv2_plan_and_preprocess writes it (``median`` defaults to the
    patch; the class-path keys are resolved for the PlainConvUNet unless ``kw_requires_import`` says otherwise)."""
    dim = len(patch)
    return {"data_identifier": data_identifier, "preprocessor_name": "DefaultPreprocessor",
            "batch_size": batch_size, "patch_size": list(patch),
            "median_image_size_in_voxels": list(patch if median is None else median),
            "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {},
            "batch_dice": True,  # nnU-Net's 2D default; under DDP the Dice loss then all-gathers across ranks
            "architecture": {"network_class_name": network_class_name, "arch_kwargs": arch_kwargs,
                             "_kw_requires_import": list(CLASS_KEYS if kw_requires_import is None
                                                         else kw_requires_import)}}


def nnunet_plans(configurations: dict, shape) -> dict:
    """An nnU-Net 2.8 plans dict holding ``configurations`` (name: configuration) for images of ``shape`` (its length
    is the number of axes). ``continue_training`` is the key nnUNetTrainer's constructor pops."""
    dim = len(shape)
    return {"dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1.0] * dim, "original_median_shape_after_transp": list(shape),
            "image_reader_writer": "SimpleITKIO", "transpose_forward": list(range(dim)),
            "transpose_backward": list(range(dim)), "configurations": configurations,
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}, "continue_training": False}


def manifest_plans(manifest_name: str, patch_size) -> dict:
    """nnU-Net 2.8 plans whose configuration "cfg" carries the architecture of a reference manifest."""
    config = load_manifest(manifest_name)["config"]
    arch_kwargs = {k: config[k] for k in ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                                          "n_conv_per_stage", "n_conv_per_stage_decoder", "conv_bias", "norm_op",
                                          "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin",
                                          "nonlin_kwargs")}
    return nnunet_plans({"cfg": plans_configuration(patch_size, arch_kwargs)}, patch_size)


def tiny_swin_umamba_d_plans(patch, batch_size: int) -> dict:
    """Plans as `nnunet-mamba plan --arch swin_umamba_d` writes them, with the tiny encoder TINY_SWIN_UMAMBA_D."""
    configuration = plans_configuration(patch, dict(TINY_SWIN_UMAMBA_D),
                                        "nnunet_mamba.networks.swin_umamba.SwinUMambaD", kw_requires_import=[],
                                        batch_size=batch_size)
    return nnunet_plans({"cfg": configuration}, patch)


def fake_vmamba_checkpoint() -> dict:
    """A VMamba-style checkpoint (its key names) for TINY_SWIN_UMAMBA_D's encoder, the same in every process."""
    from nnunet_mamba.networks import SwinUMambaD
    torch.manual_seed(1234)
    encoder = {k[len("vssm_encoder."):]: v for k, v in SwinUMambaD(1, 3, **TINY_SWIN_UMAMBA_D).state_dict().items()
               if k.startswith("vssm_encoder.")}
    return {"model": {re.sub(r"^downsamples\.(\d+)\.", r"layers.\1.downsample.", k): v + 0.01 * torch.randn_like(v)
                      for k, v in encoder.items()}}


def tiny_plan(dim: int, widths=(4, 6, 8, 8)) -> dict:
    """A tiny nnU-Net style U-Net layout (4 stages, total stride 8) as constructor kwargs."""
    return dict(n_stages=len(widths), features_per_stage=list(widths), conv_op=nn.Conv3d if dim == 3 else nn.Conv2d,
                kernel_sizes=[[3] * dim] * len(widths), strides=[[1] * dim] + [[2] * dim] * (len(widths) - 1))


def tiny_network_kwargs(name: str, dim: int = 2, size: tuple = (32, 32)) -> dict:
    """Constructor kwargs of the smallest ``name`` network that still has all of its parts, for inputs of ``size``
    (total stride 8 for the networks sized by plans, 16 for ViM-UNet, 32 for Swin-UMamba and SegResMamba)."""
    if name.startswith("flemme_"):
        return dict(tiny_plan(dim), num_blocks=1, middle_depth=1)
    if name.startswith("umamba_"):
        kwargs = dict(tiny_plan(dim), n_conv_per_stage=[1] * 4, n_conv_per_stage_decoder=[1] * 3, conv_bias=True,
                      norm_op=nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d, norm_op_kwargs={"affine": True},
                      nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
        return dict(kwargs, input_size=size) if name == "umamba_enc" else kwargs  # Bot's Mamba takes any size
    if name == "swin_umamba":
        return dict(depths=(1, 1, 1, 1), embed_dim=16, stem_channels=8)
    if name == "swin_umamba_d":
        return dict(depths=(1, 1, 1, 1), embed_dim=16)
    if name == "segresmamba":
        return dict(encoder_width=4, decoder_width=8, d_state=4)
    if name.startswith("vim_unet_"):
        return dict(embed_dim=16, depth=2, input_size=size)
    raise KeyError(f"no tiny configuration for {name}: add one in tests/helpers.py")


def nnunet(work, *command: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``command`` in a fresh shell after the README's one-liner (eval "$(nnunet-mamba env)", which keeps the
    tests' trainer folder E2E_TRAINERS), with nnU-Net's folders under ``work`` and one process per step; fails the
    test, showing the output's ends, if it fails."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results"), "nnUNet_extTrainer": E2E_TRAINERS, "nnUNet_def_n_proc": "1",
           "nnUNet_n_proc_DA": "0", **(extra_env or {})}
    script = 'eval "$(nnunet-mamba env)" && ' + " ".join(command)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result
