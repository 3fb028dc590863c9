"""Importing models trained with the original U-Mamba / Swin-UMamba code (synthetic checkpoints, CPU)."""
import copy
import hashlib
import json
import os
import pydoc
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import nnunet_mamba
from nnunet_mamba.checkpoints import (CheckpointError, check_state_dict, convert_checkpoint,
                                      convert_swin_umamba_state_dict, convert_umamba_state_dict, state_dict_mismatch)
from nnunet_mamba.cli import main as cli_main

REFERENCE = Path(__file__).resolve().parent / "reference"
UMAMBA = json.loads((REFERENCE / "umamba_bot_2d_plan320.json").read_text())
SWIN = json.loads((REFERENCE / "swin_umamba_in1_cls14.json").read_text())
DUP = "decoder.encoder."
MODEL = "nnUNetTrainerUMambaBot__nnUNetPlans__2d"


def network_config() -> dict:
    """The manifest's constructor arguments, class names resolved."""
    config = dict(UMAMBA["config"])
    for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
        if isinstance(config[key], str):
            config[key] = pydoc.locate(config[key])
    return config


def old_schema_plans() -> dict:
    """plans.json as the original repositories' nnU-Net (2.2 era) wrote it for this network."""
    c = UMAMBA["config"]
    return {
        "dataset_name": "Dataset999_Synthetic", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [999.0, 1.0, 1.0],
        "original_median_shape_after_transp": [1, 320, 320],
        "image_reader_writer": "NaturalImage2DIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"2d": {
            "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 12,
            "patch_size": [320, 320], "median_image_size_in_voxels": [320.0, 320.0], "spacing": [1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 32, "unet_max_num_features": 512,
            "n_conv_per_stage_encoder": c["n_conv_per_stage"],
            "n_conv_per_stage_decoder": c["n_conv_per_stage_decoder"],
            "num_pool_per_axis": [6, 6], "pool_op_kernel_sizes": c["strides"], "conv_kernel_sizes": c["kernel_sizes"],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "batch_dice": True}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 255.0, "mean": 100.0, "median": 100.0,
                                                              "min": 0.0, "percentile_00_5": 1.0,
                                                              "percentile_99_5": 250.0, "std": 50.0}},
    }


DATASET_JSON = {"channel_names": {"0": "image"}, "labels": {"background": 0, **{f"c{i}": i for i in range(1, 14)}},
                "numTraining": 4, "file_ending": ".png"}


# Entries that are one tensor under two names, in the original and in ours: decoder.encoder.* (the original
# decoder's reference to the encoder) and nnU-Net's ConvDropoutNormReLU, which also lists conv and norm in all_modules.
TIES = (("decoder.encoder.", "encoder."), (".all_modules.0.", ".conv."), (".all_modules.1.", ".norm."))


def original_state_dict(shapes, real: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """A state dict in the original layout, tied entries sharing one tensor as in a real one.
    ``real=False`` gives zero-stride tensors (right shapes, no memory) for key-level tests."""
    torch.manual_seed(0)
    state = OrderedDict((key, None) for key, _ in shapes)
    for key, shape in shapes:
        if not any(tied in key for tied, _ in TIES):
            state[key] = torch.randn(shape) if real else torch.zeros(()).expand(shape)
    for key in state:
        if state[key] is None:
            twin = key
            for tied, owner in TIES:
                twin = owner + twin[len(tied):] if tied == DUP and twin.startswith(DUP) else twin.replace(tied, owner)
            state[key] = state[twin]
    return state


def original_checkpoint(state_dict, trainer_name: str = "nnUNetTrainerUMambaBot") -> dict:
    """What the original repositories' nnUNetTrainer.save_checkpoint writes."""
    dice = [np.float64(0.5)]
    return {
        "network_weights": state_dict,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-2, "momentum": 0.99, "params": [0, 1, 2]}]},
        "grad_scaler_state": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                              "growth_interval": 2000, "_growth_tracker": 0},
        "logging": {"mean_fg_dice": dice, "ema_fg_dice": dice, "dice_per_class_or_region": [dice * 13],
                    "train_losses": [-0.5], "val_losses": [-0.4], "lrs": [1e-2],
                    "epoch_start_timestamps": [0.0], "epoch_end_timestamps": [1.0]},
        "_best_ema": np.float64(0.5), "current_epoch": 1000,
        "init_args": {"plans": old_schema_plans(), "configuration": "2d", "fold": 0, "dataset_json": DATASET_JSON,
                      "unpack_dataset": True, "device": torch.device("cuda")},
        "trainer_name": trainer_name, "inference_allowed_mirroring_axes": (0, 1),
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An original-format model folder: returns (folder, the checkpoint's state dict)."""
    folder = tmp_path_factory.mktemp("original") / MODEL
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(old_schema_plans(), indent=4))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON, indent=4))
    (folder / "dataset_fingerprint.json").write_text(json.dumps({"spacings": [[999.0, 1.0, 1.0]]}))
    (folder / "fold_0" / "training_log.txt").write_text("epoch 999\n")
    (folder / "fold_0" / "progress.png").write_bytes(b"\x89PNG fake")
    state = original_state_dict(UMAMBA["state_dict"])
    torch.save(original_checkpoint(state), folder / "fold_0" / "checkpoint_final.pth")
    return folder, state


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# --- conversion logic, no files ---------------------------------------------------------------------------------

