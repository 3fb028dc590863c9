"""Multi-GPU training (``nnUNetv2_train ... -num_gpus 2``) without GPUs: two CPU processes, gloo, nnU-Net's DDP.

Each process builds a real Swin-UMamba-dagger trainer (nnU-Net's ``__init__`` and ``initialize``: plans, batch size
split, network, our optimiser and encoder freezing, SyncBatchNorm conversion, the DDP wrapper without
``find_unused_parameters``, the DDP variant of the loss, our ImageNet-encoder loading into the wrapped network) and
trains with nnU-Net's own ``train_step`` on rank-dependent data: frozen-encoder epochs, a checkpoint saved by rank 0
and loaded by both ranks, then unfrozen epochs. After every step the parameters must be identical on both ranks,
the frozen encoder bit-identical to the loaded weights while everything else trains, and the encoder must train
once unfrozen. Two deviations from a GPU run, both outside what is tested: the device is the CPU (nnU-Net forces
``cuda:<rank>`` under DDP, and hands DDP ``device_ids``, which CPU modules refuse), so no autocast and a disabled
GradScaler.
"""
import json
import os
import re
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import DATASET_JSON, fake_vmamba_checkpoint, tiny_swin_umamba_d_plans

pytest.importorskip("nnunetv2")

WORLD_SIZE = 2
PATCH = (32, 32)
# (epoch, steps): frozen epochs 0 and 1 (a checkpoint is saved and loaded after epoch 0), a jump to the last frozen
# epoch 9 as when resuming, then the unfrozen epochs 10 and 11; the trainer freezes for its first 10 epochs
SCHEDULE = [(0, 2), (1, 1), (9, 1), (10, 2), (11, 1)]
FREEZE_EPOCHS = 10


def _all_equal_across_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(gathered[0], t) for t in gathered[1:])


def _flat(parameters) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in parameters])


