"""Swin-UMamba trainers: optimiser, schedule and the frozen-encoder epochs (nnU-Net's data handling not involved)."""
import math

import pytest
import torch

pytest.importorskip("nnunetv2")
from nnunet_mamba.networks import SwinUMambaD  # noqa: E402
from nnunet_mamba.trainers import nnUNetTrainerSwinUMambaD, nnUNetTrainerSwinUMambaDScratch  # noqa: E402


def trainer_with(cls, num_epochs=20):
    # nnU-Net's __init__ needs a preprocessed dataset on disk; these tests only exercise our optimiser logic,
    # so set the attributes it reads by hand
    trainer = object.__new__(cls)
    torch.manual_seed(0)
    trainer.network = SwinUMambaD(1, 2, deep_supervision=False, depths=(1, 1, 1, 1), embed_dim=8)
    trainer.num_epochs, trainer.current_epoch = num_epochs, 0
    trainer.initial_lr, trainer.weight_decay = 1e-4, 5e-2
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    return trainer


def train_step(trainer):
    before = {n: p.detach().clone() for n, p in trainer.network.named_parameters()}
    trainer.optimizer.zero_grad()
    trainer.network(torch.randn(2, 1, 32, 32)).square().mean().backward()
    trainer.optimizer.step()
    return {n for n, p in trainer.network.named_parameters() if not torch.equal(before[n], p)}


def test_encoder_is_frozen_for_the_first_epochs_then_trained():
    trainer = trainer_with(nnUNetTrainerSwinUMambaD)
    encoder = {n for n, _ in trainer.network.named_parameters()
               if n.startswith("vssm_encoder.") and not n.startswith("vssm_encoder.patch_embed.")}
    assert encoder
    for epoch in (0, 9):  # the original's 10 frozen epochs, also when resuming in the middle of them
        trainer.current_epoch = epoch
        changed = train_step(trainer)
        assert not changed & encoder, f"epoch {epoch}: frozen encoder parameters changed"
        assert "vssm_encoder.patch_embed.proj.weight" in changed and any(n.startswith("decoder.") for n in changed)
    trainer.current_epoch = 10
    changed = train_step(trainer)
    assert encoder <= changed


def test_frozen_gradients_are_zero_when_nnunet_clips_and_gone_at_the_step():
    # nnU-Net clips the gradient norm between backward and the optimizer step: as with the original's
    # requires_grad=False, the frozen encoder must not count there (zeros), and AdamW must then skip it (None)
    trainer = trainer_with(nnUNetTrainerSwinUMambaD)
    frozen = trainer.network.pretrained_encoder_parameters()
    trainer.network(torch.randn(2, 1, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and not p.grad.any() for p in frozen)
    trainer.optimizer.step()
    assert all(p.grad is None for p in frozen) and not any(trainer.optimizer.state.get(p) for p in frozen)
    trainer.current_epoch = 10
    trainer.optimizer.zero_grad()
    trainer.network(torch.randn(2, 1, 32, 32)).square().mean().backward()
    assert all(p.grad is not None for p in frozen) and any(p.grad.any() for p in frozen)


def test_scratch_trainer_never_freezes():
    trainer = trainer_with(nnUNetTrainerSwinUMambaDScratch)
    assert all(p.requires_grad for p in trainer.network.parameters())
    changed = train_step(trainer)
    assert any(n.startswith("vssm_encoder.layers.") for n in changed)


def test_adamw_with_cosine_annealing_to_1e_6():
    trainer = trainer_with(nnUNetTrainerSwinUMambaD, num_epochs=20)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.defaults["eps"] == 1e-5 and trainer.optimizer.defaults["weight_decay"] == 5e-2
    lrs = []
    for epoch in range(21):
        trainer.lr_scheduler.step(epoch)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[10] == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert lrs[20] == pytest.approx(1e-6)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert not math.isnan(sum(lrs))


def test_pretrained_loading_is_logged_as_counts_not_key_lists(tmp_path, monkeypatch):
    """The training log says how many ImageNet tensors were loaded, on one short line (it once listed all 204 keys)."""
    import nnunet_mamba.trainers.swin_umamba as swin_trainers
    from helpers import DATASET_JSON, fake_vmamba_checkpoint, tiny_swin_umamba_d_plans

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    preprocessed = tmp_path / "nnUNet_preprocessed" / "Dataset001_X" / "x"
    preprocessed.mkdir(parents=True)
    (preprocessed / "case_000.b2nd").touch()  # initialize() only infers the dataset class from the file endings
    checkpoint = fake_vmamba_checkpoint()
    monkeypatch.setattr(swin_trainers, "load_pretrained_state_dict", lambda name: checkpoint)
    plans = tiny_swin_umamba_d_plans((32, 32), batch_size=2)
    trainer = swin_trainers.nnUNetTrainerSwinUMambaD(plans, "cfg", 0, DATASET_JSON, device=torch.device("cpu"))
    trainer.initialize()
    with open(trainer.log_file) as f:
        lines = [line for line in f if "ImageNet weights" in line]
    assert len(lines) == 1
    assert f"{len(checkpoint['model'])} tensors loaded" in lines[0]
    assert len(lines[0]) < 300 and "vssm_encoder" not in lines[0] and "layers.0" not in lines[0]