def test_umamba_duplicates_are_dropped_after_checking():
    shared, other = torch.randn(3), torch.randn(2)
    state = {"encoder.a": shared, "decoder.encoder.a": shared.clone(), "decoder.stages.0": other}
    converted = convert_umamba_state_dict(state)
    assert list(converted) == ["encoder.a", "decoder.stages.0"] and converted["encoder.a"] is shared
    with pytest.raises(CheckpointError, match=r"1 differ from their encoder\.\* twin: decoder\.encoder\.a"):
        convert_umamba_state_dict({**state, "decoder.encoder.a": shared + 1})
    with pytest.raises(CheckpointError, match=r"1 have no encoder\.\* twin: decoder\.encoder\.b"):
        convert_umamba_state_dict({**state, "decoder.encoder.b": shared})


def test_umamba_manifest_keys_convert_to_our_layout():
    converted = convert_umamba_state_dict(original_state_dict(UMAMBA["state_dict"], real=False))
    ours = [(k, s) for k, s in UMAMBA["state_dict"] if not k.startswith(DUP)]
    assert len(ours) == 479 - 160
    check_state_dict(converted, dict(ours), "converted")


def test_checkpoint_conversion():
    original = original_checkpoint(original_state_dict(UMAMBA["state_dict"], real=False))
    before = copy.deepcopy({k: v for k, v in original.items() if k != "network_weights"})
    converted = convert_checkpoint(original)
    assert "unpack_dataset" not in converted["init_args"]
    assert converted["init_args"] == {k: v for k, v in before["init_args"].items() if k != "unpack_dataset"}
    assert converted["trainer_name"] == "nnUNetTrainerUMambaBot"
    assert not any(k.startswith(DUP) for k in converted["network_weights"])
    for key in ("optimizer_state", "grad_scaler_state", "logging", "_best_ema", "current_epoch",
                "inference_allowed_mirroring_axes"):
        assert converted[key] == before[key]
    # the input is untouched
    assert original["init_args"]["unpack_dataset"] is True and len(original["network_weights"]) == 479
    # idempotent; NoAMP models are plain Enc models; an explicit name wins
    assert list(convert_checkpoint(converted)["network_weights"]) == list(converted["network_weights"])
    assert convert_checkpoint({**original, "trainer_name": "nnUNetTrainerUMambaEncNoAMP"})["trainer_name"] == \
        "nnUNetTrainerUMambaEnc"
    assert convert_checkpoint(original, "nnUNetTrainerUMambaBot_demo")["trainer_name"] == "nnUNetTrainerUMambaBot_demo"


def test_foreign_checkpoints_are_refused():
    with pytest.raises(CheckpointError, match="no network_weights, init_args, trainer_name"):
        convert_checkpoint({"model": {}, "epoch": 3})
    with pytest.raises(CheckpointError, match="'nnUNetTrainer' is not one of"):
        convert_checkpoint({**original_checkpoint({}), "trainer_name": "nnUNetTrainer"})
    with pytest.raises(CheckpointError, match="a list"):
        convert_checkpoint([1, 2])


def test_swin_umamba_weights_are_kept_heads_renamed_and_checked():
    state = OrderedDict((k, torch.zeros(()).expand(s)) for k, s in SWIN["state_dict"])
    converted = convert_checkpoint(original_checkpoint(state, "nnUNetTrainerSwinUMambaScratch"))
    assert converted["trainer_name"] == "nnUNetTrainerSwinUMambaScratch"
    renamed = [k.replace("out_layers.", "decoder.seg_layers.", 1) if k.startswith("out_layers.") else k for k in state]
    assert list(converted["network_weights"]) == renamed
    assert sum(k.startswith("out_layers.") for k in state) == 8  # 4 heads, weight and bias
    assert all(converted["network_weights"][new] is state[old] for old, new in zip(state, renamed))
    # nnU-Net's -pretrained_weights skips keys containing .seg_layers.: every tensor that depends on the classes
    assert [k for k in converted["network_weights"] if ".seg_layers." in k] == renamed[-8:]
    # our network's layout (tests/test_swin_umamba.py checks it against the converted manifest)
    check_state_dict(converted["network_weights"], dict(zip(renamed, (s for _, s in SWIN["state_dict"]))),
                     "Swin-UMamba")
    assert list(convert_checkpoint(converted)["network_weights"]) == renamed  # idempotent
    with pytest.raises(CheckpointError, match="both its original and our name"):
        convert_swin_umamba_state_dict({"out_layers.0.conv.conv.bias": torch.zeros(2),
                                        "decoder.seg_layers.0.conv.conv.bias": torch.zeros(2)})


