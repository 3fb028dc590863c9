"""Pretrained-weight registry, download-weights and verification, on a synthetic VMamba-T checkpoint (CPU, offline:
downloads use file:// URLs)."""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import stat
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from nnunet_mamba import pretrained
from nnunet_mamba.checkpoints import CheckpointError
from nnunet_mamba.cli import main as cli_main
from nnunet_mamba.networks import create_network, get_network_spec, get_pretrained_spec
from nnunet_mamba.networks.weights import WEIGHTS_DIR_ENV, verify_checkpoint
from nnunet_mamba.pretrained import DownloadError, download_weights, load_pretrained_state_dict, weights_path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((REPO / "tests/reference/vmamba_tiny_v0_checkpoint.json").read_text())
NAME = "vmamba-tiny"
SPEC = get_pretrained_spec(NAME)


def use_spec(monkeypatch, spec) -> None:
    """Let the networks that take the weights know them as ``spec`` for this test."""
    for network in ("swin_umamba", "swin_umamba_d"):
        attached = get_network_spec(network).pretrained
        monkeypatch.setitem(attached, NAME, dataclasses.replace(attached[NAME], spec=spec))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    return OrderedDict((key, torch.randn(shape)) for key, shape in REFERENCE["state_dict"])


def save_checkpoint(path: Path, model, **extra) -> Path:
    """A Swin-style training checkpoint: the weights under 'model' plus training state."""
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
                "lr_scheduler": {"last_epoch": 292}, "epoch": 292, "max_accuracy": 82.2, **extra}, path)
    return path


@pytest.fixture(scope="module")
def good_file(state_dict, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("source") / "vmamba.pth", state_dict)


def cli(*argv: str) -> int:
    return cli_main(["download-weights", *argv])


def assert_nothing_installed(folder: Path) -> None:
    """Neither the final file nor a leftover temporary file."""
    assert not (folder / SPEC.file_name).exists()
    assert not folder.exists() or list(folder.iterdir()) == []


def test_manifest_matches_reference():
    assert [[k, list(s)] for k, s in SPEC.expected_shapes.items()] == REFERENCE["state_dict"]
    assert len(SPEC.expected_shapes) == REFERENCE["num_tensors"] == 212
    assert sum(math.prod(s) for s in SPEC.expected_shapes.values()) == REFERENCE["num_values"]
    assert SPEC.file_name == REFERENCE["file_name"]
    assert list(SPEC.urls) == REFERENCE["source_urls"]
    assert SPEC.model_key == "model" and SPEC.sha256 is None


def test_from_file_installs_verified_copy(good_file, state_dict, tmp_path, capsys):
    folder = tmp_path / "weights"
    assert cli(NAME, "--from-file", str(good_file), "--dir", str(folder)) == 0
    out = capsys.readouterr().out
    final = folder / SPEC.file_name
    assert [p.name for p in folder.iterdir()] == [SPEC.file_name]  # no temporary file left
    assert sha256(final) == sha256(good_file)
    assert str(final) in out and f"sha256: {sha256(good_file)}" in out
    # the synthetic file is not the published one; the reported digest is shown as a difference, not enforced
    assert "differs from the digest reported" in out
    assert stat.S_IMODE(final.stat().st_mode) == 0o644
    loaded = load_pretrained_state_dict(NAME, weights_dir=folder)
    assert list(loaded) == list(state_dict)
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)
    # Present already: kept (and verified) without --force.
    assert cli(NAME, "--from-file", str(good_file), "--dir", str(folder)) == 0
    assert "already present" in capsys.readouterr().err


