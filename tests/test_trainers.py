import copy

import pytest
import torch

from helpers import load_manifest, manifest_plans

pytest.importorskip("nnunetv2")
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from nnunet_mamba.trainers import nnUNetTrainerUMambaBot, nnUNetTrainerUMambaEnc  # noqa: E402


@pytest.mark.parametrize("trainer,manifest_name,patch", [
    (nnUNetTrainerUMambaBot, "umamba_bot_2d_plan320", (320, 320)),
    (nnUNetTrainerUMambaEnc, "umamba_enc_2d_plan320", (320, 320)),
    (nnUNetTrainerUMambaEnc, "umamba_enc_3d_plan128", (128, 128, 128)),
])
def test_build_network_architecture_uses_the_plans(trainer, manifest_name, patch):
    plans = PlansManager(manifest_plans(manifest_name, patch))
    before = copy.deepcopy(plans.plans)
    network = trainer.build_network_architecture(plans, plans.get_configuration("cfg"), 1, 14, True)
    assert sum(p.numel() for p in network.parameters()) == load_manifest(manifest_name)["num_params"]
    assert network.decoder.deep_supervision
    assert plans.plans == before


def test_hand_edited_plans_are_honoured():
    plans_dict = manifest_plans("umamba_bot_2d_plan320", (320, 320))
    arch = plans_dict["configurations"]["cfg"]["architecture"]["arch_kwargs"]
    arch.update(n_stages=5, features_per_stage=[16, 32, 64, 128, 256], kernel_sizes=[[3, 3]] * 5,
                strides=[[1, 1]] + [[2, 2]] * 4, n_conv_per_stage=[1] * 5, n_conv_per_stage_decoder=[1] * 4)
    plans = PlansManager(plans_dict)
    network = nnUNetTrainerUMambaBot.build_network_architecture(plans, plans.get_configuration("cfg"), 3, 2, False)
    assert network.encoder.output_channels == [16, 32, 64, 128, 256]
    assert network(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_bad_plans_edit_names_the_field():
    plans_dict = manifest_plans("umamba_bot_2d_plan320", (320, 320))
    plans_dict["configurations"]["cfg"]["architecture"]["arch_kwargs"]["features_per_stage"] = [32, 64]
    plans = PlansManager(plans_dict)
    with pytest.raises(ValueError, match="features_per_stage must have 7 entries"):
        nnUNetTrainerUMambaBot.build_network_architecture(plans, plans.get_configuration("cfg"), 1, 2, True)


def test_resenc_plans_block_counts_are_accepted():
    plans_dict = manifest_plans("umamba_bot_2d_plan320", (320, 320))
    arch = plans_dict["configurations"]["cfg"]["architecture"]["arch_kwargs"]
    arch["n_blocks_per_stage"] = arch.pop("n_conv_per_stage")
    plans = PlansManager(plans_dict)
    network = nnUNetTrainerUMambaBot.build_network_architecture(plans, plans.get_configuration("cfg"), 1, 14, True)
    assert sum(p.numel() for p in network.parameters()) == 47533012


def test_amp_dtype_from_the_environment(monkeypatch):
    from nnunet_mamba.trainers.base import AMP_DTYPE_ENV, amp_dtype

    monkeypatch.delenv(AMP_DTYPE_ENV, raising=False)
    assert amp_dtype() is torch.float16
    monkeypatch.setenv(AMP_DTYPE_ENV, "bf16")
    assert amp_dtype() is torch.bfloat16
    monkeypatch.setenv(AMP_DTYPE_ENV, "BFloat16")
    assert amp_dtype() is torch.bfloat16
    monkeypatch.setenv(AMP_DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match="NNUNET_MAMBA_AMP_DTYPE='fp8'"):
        amp_dtype()