def test_mismatch_messages_count_and_list():
    expected = {f"k{i}": (2,) for i in range(10)}
    state = {f"k{i}": torch.zeros(3) for i in range(8)}
    state["extra"] = torch.zeros(1)
    message = state_dict_mismatch(state, expected)
    assert "2 missing: k8, k9" in message and "1 unexpected: extra" in message
    assert "8 with wrong shape: k0 (3,) != (2,)" in message and "(3 more)" in message
    assert state_dict_mismatch({"a": torch.zeros(2)}, {"a": [2]}) is None
    assert "1 not tensors: a" in state_dict_mismatch({"a": [0, 0]}, {"a": (2,)})


# --- the command, on files --------------------------------------------------------------------------------------

def test_model_folder_import_loads_in_our_network_and_in_nnunet(source, tmp_path, monkeypatch, capsys):
    folder, state = source
    before = snapshot(folder)
    results = tmp_path / "nnUNet_results" / "Dataset999_Synthetic"
    assert cli_main(["import-checkpoint", str(folder), str(results)]) == 0
    model = results / MODEL
    out = capsys.readouterr().out
    assert f"imported: {model}" in out and f"-m {model} -f 0" in out
    assert sorted(p.name for p in results.iterdir()) == [MODEL]  # no temporary folder left
    assert set(snapshot(model)) == set(before)  # every file is there
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json", "fold_0/progress.png"):
        assert (model / name).read_bytes() == (folder / name).read_bytes()

    checkpoint = load(model / "fold_0" / "checkpoint_final.pth")
    assert "unpack_dataset" not in checkpoint["init_args"] and checkpoint["init_args"]["configuration"] == "2d"
    assert checkpoint["trainer_name"] == "nnUNetTrainerUMambaBot" and checkpoint["current_epoch"] == 1000
    weights = checkpoint["network_weights"]
    assert len(weights) == 479 - 160 and not any(k.startswith(DUP) for k in weights)

    network = nnunet_mamba.create_network("umamba_bot", **network_config())
    network.load_state_dict(weights, strict=True)
    loaded = network.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in weights)

    # What nnUNetv2_predict does with the folder, trainer found through nnUNet_extTrainer.
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_mamba.cli.environment import trainer_shim_dir
    monkeypatch.setenv("nnUNet_extTrainer", trainer_shim_dir())
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,))
    assert type(predictor.network).__name__ == "UMambaBot"
    assert torch.equal(predictor.network.state_dict()["encoder.stem.0.conv1.weight"],
                       state["encoder.stem.0.conv1.weight"])

    assert snapshot(folder) == before  # the source is never modified
    assert cli_main(["import-checkpoint", str(folder), str(results)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err


def test_checkpoint_file_import(source, tmp_path, capsys):
    folder, _ = source
    src = folder / "fold_0" / "checkpoint_final.pth"
    before = snapshot(folder)
    assert cli_main(["import-checkpoint", str(src), str(tmp_path)]) == 0  # into a folder, same file name
    converted = load(tmp_path / src.name)
    assert "unpack_dataset" not in converted["init_args"]
    assert not any(k.startswith(DUP) for k in converted["network_weights"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]
    assert snapshot(folder) == before
    assert cli_main(["import-checkpoint", str(src), str(tmp_path / src.name)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["import-checkpoint", str(src), str(tmp_path / "x.pth"), "--trainer", "nnUNetTrainerNope"]) == 1
    err = capsys.readouterr().err
    assert "'nnUNetTrainerNope' is not provided by nnunet_mamba" in err and "nnUNetTrainerUMambaEnc" in err
    assert not (tmp_path / "x.pth").exists()


def test_failed_import_leaves_nothing(source, tmp_path, capsys):
    folder, _ = source
    src = tmp_path / "src" / MODEL
    shutil.copytree(folder, src, ignore=shutil.ignore_patterns("*.pth"))
    good = folder / "fold_0" / "checkpoint_final.pth"
    try:
        os.link(good, src / "fold_0" / good.name)
    except OSError:
        shutil.copyfile(good, src / "fold_0" / good.name)
    (src / "fold_1").mkdir()
    torch.save({"model": {"w": torch.zeros(1)}}, src / "fold_1" / "checkpoint_final.pth")  # converted second
    results = tmp_path / "results"
    assert cli_main(["import-checkpoint", str(src), str(results)]) == 1
    err = capsys.readouterr().err
    assert "converted fold_0/checkpoint_final.pth" in err
    assert f"error: {src / 'fold_1' / 'checkpoint_final.pth'}: not an nnU-Net checkpoint" in err
    assert list(results.iterdir()) == []

    assert cli_main(["import-checkpoint", str(src), str(src.parent)]) == 1  # would replace the source
    assert "is the source or inside it" in capsys.readouterr().err
    assert cli_main(["import-checkpoint", str(tmp_path / "nothing"), str(results)]) == 1
    assert cli_main(["import-checkpoint", str(results), str(tmp_path / "r2")]) == 1
    assert "not an nnU-Net model folder: no plans.json" in capsys.readouterr().err