def test_create_network_loads_the_weights_its_spec_names(good_file, state_dict, tmp_path):
    folder = tmp_path / "weights"
    assert cli(NAME, "--from-file", str(good_file), "--dir", str(folder)) == 0
    assert list(get_network_spec("swin_umamba_d").pretrained) == [NAME]
    network = create_network("swin_umamba_d", pretrained=True, weights_dir=folder, input_channels=3, num_classes=2)
    key = "layers.0.blocks.0.self_attention.x_proj_weight"
    assert torch.equal(network.state_dict()[f"vssm_encoder.{key}"], state_dict[key])
    assert SPEC.first_conv == "patch_embed.proj" and "head.weight" in SPEC.classifier
    with pytest.raises(ValueError, match="takes the pretrained weights vmamba-tiny, not 'other'"):
        create_network("swin_umamba_d", pretrained="other", weights_dir=folder, input_channels=3, num_classes=2)
    with pytest.raises(ValueError, match="has no pretrained weights"):
        create_network("segresmamba", pretrained=True, input_channels=1, num_classes=2, encoder_width=4,
                       decoder_width=4)
    with pytest.raises(FileNotFoundError, match="nnunet-mamba download-weights vmamba-tiny"):
        create_network("swin_umamba", pretrained=True, weights_dir=tmp_path / "empty", input_channels=1,
                       num_classes=2)


def test_download_tries_each_url(good_file, tmp_path, monkeypatch, capsys):
    missing = (tmp_path / "missing.pth").as_uri()
    use_spec(monkeypatch, dataclasses.replace(SPEC, urls=(missing, good_file.as_uri())))
    path = download_weights(NAME, weights_dir=tmp_path / "w", progress=False)
    assert path == tmp_path / "w" / SPEC.file_name and sha256(path) == sha256(good_file)
    assert [p.name for p in (tmp_path / "w").iterdir()] == [SPEC.file_name]
    err = capsys.readouterr().err
    assert f"downloading {missing}" in err and "failed:" in err


def test_download_with_no_good_url_names_each_failure(good_file, tmp_path, monkeypatch):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good_file.read_bytes()[:1_000_000])
    urls = ((tmp_path / "missing.pth").as_uri(), truncated.as_uri())
    use_spec(monkeypatch, dataclasses.replace(SPEC, urls=urls))
    with pytest.raises(DownloadError) as info:
        download_weights(NAME, weights_dir=tmp_path / "w", progress=False)
    message = str(info.value)
    assert all(url in message for url in urls) and "truncated or corrupt" in message and "--from-file" in message
    assert_nothing_installed(tmp_path / "w")


def test_pinned_sha256_is_enforced(good_file, tmp_path, monkeypatch):
    good = sha256(good_file)
    use_spec(monkeypatch, dataclasses.replace(SPEC, urls=(good_file.as_uri(),), sha256=good))
    assert sha256(download_weights(NAME, weights_dir=tmp_path / "ok", progress=False)) == good

    wrong = "0" * 64
    use_spec(monkeypatch, dataclasses.replace(SPEC, urls=(good_file.as_uri(),), sha256=wrong))
    with pytest.raises(DownloadError, match="invalid hash value"):
        download_weights(NAME, weights_dir=tmp_path / "url", progress=False)
    assert_nothing_installed(tmp_path / "url")
    with pytest.raises(CheckpointError, match="sha256"):
        download_weights(NAME, weights_dir=tmp_path / "file", from_file=good_file)
    assert_nothing_installed(tmp_path / "file")


def _bad_files(folder: Path, good_file: Path, state_dict) -> dict:
    """name -> (file, a snippet its error must contain)."""
    truncated = folder / "truncated.pth"
    truncated.write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 2])
    garbage = folder / "garbage.pth"
    garbage.write_bytes(b"<html>404 Not Found</html>")
    foreign = folder / "foreign.pth"  # an nnU-Net checkpoint, say
    torch.save({"network_weights": {"encoder.stem.0.weight": torch.zeros(2)}, "trainer_name": "nnUNetTrainer"},
               foreign)
    not_a_dict = folder / "list.pth"
    torch.save(list(state_dict.values())[:3], not_a_dict)
    first = next(iter(state_dict))
    wrong_shape = save_checkpoint(folder / "wrong_shape.pth",
                                  {**state_dict, first: torch.zeros(97, 3, 4, 4)})
    missing = save_checkpoint(folder / "missing.pth", {k: v for k, v in state_dict.items() if k != first})
    extra = save_checkpoint(folder / "extra.pth", {**state_dict, "head.extra.weight": torch.zeros(1)})
    return {
        "truncated": (truncated, "truncated or corrupt"),
        "garbage": (garbage, "truncated or corrupt"),
        "foreign": (foreign, "no 'model' entry (top-level keys: network_weights, trainer_name)"),
        "not_a_dict": (not_a_dict, "holds a list"),
        "wrong_shape": (wrong_shape, f"1 with wrong shape: {first} (97, 3, 4, 4) != (96, 3, 4, 4)"),
        "missing": (missing, f"1 missing: {first}"),
        "extra": (extra, "1 unexpected: head.extra.weight"),
    }


