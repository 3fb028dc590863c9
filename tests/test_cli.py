import importlib.util
import os
import subprocess
import sys

import pytest

from nnunet_mamba.cli import main
from nnunet_mamba.cli.environment import ext_trainer_value, trainer_shim_dir

BIN = os.path.dirname(sys.executable)


def run_shell(script: str, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=300)


def test_env_one_liner_lets_nnunet_find_our_trainers():
    # exactly the README's one-liner, in a fresh shell, then nnU-Net's own trainer lookup
    result = run_shell('eval "$(nnunet-mamba env)" && python -c "'
                       "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find;"
                       "print(find('nnUNetTrainerUMambaEnc').__module__)\"",
                       env={"nnUNet_extTrainer": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("nnunet_mamba.trainers.umamba")


def test_env_keeps_other_trainer_folders(tmp_path):
    value = ext_trainer_value(f"{tmp_path}{os.pathsep}{trainer_shim_dir()}")
    assert value.split(os.pathsep) == [trainer_shim_dir(), str(tmp_path)]
    assert os.path.isfile(os.path.join(trainer_shim_dir(), "nnunet_mamba_trainers.py"))


def test_env_reports_diagnostics(capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "export nnUNet_extTrainer=" in out
    assert "nnUNet_raw: NOT SET" in out
    assert "selective scan: NNUNET_MAMBA_BACKEND=" in out
    assert all(line.startswith(("#", "export ")) for line in out.splitlines())


def env_triton_status(tmp_path, block_triton: bool = False, interpret: bool = False) -> str:
    """What `nnunet-mamba env`, run in a fresh interpreter, says of the triton backend (its `# selective scan:` line
    from "triton backend " to the next backend), with triton made unimportable (a `triton` package that raises
    ImportError, first on the path) or run in Triton's interpreter."""
    import nnunet_mamba
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NNUNET_MAMBA_BACKEND")}
    paths = [os.path.dirname(os.path.dirname(nnunet_mamba.__file__)), env.get("PYTHONPATH")]  # the package tested
    if block_triton:
        (tmp_path / "triton").mkdir()
        (tmp_path / "triton" / "__init__.py").write_text('raise ImportError("triton blocked by the test")\n')
        paths.insert(0, str(tmp_path))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    script = "from nnunet_mamba.cli import main; raise SystemExit(main(['env']))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("# selective scan:")]
    assert "NNUNET_MAMBA_BACKEND=auto" in line and "triton backend " in line, line
    return line.split("triton backend ", 1)[1].split("; torch backend", 1)[0]


def test_env_reports_triton_unavailable_when_it_cannot_be_imported(tmp_path):
    status = env_triton_status(tmp_path, block_triton=True)
    assert status.startswith("unavailable (") and "triton blocked by the test" in status, status


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("interpret", [False, True], ids=["compiled", "interpreter"])
def test_env_reports_the_installed_triton(tmp_path, interpret):
    import torch
    status = env_triton_status(tmp_path, interpret=interpret)
    if interpret:  # the interpreter runs on any device
        assert status.startswith("available (Triton ") and "interpreter" in status, status
    elif torch.cuda.is_available():
        assert status.startswith("available (Triton "), status
    else:
        assert status.startswith("unavailable (") and "no CUDA device" in status, status


def test_list_names_networks_and_trainers(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("umamba_bot", "umamba_enc", "nnUNetTrainerUMambaBot", "nnUNetTrainerUMambaEnc"):
        assert name in out


def test_benchmark_runs_on_cpu(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    assert main(["benchmark", "plainconvunet", "umamba_bot", "--preset", "2d_320", "--patch", "128", "128",
                 "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "umamba_bot" in out and "plainconvunet" in out
    import json
    rows = json.loads(out_json.read_text())["rows"]
    assert rows[1]["params"] == 47533012 and rows[1]["step_ms"] > 0


def test_benchmark_writes_table_csv_and_plot_with_median_of_passes(capsys, tmp_path):
    prefix = str(tmp_path / "bench")
    assert main(["benchmark", "plainconvunet", "umamba_bot", "--preset", "2d_320", "--patch", "128", "128",
                 "--batch", "1", "--steps", "1", "--warmup", "0", "--device", "cpu", "--repeats", "3",
                 "--out", prefix]) == 0
    assert "median of 3 interleaved passes" in capsys.readouterr().out
    table = (tmp_path / "bench.md").read_text().splitlines()
    assert table[1].startswith("| network | params | GMACs/img | GFLOPs/img |") and len(table) == 5
    assert table[4].startswith("| umamba_bot | ")
    import csv
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert [r["network"] for r in rows] == ["plainconvunet", "umamba_bot"]
    assert float(rows[0]["step_ratio"]) == 1.0
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_all_takes_the_networks_of_the_plans_dimension():
    import argparse

    from nnunet_mamba.cli.benchmark import _networks
    from nnunet_mamba.networks import get_network_spec
    names_3d = _networks(argparse.Namespace(all=True, networks=[]), 3)
    assert names_3d[:3] == ["plainconvunet", "resenc_m", "resenc_l"]
    assert "segresmamba" in names_3d and "swin_umamba" not in names_3d
    assert all(3 in get_network_spec(n).dims for n in names_3d[3:])
    assert "swin_umamba" in _networks(argparse.Namespace(all=True, networks=[]), 2)


def test_benchmark_rejects_unknown_network():
    with pytest.raises(SystemExit, match="unknown network"):
        main(["benchmark", "no_such_net", "--device", "cpu"])


def test_benchmark_flemme_study_reports_times_relative_to_the_conv_network(capsys, tmp_path, monkeypatch):
    from nnunet_mamba.cli import benchmark_flemme

    monkeypatch.setitem(benchmark_flemme.FLEMME_STUDY, "sizes", [(2, 32)])
    monkeypatch.setitem(benchmark_flemme.FLEMME_STUDY, "num_blocks", [2])
    out_json = tmp_path / "flemme.json"
    assert main(["benchmark", "--flemme-table3", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--json", str(out_json)]) == 0
    import json
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["network"] for r in rows] == ["ConvBlock 32^2 x2", "SwinBlock 32^2 x2", "MambaBlock 32^2 x2"]
    # the Table III networks with a second class: one more output channel of the last layer on top of the paper's
    # counts (ConvBlock: 64 x 4 x 4 + 1 in its transposed conv; Swin/Mamba: 64 + 1 in the 1x1 head)
    assert [r["params"] for r in rows] == [3884193 + 1025, 4383570 + 65, 5536289 + 65]
    assert rows[0]["step_ratio"] == 1.0 and rows[2]["step_ratio"] == rows[2]["step_ms"] / rows[0]["step_ms"]


def test_kernel_categories_name_what_kernels_compute():
    from nnunet_mamba.cli.benchmark_profile import kernel_category

    names = {"void selective_scan_bwd_kernel<Selective_Scan_bwd_kernel_traits<32, 16>>": "scan",
             "_selective_scan_fwd_kernel": "scan", "_cross_scan_bwd_kernel": "scan",
             "nnunet_mamba::selective_scan_torch_fwd": "scan", "sm90_xmma_gemm_f16f16_f16f32_f32_tn": "matmul",
             "aten::addmm": "matmul", "aten::mm": "matmul", "aten::convolution_backward": "convolution",
             "void cudnn::engines_precompiled::nchwToNhwcKernel<__half>": "convolution",
             "aten::native_layer_norm": "normalization", "aten::copy_": "copy/layout",
             "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>":
                 "elementwise/other"}
    assert {name: kernel_category(name) for name in names} == names


def test_profiled_benchmark_step_is_split_by_category():
    import torch
    from torch import nn

    import nnunet_mamba
    from nnunet_mamba.cli import benchmark_profile, benchmark_step

    plan = dict(input_channels=1, n_stages=3, features_per_stage=[8, 16, 16], conv_op=nn.Conv2d,
                kernel_sizes=[[3, 3]] * 3, strides=[[1, 1]] + [[2, 2]] * 2, n_conv_per_stage=[1, 1, 1],
                num_classes=2, n_conv_per_stage_decoder=[1, 1], conv_bias=True, norm_op=nn.InstanceNorm2d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                deep_supervision=True)
    network = nnunet_mamba.create_network("umamba_bot", **plan)
    row = benchmark_step.measure_network(network, [24, 24], 1, 2, torch.device("cpu"), steps=1, warmup=0,
                                    compile_network=False, profile=True)
    categories = row["time_by_category"]
    assert set(categories) <= {name for name, _ in benchmark_profile.KERNEL_CATEGORIES} | {"elementwise/other"}
    assert {"scan", "convolution", "normalization"} <= set(categories)  # the Mamba bottleneck's scan op is seen
    assert all(ms > 0 for ms in categories.values())
    assert list(categories.values()) == sorted(categories.values(), reverse=True)



def test_benchmark_has_resenc_rows(capsys, tmp_path, monkeypatch):
    """nnU-Net Revisited's ResEnc M / L presets as baselines: ResidualEncoderUNet with the ResEnc planners' blocks
    per stage (on a narrow 4-stage plan; --batch given: both at batch 2, so the same network twice)."""
    import json

    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    from nnunet_mamba.cli import benchmark_step
    tiny = {"patch_size": [32, 32], "batch_size": 2, "arch": benchmark_step._stages(2, 4, [4, 8, 16, 16])}
    monkeypatch.setitem(benchmark_step.PRESETS, "2d_320", tiny)
    out_json = tmp_path / "bench.json"
    assert main(["benchmark", "plainconvunet", "resenc_m", "resenc_l", "--batch", "2", "--steps", "1", "--warmup",
                 "0", "--device", "cpu", "--json", str(out_json)]) == 0
    rows = {r["network"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert list(rows) == ["plainconvunet", "resenc_m", "resenc_l"]
    table = capsys.readouterr().out
    assert all(f"\n{name} " in table for name in rows)
    network = benchmark_step.build("resenc_m", tiny, 1, 14)
    assert isinstance(network, ResidualEncoderUNet)
    assert [len(stage.blocks) for stage in network.encoder.stages] == [1, 3, 4, 6]
    assert rows["resenc_m"]["params"] == rows["resenc_l"]["params"] == sum(p.numel() for p in network.parameters())
    assert rows["resenc_m"]["params"] > rows["plainconvunet"]["params"]


def test_resenc_presets_batch_is_what_their_planners_choose():
    """nnU-Net's formula (ExperimentPlanner.get_plans_for_configuration) with the M / L reference values, for the
    3D preset's layout and patch: M keeps nnU-Net's default batch of 2, L's 24 GB target triples it."""
    from nnunet_mamba.cli.benchmark_step import PRESETS, network_kwargs
    from nnunet_mamba.planning.baselines import resenc_batch_size
    plan = PRESETS["3d_128"]
    assert [resenc_batch_size(n, network_kwargs(n, plan), plan["patch_size"], 1, 14)
            for n in ("resenc_m", "resenc_l")] == [2, 7]
