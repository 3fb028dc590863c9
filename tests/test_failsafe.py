"""A new user's first days (issue 16): every case fails with a clear message naming the fix, nothing runs code from a
file without an explicit opt-in, nothing is left behind after SIGTERM, and the CLI starts without torch."""
import http.server
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_mamba.checkpoints import CheckpointError, load_checkpoint_file
from nnunet_mamba.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]


class _CreatesMarker:
    """Unpickling this creates the marker file: the stand-in for a malicious ``__reduce__`` (``os.system``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _nnunet_checkpoint(weights: dict, **extra) -> dict:
    """The structure of nnU-Net 2.8's nnUNetTrainer.save_checkpoint, with its logger's numpy scalars."""
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    logger = LocalLogger()  # what nnU-Net's MetaLogger.get_checkpoint returns
    for epoch in range(2):
        for key, value in (("mean_fg_dice", np.float64(0.5)),  # also logs ema_fg_dice
                           ("dice_per_class_or_region", [np.float64(0.5), np.float32(0.25)]),
                           ("train_losses", np.float64(-0.3)), ("val_losses", np.float32(-0.2)), ("lrs", 0.01),
                           ("epoch_start_timestamps", time.time()), ("epoch_end_timestamps", time.time())):
            logger.log(key, value, epoch)
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([parameter], lr=0.01, momentum=0.99, nesterov=True)
    parameter.grad = torch.ones(3)
    optimizer.step()
    return {"network_weights": weights, "optimizer_state": optimizer.state_dict(), "grad_scaler_state": None,
            "logging": logger.get_checkpoint(), "_best_ema": np.float64(0.4), "current_epoch": 2,
            "init_args": {"plans": {"a": 1}, "configuration": "2d", "fold": 0, "dataset_json": {},
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainerUMambaBot", "inference_allowed_mirroring_axes": (0, 1), **extra}


def test_nnunet_checkpoints_load_without_opt_in(tmp_path, capsys):
    path = tmp_path / "checkpoint_final.pth"
    torch.save(_nnunet_checkpoint({"w": torch.ones(2)}), path)
    loaded = load_checkpoint_file(path)
    assert loaded["_best_ema"] == np.float64(0.4) and loaded["logging"]["mean_fg_dice"] == [0.5, 0.5]
    assert torch.equal(loaded["network_weights"]["w"], torch.ones(2))
    assert "weights_only=False" not in capsys.readouterr().err


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_import_checkpoint_never_unpickles_without_opt_in(zip_format, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NNUNET_MAMBA_TRUST_PICKLE", raising=False)
    marker = tmp_path / "marker"
    path = tmp_path / "checkpoint_final.pth"
    torch.save(_nnunet_checkpoint({"w": torch.ones(2)}, payload=_CreatesMarker(marker)), path,
               _use_new_zipfile_serialization=zip_format)
    assert main(["import-checkpoint", str(path), str(tmp_path / "out.pth")]) == 1
    err = capsys.readouterr().err
    assert not marker.exists()
    # the global it would have called is named (protocol 2 reaches Path.touch through builtins.getattr)
    assert "refusing to unpickle" in err and ("pathlib" in err or "getattr" in err)
    assert "--trust-pickle" in err and "NNUNET_MAMBA_TRUST_PICKLE=1" in err
    assert "truncated or corrupt" not in err and "weights_only` set to `False`" not in err
    # the opt-in really is what unpickles it (and then the file is judged on its content)
    monkeypatch.setenv("NNUNET_MAMBA_TRUST_PICKLE", "1")
    main(["import-checkpoint", str(path), str(tmp_path / "out.pth")])
    assert marker.exists() and "because NNUNET_MAMBA_TRUST_PICKLE=1 is set" in capsys.readouterr().err


def test_pickle_with_os_system_is_refused(tmp_path):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": Evil()}))  # a plain pickle, not even a torch.save file
    with pytest.raises(CheckpointError, match=r"\((posix|os)\.system\); refusing to unpickle"):
        load_checkpoint_file(path)
    assert not marker.exists()


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # 1 MB announced, 1 kB every 50 ms: long enough to be killed mid-download
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        try:
            for _ in range(1 << 10):
                self.wfile.write(b"x" * 1024)
                self.wfile.flush()
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def test_sigterm_during_download_leaves_nothing(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    folder = tmp_path / "weights"
    script = (
        "import dataclasses, sys\n"
        "from nnunet_mamba.cli import main\n"
        "from nnunet_mamba.networks import VMAMBA_TINY, load_vmamba_encoder, register_pretrained\n"
        f"register_pretrained('swin_umamba', dataclasses.replace(VMAMBA_TINY, name='slow', "
        f"urls=('http://127.0.0.1:{server.server_port}/w.pth',)), load_vmamba_encoder)\n"
        f"sys.exit(main(['download-weights', 'slow', '--dir', {str(folder)!r}]))\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.time() + 120
        # ours (.NAME.PID.*.partial) and torch.hub's inside it, which has received bytes
        while time.time() < deadline and not any(p.stat().st_size > 0 for p in folder.glob(".*.partial")):
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
        assert any(folder.glob(".*.partial")), "the download never started"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        server.shutdown()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM)" in err
    assert not folder.exists()  # no .partial file, and the folder this run created is gone too


def test_env_with_a_bad_backend_still_exports(capsys, monkeypatch):
    monkeypatch.setenv("NNUNET_MAMBA_BACKEND", "nonsense")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("export nnUNet_extTrainer=")
    assert "# selective scan: ERROR: NNUNET_MAMBA_BACKEND='nonsense' is not one of" in out
    assert all(line.startswith(("#", "export ")) for line in out.splitlines())


@pytest.mark.parametrize("argv", [["--help"], ["env", "--exports"]])
def test_fast_commands_import_neither_torch_nor_timm(argv):
    code = ("import sys\nfrom nnunet_mamba.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'timm', 'nnunetv2') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code, *argv], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    if argv[0] == "env":
        assert result.stdout.startswith("export nnUNet_extTrainer=") and len(result.stdout.splitlines()) == 1
    else:
        assert all(name in result.stdout for name in COMMANDS)


def test_each_command_registers_the_help_the_listing_shows():
    for name, (_, help_text) in COMMANDS.items():
        sub = next(a for a in build_parser(name)._actions if a.dest == "command")
        shown = {action.dest: action.help for action in sub._choices_actions}
        assert shown[name] == help_text, name
    benchmark = next(a for a in build_parser("benchmark")._actions if a.dest == "command").choices["benchmark"]
    assert next(a for a in benchmark._actions if a.dest == "device").help


def test_list_aligns_names_and_says_how_to_fix_the_trainer_lookup(capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", "")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    networks = out.split("trainers")[0].splitlines()[1:]
    from nnunet_mamba import list_networks

    width = max(map(len, list_networks()))
    assert len(networks) == len(list_networks()) and all(line[2 + width] == " " and line[3 + width] in "23"
                                                         for line in networks)
    assert "Could not find requested nnunet trainer" in out and 'eval "$(nnunet-mamba env --exports)"' in out


def test_segresmamba_too_small_patch_stops_at_network_build():
    """Before nnU-Net starts its data loaders (whose EOFError was the last line users saw)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from helpers import manifest_plans

    from nnunet_mamba.trainers import nnUNetTrainerSegResMamba

    plans = manifest_plans("umamba_enc_3d_plan128", (32, 32, 32))
    plans["configurations"]["cfg"]["architecture"]["arch_kwargs"].update(
        n_stages=4, strides=[[1] * 3] + [[2] * 3] * 3)
    manager = PlansManager(plans)
    with pytest.raises(ValueError, match=r"SegResMamba trains on patches larger than 32 voxels"):
        nnUNetTrainerSegResMamba.build_network_architecture(manager, manager.get_configuration("cfg"), 1, 2, True)


