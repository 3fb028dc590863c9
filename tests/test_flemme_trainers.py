"""Flemme trainers: SeM without deep supervision, H-SeM with the pyramid loss (checked against a hand computation)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("nnunetv2")
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform  # noqa: E402

from nnunet_mamba.networks import create_network  # noqa: E402
from nnunet_mamba.trainers import (list_trainers, nnUNetTrainerFlemmeMambaU, nnUNetTrainerFlemmeMambaU_HSeM,  # noqa: E402
                                   nnUNetTrainerFlemmeUNet_HSeM)
from nnunet_mamba.trainers.flemme import PYRAMID_LAMBDA_ENV, pyramid_loss_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ENCODERS = ("ResNet", "UNet", "CAttenU", "SwinU", "MambaU")


def small_kwargs(dim: int) -> dict:
    return {"n_stages": 4, "features_per_stage": [4, 8, 16, 16], "conv_op": nn.Conv2d if dim == 2 else nn.Conv3d,
            "strides": [[1] * dim] + [[2] * dim] * 3}


def loss_trainer(cls, network: nn.Module):
    """A trainer with just what nnU-Net's ``_build_loss`` reads (its __init__ needs a preprocessed dataset)."""
    trainer = object.__new__(cls)
    trainer.network = network
    trainer.enable_deep_supervision = True
    trainer.is_ddp = False
    trainer.device = torch.device("cpu")  # nnU-Net's _build_loss asks _do_i_compile, which looks at it
    trainer.label_manager = SimpleNamespace(has_regions=False, ignore_label=None)
    trainer.configuration_manager = SimpleNamespace(batch_dice=True, patch_size=[24, 40])
    trainer.print_to_log_file = lambda *args, **kwargs: None
    return trainer


def hand_dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """nnU-Net's Dice+CE written out: cross-entropy plus minus the batch soft Dice of the foreground classes."""
    labels = target[:, 0].long()
    probabilities = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1)[:, 1:].float()
    axes = [0] + list(range(2, logits.dim()))
    tp = (probabilities * onehot).sum(axes)
    dice = (2 * tp + 1e-5) / (probabilities.sum(axes) + onehot.sum(axes) + 1e-5)
    return F.cross_entropy(logits, labels) - dice.mean()


def test_pyramid_weights():
    assert pyramid_loss_weights(4, 1.0) == [1.0, 0.25, 0.25, 0.25, 0.25]
    assert pyramid_loss_weights(2, 0.5) == [1.0, 0.25, 0.25]
    with pytest.raises(ValueError, match="at least one side"):
        pyramid_loss_weights(0, 1.0)


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_hsem_pyramid_loss_equals_the_hand_computation(lam, monkeypatch):
    monkeypatch.setenv(PYRAMID_LAMBDA_ENV, str(lam))
    torch.manual_seed(0)
    network = create_network("flemme_mambau_hsem", input_channels=1, num_classes=3, deep_supervision=True,
                             **small_kwargs(2))
    trainer = loss_trainer(nnUNetTrainerFlemmeMambaU_HSeM, network)
    outputs = network(torch.randn(2, 1, 24, 40))
    # nnU-Net's own target down-sampling, per case (1, x, y), then batched
    transform = DownsampleSegForDSTransform(trainer._get_deep_supervision_scales())
    cases = [transform._apply_to_segmentation(torch.randint(0, 3, (1, 24, 40)).float()) for _ in range(2)]
    targets = [torch.stack(per_scale) for per_scale in zip(*cases)]
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(t.shape[2:]) for t in targets]
    assert len(outputs) == 4  # fused + sides at 1/2, 1/4 and the bottleneck's 1/8

    loss = trainer._build_loss()(outputs, targets)
    sides = [hand_dice_ce(o, t) for o, t in zip(outputs[1:], targets[1:])]
    expected = hand_dice_ce(outputs[0], targets[0]) + lam * sum(sides) / len(sides)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_pyramid_lambda_from_the_environment_must_be_a_number(monkeypatch):
    trainer = loss_trainer(nnUNetTrainerFlemmeUNet_HSeM, None)
    monkeypatch.delenv(PYRAMID_LAMBDA_ENV, raising=False)
    assert trainer.pyramid_weight == 1.0
    monkeypatch.setenv(PYRAMID_LAMBDA_ENV, "half")
    with pytest.raises(ValueError, match="is not a number"):
        trainer.pyramid_weight


def test_sem_trainers_build_single_output_networks_from_the_plans():
    from helpers import manifest_plans  # the U-Mamba 2D plan of the reference manifest
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(manifest_plans("umamba_bot_2d_plan320", (128, 128)))
    config = plans.get_configuration("cfg")
    network = nnUNetTrainerFlemmeMambaU.build_network_architecture(plans, config, 2, 4, False)
    assert type(network).__name__ == "FlemmeMambaU"
    # stages and widths from the plans (7 stages, [32, 64, 128, 256, 512, 512, 512], strides 2)
    layout = network.layout
    assert layout.patch_channels == 32 and layout.patch_stride == (2, 2)
    assert layout.level_channels == (64, 128, 256, 512, 512) and layout.middle_channels == (512, 512)
    assert network.encoder.patch_embed.proj.in_channels == 2
    with torch.no_grad():
        out = network(torch.zeros(1, 2, 128, 128))
    assert out.shape == (1, 4, 128, 128)


def test_every_encoder_has_a_sem_and_an_hsem_trainer():
    names = set(list_trainers())
    for encoder in ENCODERS:
        assert f"nnUNetTrainerFlemme{encoder}" in names and f"nnUNetTrainerFlemme{encoder}_HSeM" in names
    assert "nnUNetTrainerFlemmeSeM" not in names and "nnUNetTrainerFlemmeHSeM" not in names