def _worker(rank: int, work: str) -> None:
    os.environ.update(nnUNet_raw=os.path.join(work, "raw"), nnUNet_preprocessed=os.path.join(work, "preprocessed"),
                      nnUNet_results=os.path.join(work, "results"))
    os.environ.pop("nnUNet_compile", None)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(work, 'store')}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    try:
        _train(rank, work)
        # both ranks done with every collective before the group goes: tearing it down while the other rank's
        # last all_gather was in flight once aborted a rank ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train(rank: int, work: str) -> None:
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from torch.nn.parallel import DistributedDataParallel

    import nnunet_mamba.trainers.swin_umamba as swin_trainers

    class CPUDistributedDataParallel(DistributedDataParallel):
        # nnU-Net passes device_ids=[local_rank], which DDP accepts for CUDA modules only; everything else as given
        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__(module, **kwargs)

    nnunet_trainer_module.DDP = CPUDistributedDataParallel
    checkpoint = fake_vmamba_checkpoint()
    swin_trainers.load_pretrained_state_dict = lambda name: checkpoint  # instead of the downloaded weights file

    class Trainer(swin_trainers.nnUNetTrainerSwinUMambaD):  # the pretrained trainer: ImageNet encoder, frozen first
        pass

    assert Trainer.freeze_epochs == FREEZE_EPOCHS and Trainer.pretrained_weights
    plans = tiny_swin_umamba_d_plans(PATCH, batch_size=2 * WORLD_SIZE)
    trainer = Trainer(plans, "cfg", 0, DATASET_JSON, device=torch.device("cpu"))
    assert trainer.is_ddp and trainer.local_rank == rank
    trainer.device = torch.device("cpu")  # nnU-Net's __init__ sets cuda:<rank> under DDP
    trainer.initialize()

    # --- what initialize built
    assert isinstance(trainer.network, DistributedDataParallel)
    assert not trainer.network.find_unused_parameters
    network = trainer.unwrapped_network
    assert network is trainer.network.module
    assert trainer.batch_size == 2  # nnU-Net's split of the global batch size 4
    assert all(p.requires_grad for p in network.parameters())
    frozen = network.pretrained_encoder_parameters()
    frozen_ids = {id(p) for p in frozen}
    trained = [p for p in network.parameters() if id(p) not in frozen_ids]
    names = {id(p): n for n, p in network.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in trained} == {"vssm_encoder", "decoder"}  # patch embedding, decoder
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == set(names)
    # the ImageNet encoder went into the wrapped network, identically on both ranks
    loaded = {k: v for k, v in network.state_dict().items() if k.startswith("vssm_encoder.")}
    expected = checkpoint["model"]
    assert len(loaded) == len(expected)
    for key, value in loaded.items():
        source = re.sub(r"^downsamples\.(\d+)\.", r"layers.\1.downsample.", key[len("vssm_encoder."):])
        assert torch.equal(value, expected[source]), key
    assert _all_equal_across_ranks(_flat(network.parameters()))

    # nnU-Net's deep-supervision switch reaches the network through DDP's .module
    trainer.set_deep_supervision_enabled(False)
    assert not network.decoder.deep_supervision
    trainer.set_deep_supervision_enabled(True)
    assert network.decoder.deep_supervision

    # --- gradient clipping sees the gradients after DDP's all-reduce and before the optimizer step
    clipped = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        clipped["all_have_gradients"] = all(p.grad is not None for p in parameters)
        clipped["frozen_gradient_max"] = max(p.grad.abs().max().item() for p in frozen)
        clipped["trained_gradient_max"] = max(p.grad.abs().max().item() for p in trained)
        return real_clip(parameters, max_norm, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = recording_clip

    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as nnU-Net's loaders

    def batch():
        data = torch.randn(trainer.batch_size, 1, *PATCH, generator=generator)
        target = torch.randint(0, 3, (trainer.batch_size, 1, *PATCH), generator=generator).float()
        # the targets nnU-Net's DownsampleSegForDSTransform makes at the network's deep-supervision scales
        scales = trainer._get_deep_supervision_scales()
        assert [s[0] for s in scales] == [1, 1 / 4, 1 / 8, 1 / 16]
        return {"data": data, "target": [target[..., ::round(1 / s[0]), ::round(1 / s[1])] for s in scales]}

    start_frozen = _flat(frozen)
    log = []
    for epoch, steps in SCHEDULE:
        if epoch == 1:
            # rank 0 saves (epoch 0 done), both ranks resume from it, as `nnUNetv2_train ... --c` would
            trainer.current_epoch = 0
            trainer.save_checkpoint(os.path.join(work, "checkpoint.pth"))
            dist.barrier()
            trainer.load_checkpoint(os.path.join(work, "checkpoint.pth"))
            assert trainer.current_epoch == 1
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        frozen_now = epoch < FREEZE_EPOCHS
        assert trainer.encoder_frozen() == frozen_now
        for _ in range(steps):
            before_frozen, before_trained = _flat(frozen), _flat(trained)
            loss = float(trainer.train_step(batch())["loss"])
            losses = [None] * WORLD_SIZE
            dist.all_gather_object(losses, loss)
            assert losses[0] != losses[1], "the ranks saw the same data"
            assert clipped.pop("all_have_gradients"), "DDP left a parameter without a gradient"
            frozen_gradient_max = clipped.pop("frozen_gradient_max")
            assert clipped.pop("trained_gradient_max") > 0
            assert _all_equal_across_ranks(_flat(network.parameters())), f"epoch {epoch}: the ranks diverged"
            assert not torch.equal(_flat(trained), before_trained), f"epoch {epoch}: the decoder did not train"
            if frozen_now:
                assert frozen_gradient_max == 0, "the frozen encoder's gradients reached the gradient clipping"
                assert torch.equal(_flat(frozen), start_frozen), f"epoch {epoch}: the frozen encoder changed"
                assert all(not trainer.optimizer.state.get(p) for p in frozen), "AdamW kept state for it"
            else:
                assert frozen_gradient_max > 0
                after = [p.detach() for p in frozen]
                changed = [not torch.equal(a, b) for a, b in zip(after, torch.split(before_frozen,
                                                                                     [p.numel() for p in frozen]))]
                assert all(changed), f"epoch {epoch}: {changed.count(False)} unfrozen encoder tensors did not train"
            log.append({"epoch": epoch, "loss": loss, "frozen": frozen_now})
    torch.nn.utils.clip_grad_norm_ = real_clip
    with open(os.path.join(work, f"rank{rank}.json"), "w") as f:
        json.dump(log, f)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed (gloo)")
def test_two_process_ddp_training_with_frozen_encoder_epochs(tmp_path):
    preprocessed = tmp_path / "preprocessed" / "Dataset001_X" / "x"
    preprocessed.mkdir(parents=True)
    (preprocessed / "case_000.b2nd").touch()  # initialize() only infers the dataset class from the file endings
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=True)
    logs = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    steps = sum(steps for _, steps in SCHEDULE)
    assert [len(log) for log in logs] == [steps] * WORLD_SIZE
    assert [entry["frozen"] for entry in logs[0]] == [epoch < FREEZE_EPOCHS for epoch, n in SCHEDULE
                                                      for _ in range(n)]