def test_prediction_refuses_nan_input():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from helpers import manifest_plans

    from nnunet_mamba.trainers import nnUNetTrainerUMambaBot
    from nnunet_mamba.networks.base import refuse_nan_input

    manager = PlansManager(manifest_plans("umamba_bot_2d_plan320", (320, 320)))
    network = nnUNetTrainerUMambaBot.build_network_architecture(manager, manager.get_configuration("cfg"), 1, 3,
                                                                False).eval()
    image = torch.zeros(1, 1, 320, 320)
    image[0, 0, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"input holds 1 NaN values .*Replace them in the image"):
        network(image)
    assert refuse_nan_input(network.train(), (image,)) is None  # training data: nnU-Net's integrity check


def test_demo_checks_the_trainer_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match=r"did you mean nnUNetTrainerUMambaBot"):
        main(["demo", "--trainer", "nnUNetTrainerUMambaBott", "--folder", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()


def test_demo_shows_progress_and_keeps_the_log_of_a_failed_step(tmp_path, capsys, monkeypatch):
    from nnunet_mamba.cli import demo

    fake = tmp_path / "fake_nnunet"
    fake.write_text("#!/bin/sh\necho '2026-01-01 00:00:00.000000: Epoch 0'\necho noise\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(demo, "nnunet_command", lambda name: str(fake))
    monkeypatch.setattr(demo.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "demo_work"))
    assert main(["demo", "--device", "cpu", "--size", "32", "--cases", "5"]) == 3
    captured = capsys.readouterr()
    assert "demo:       Epoch 0" in captured.out and "noise" not in captured.out
    log = tmp_path / "demo_work" / "demo.log"
    assert f"full log (kept): {log}" in captured.err
    assert "noise" in log.read_text()


def test_importing_the_networks_prints_no_timm_warning():
    result = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", "import nnunet_mamba.networks"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "FutureWarning" not in result.stderr