def test_bad_files_are_rejected_and_never_installed(good_file, state_dict, tmp_path, capsys):
    bad = _bad_files(tmp_path, good_file, state_dict)
    for case, (path, snippet) in bad.items():
        folder = tmp_path / f"w_{case}"
        assert cli(NAME, "--from-file", str(path), "--dir", str(folder)) == 1, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and snippet in err and str(path) in err, (case, err)
        assert_nothing_installed(folder)

    # A bad replacement (--force) leaves the good file that was there untouched.
    folder = tmp_path / "w_keep"
    assert cli(NAME, "--from-file", str(good_file), "--dir", str(folder)) == 0
    assert cli(NAME, "--from-file", str(bad["truncated"][0]), "--dir", str(folder), "--force") == 1
    assert sha256(folder / SPEC.file_name) == sha256(good_file)
    assert [p.name for p in folder.iterdir()] == [SPEC.file_name]
    # A bad file under the final name (copied by hand) is reported, with the way out.
    (folder / SPEC.file_name).write_bytes(bad["truncated"][0].read_bytes())
    assert cli(NAME, "--dir", str(folder)) == 1
    assert "--force" in capsys.readouterr().err


def test_pickled_objects_need_trust(state_dict, tmp_path, capsys):
    path = save_checkpoint(tmp_path / "args.pth", state_dict, args=argparse.Namespace(lr=1e-3))
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace.*--trust-pickle"):
        verify_checkpoint(path, SPEC)
    assert cli(NAME, "--from-file", str(path), "--dir", str(tmp_path / "w")) == 1
    assert_nothing_installed(tmp_path / "w")
    assert cli(NAME, "--from-file", str(path), "--dir", str(tmp_path / "w"), "--trust-pickle") == 0
    assert "weights_only=False because --trust-pickle was given" in capsys.readouterr().err


def test_yacs_config_loads_without_yacs_code(state_dict, tmp_path, monkeypatch, capsys):
    """Early uploads pickle the yacs training config beside 'model': accepted without --trust-pickle or yacs."""
    from yacs.config import CfgNode  # a dependency of nnU-Net

    config = CfgNode({"MODEL": CfgNode({"TYPE": "vssm", "VSSM": CfgNode({"DEPTHS": [2, 2, 9, 2]})})})
    config.freeze()
    path = save_checkpoint(tmp_path / "with_config.pth", state_dict, config=config)
    for module in ("yacs", "yacs.config"):  # importing yacs now fails
        monkeypatch.setitem(sys.modules, module, None)
    loaded = verify_checkpoint(path, SPEC)
    assert list(loaded) == list(state_dict)
    assert "weights_only=False" not in capsys.readouterr().err


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained_state_dict(NAME)
    message = str(info.value)
    assert "nnunet-mamba download-weights vmamba-tiny\n" in message
    assert "nnunet-mamba download-weights vmamba-tiny --from-file PATH" in message
    assert str(tmp_path / "empty" / SPEC.file_name) in message
    with pytest.raises(FileNotFoundError, match=r"download-weights vmamba-tiny --dir /some/where --from-file PATH"):
        load_pretrained_state_dict(NAME, weights_dir="/some/where")


