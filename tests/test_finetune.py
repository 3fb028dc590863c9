"""Fine-tuning with nnU-Net's ``-pretrained_weights`` and DNA's encoder hooks, for every registered network (tiny
configurations, CPU, in-process)."""
import pytest
import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from helpers import tiny_network_kwargs
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from torch import nn

from nnunet_mamba.networks import create_network, list_networks

# small networks: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

# dataset A: background + 2 labels; dataset B: background + 4 labels
CLASSES_A, CLASSES_B = 3, 5


def tiny(name: str, num_classes: int, input_channels: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_network(name, input_channels=input_channels, num_classes=num_classes, deep_supervision=True,
                          **tiny_network_kwargs(name))


def save_nnunet_checkpoint(network: nn.Module, path) -> None:
    """What nnUNetTrainer.save_checkpoint writes, as far as load_pretrained_weights reads it."""
    torch.save({"network_weights": network.state_dict()}, path)


def differing_shapes(a: nn.Module, b: nn.Module) -> set:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return {k for k in sa if sa[k].shape != sb[k].shape}


@pytest.mark.parametrize("name", list_networks())
def test_pretrained_weights_transfer_to_another_class_count(name, tmp_path):
    source, target = tiny(name, CLASSES_A, seed=0), tiny(name, CLASSES_B, seed=1)
    # every tensor that depends on the number of classes is under .seg_layers., which nnU-Net does not transfer
    class_dependent = differing_shapes(source, target)
    assert class_dependent and all(".seg_layers." in k for k in class_dependent)
    initial = {k: v.clone() for k, v in target.state_dict().items()}
    save_nnunet_checkpoint(source, tmp_path / "checkpoint_final.pth")
    load_pretrained_weights(target, str(tmp_path / "checkpoint_final.pth"))
    pretrained, loaded = source.state_dict(), target.state_dict()
    heads = [k for k in loaded if ".seg_layers." in k]
    assert all(torch.equal(loaded[k], initial[k]) for k in heads)  # the new heads keep their initialisation
    transferred = [k for k in loaded if k not in heads]
    assert all(torch.equal(loaded[k], pretrained[k]) for k in transferred)
    # the seeds differ, so a transfer that did nothing would show
    assert any(not torch.equal(initial[k], pretrained[k]) for k in transferred if initial[k].is_floating_point())


@pytest.mark.parametrize("name", list_networks())
def test_dna_encoder_hooks_name_real_modules(name):
    network = tiny(name, CLASSES_A)
    assert isinstance(network, AbstractDynamicNetworkArchitectures)
    keys = network.state_dict().keys()
    encoder = network.get_submodule(network.key_to_encoder)
    stem = network.get_submodule(network.key_to_stem)
    assert any(k.startswith(network.key_to_encoder + ".") for k in keys)
    assert not any(".seg_layers." in f"{network.key_to_encoder}.{k}" for k in encoder.state_dict())
    assert sum(p.numel() for p in stem.parameters()) > 0
    # keys_to_in_proj: exactly the modules whose weights read the image (their shapes follow the input channels)
    in_proj = {f"{k}.weight" for k in network.keys_to_in_proj}
    assert in_proj == differing_shapes(network, tiny(name, CLASSES_A, input_channels=2))
    assert all(network.get_submodule(k).weight.shape[1] == 1 for k in network.keys_to_in_proj)
    assert network.key_to_lpe is None or network.key_to_lpe in keys


@pytest.mark.parametrize("name", ["umamba_bot", "swin_umamba", "flemme_mambau_hsem"])
def test_another_input_channel_count_is_refused_as_nnunet_does(name, tmp_path):
    """nnU-Net 2.8.1's load_pretrained_weights needs every transferred tensor to keep its shape, so the input
    projections must match: a checkpoint for 1 channel does not load into a network for 2."""
    save_nnunet_checkpoint(tiny(name, CLASSES_A), tmp_path / "checkpoint_final.pth")
    with pytest.raises(AssertionError, match="The shape of the parameters of key"):
        load_pretrained_weights(tiny(name, CLASSES_B, input_channels=2), str(tmp_path / "checkpoint_final.pth"))