def test_weights_folder_env_var_and_defaults(good_file, tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    # the user cache, also for a source checkout (an editable install must not fill the checkout with weights)
    checkout = tmp_path / "checkout"
    (checkout / "pretrained").mkdir(parents=True)
    monkeypatch.setattr(pretrained, "__file__", str(checkout / "nnunet_mamba" / "pretrained.py"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights_path(NAME) == tmp_path / "home" / ".cache" / "nnunet_mamba" / SPEC.file_name

    moved = tmp_path / "moved"
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(moved))
    assert weights_path(NAME) == moved / SPEC.file_name
    assert cli(NAME, "--from-file", str(good_file)) == 0
    assert (moved / SPEC.file_name).is_file()
    assert len(load_pretrained_state_dict(NAME)) == 212
    assert weights_path(NAME, tmp_path / "explicit") == tmp_path / "explicit" / SPEC.file_name  # --dir wins


def test_standalone_script(good_file, tmp_path):
    env = {**os.environ, WEIGHTS_DIR_ENV: str(tmp_path / "w")}
    result = subprocess.run([sys.executable, str(REPO / "pretrained" / "download_weights.py"), NAME,
                             "--from-file", str(good_file)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"sha256: {sha256(good_file)}" in result.stdout
    assert (tmp_path / "w" / SPEC.file_name).is_file()
    result = subprocess.run([sys.executable, str(REPO / "pretrained" / "download_weights.py"), NAME,
                             "--from-file", str(tmp_path / "nope.pth"), "--force"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "no such file" in result.stderr


def test_trusted_install_loads_in_the_trainer_route_with_the_env_var(state_dict, tmp_path, monkeypatch, capsys):
    """A file installed with --trust-pickle: nnUNetv2_train cannot take the flag, so the variable opts in there."""
    monkeypatch.delenv("NNUNET_MAMBA_TRUST_PICKLE", raising=False)
    path = save_checkpoint(tmp_path / "args.pth", state_dict, args=argparse.Namespace(lr=1e-3))
    assert cli(NAME, "--from-file", str(path), "--dir", str(tmp_path / "w"), "--trust-pickle") == 0
    with pytest.raises(CheckpointError, match="NNUNET_MAMBA_TRUST_PICKLE=1 for nnUNetv2_train"):
        load_pretrained_state_dict(NAME, tmp_path / "w")  # what the Swin-UMamba trainers call
    monkeypatch.setenv("NNUNET_MAMBA_TRUST_PICKLE", "1")
    assert len(load_pretrained_state_dict(NAME, tmp_path / "w")) == 212
    assert "because NNUNET_MAMBA_TRUST_PICKLE=1 is set" in capsys.readouterr().err


def test_from_file_is_compared_with_an_installed_file(good_file, state_dict, tmp_path, capsys):
    folder = tmp_path / "w"
    assert cli(NAME, "--from-file", str(good_file), "--dir", str(folder)) == 0
    assert cli(NAME, "--from-file", str(good_file), "--dir", str(folder)) == 0  # the same file: nothing to do
    other = save_checkpoint(tmp_path / "other.pth", state_dict, epoch=1)
    capsys.readouterr()
    assert cli(NAME, "--from-file", str(other), "--dir", str(folder)) == 1
    err = capsys.readouterr().err
    assert "differs from --from-file" in err and "--force" in err
    assert sha256(folder / SPEC.file_name) == sha256(good_file)
    assert cli(NAME, "--from-file", str(other), "--dir", str(folder), "--force") == 0
    assert sha256(folder / SPEC.file_name) == sha256(other)


@pytest.mark.parametrize("seed", [13, 22, 3, 5])  # torch's restricted unpickler: IndexError, KeyError, Unicode...
def test_random_bytes_are_refused_cleanly(seed, tmp_path, capsys):
    source = tmp_path / "random.pth"
    source.write_bytes(np_bytes(seed))
    assert cli(NAME, "--from-file", str(source), "--dir", str(tmp_path / "new" / "w")) == 1
    err = capsys.readouterr().err
    assert "not a readable PyTorch checkpoint (truncated or corrupt?)" in err and "weights_only" not in err
    assert not (tmp_path / "new").exists()  # the folders this install created are gone again


def np_bytes(seed: int) -> bytes:
    import numpy as np

    return np.random.RandomState(seed).bytes(1000)


def test_stale_partial_files_are_removed_by_the_next_install(good_file, tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    dead = folder / f".{SPEC.file_name}.999999999.abc.partial"  # a pid no process has (above pid_max)
    dead.write_bytes(b"x" * 100)
    alive = folder / f".{SPEC.file_name}.{os.getpid()}.abc.partial"  # a running install's: kept
    alive.write_bytes(b"x")
    assert cli(NAME, "--from-file", str(good_file), "--dir", str(folder)) == 0
    assert not dead.exists() and alive.exists()
