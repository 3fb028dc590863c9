"""The training step ``nnunet-mamba benchmark`` measures, and the plans it measures it on.

One training step = nnU-Net's: forward under autocast (fp16 on CUDA), Dice+CE with deep supervision, backward
through a GradScaler, SGD step. With it the forward pass per image: GMACs (matmuls and convolutions) and GFLOPs
(those, 2 per MAC, plus the selective scans). Networks are built from a plan preset (the reference plans of the
original papers) or from a real nnU-Net plans file, with nnU-Net's PlainConvUNet and its ResEnc M / L presets
(nnU-Net Revisited: ResidualEncoderUNet at the batch size their planners choose for the plan's patch) available as
baselines.
"""
from __future__ import annotations

import json
import time

import torch
from torch import nn

from ..networks import plan_kwargs, resolve_plan_imports
from ..ops import resolve_backend
from ..ops.flops import register_scan_flops
from ..planning.baselines import BASELINES, baseline_kwargs
from ..planning.memory import build_network, training_loss
from .benchmark_profile import time_by_category


def _stages(dim: int, n_stages: int, features: list[int]) -> dict:
    conv = "Conv3d" if dim == 3 else "Conv2d"
    return {"n_stages": n_stages, "features_per_stage": features, "conv_op": getattr(nn, conv),
            "kernel_sizes": [[3] * dim] * n_stages, "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
            "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
            "norm_op": getattr(nn, f"InstanceNorm{dim}d"), "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}


# The plans of the reference measurements (a 2D plan for 320x320 and a 3D plan for 128^3).
PRESETS: dict[str, dict] = {
    "2d_320": {"patch_size": [320, 320], "batch_size": 12, "arch": _stages(2, 7, [32, 64, 128, 256, 512, 512, 512])},
    "3d_128": {"patch_size": [128, 128, 128], "batch_size": 2, "arch": _stages(3, 6, [32, 64, 128, 256, 320, 320])},
    # ViM-UNet's set-up (512x512 images); nnU-Net's default 2D plan for that size has 8 stages
    "2d_512": {"patch_size": [512, 512], "batch_size": 2,
               "arch": _stages(2, 8, [32, 64, 128, 256, 512, 512, 512, 512])},
}


def plan_from_file(plans_file: str, configuration: str) -> dict:
    """A benchmark plan from an nnU-Net plans.json configuration."""
    with open(plans_file) as f:
        plans = json.load(f)
    try:
        config = plans["configurations"][configuration]
    except KeyError:
        raise SystemExit(f"configuration {configuration!r} not in {plans_file}: "
                         f"{', '.join(plans['configurations'])}") from None
    arch = resolve_plan_imports(config["architecture"]["arch_kwargs"], config["architecture"]["_kw_requires_import"])
    return {"patch_size": config["patch_size"], "batch_size": config["batch_size"], "arch": arch,
            "network_class_name": config["architecture"]["network_class_name"]}


def network_kwargs(name: str, plan: dict) -> dict:
    """Constructor kwargs of network ``name`` for a benchmark plan."""
    if name in BASELINES:
        return baseline_kwargs(name, plan["arch"])
    return plan_kwargs(name, plan["arch"], plan["patch_size"], plan.get("network_class_name"))


def build(name: str, plan: dict, in_channels: int, classes: int) -> nn.Module:
    return build_network(name, network_kwargs(name, plan), in_channels, classes)


def measure(name: str, plan: dict, batch: int, classes: int, device: torch.device, steps: int, warmup: int,
            compile_network: bool, profile: bool = False) -> dict:
    torch.manual_seed(0)
    network = build(name, plan, 1, classes)
    backend = "-" if name in BASELINES else resolve_backend(device)
    return {"network": name, **measure_network(network, plan["patch_size"], batch, classes, device, steps, warmup,
                                                compile_network, profile), "backend": backend}


def measure_network(network: nn.Module, patch_size: list[int], batch: int, classes: int, device: torch.device,
                    steps: int, warmup: int, compile_network: bool, profile: bool = False) -> dict:
    """One nnU-Net training step of ``network`` (1 input channel): time, peak memory, inference time, the forward
    pass's GMACs and GFLOPs per image, the warm-up's seconds (compilation included), and with ``profile`` the step's
    time by kernel category (``time_by_category``, from further profiled steps)."""
    network = network.to(device)
    params = sum(p.numel() for p in network.parameters())
    model = torch.compile(network) if compile_network else network
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    x = torch.randn(batch, 1, *patch_size, device=device)
    with torch.no_grad():
        outputs = network(x[:1])
        shapes = [o.shape[2:] for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
    targets = [torch.randint(0, classes, (batch, 1, *s), device=device).float() for s in shapes]
    loss_fn = training_loss(len(shapes))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            outputs = model(x)
            loss = loss_fn(outputs if isinstance(outputs, (list, tuple)) else [outputs], targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()

    warmup_start = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - warmup_start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    infer_ms = _inference_ms(network, x[:1], use_amp, steps)
    flops, scan_flops = _forward_flops(network, x[:1])
    result = {"params": params, "step_ms": elapsed * 1000, "warmup_s": warmup_s, "peak_gib": peak,
              "infer_ms": infer_ms, "gmacs": (flops - scan_flops) / 2e9, "gflops": flops / 1e9, "batch": batch,
              "patch": list(patch_size)}
    if profile:
        result["time_by_category"] = time_by_category(step, device, steps)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _inference_ms(network: nn.Module, image: torch.Tensor, use_amp: bool, repeats: int) -> float:
    """Forward time for one patch (batch 1, no deep supervision), as nnU-Net's predictor runs it."""
    network.eval()
    deep_supervision = network.decoder.deep_supervision  # nnU-Net's switch, which its predictor turns off
    network.decoder.deep_supervision = False
    with torch.autocast(image.device.type, dtype=torch.float16, enabled=use_amp):
        network(image)
        _sync(image.device)
        start = time.perf_counter()
        for _ in range(repeats):
            network(image)
        _sync(image.device)
    network.decoder.deep_supervision = deep_supervision
    network.train()
    return (time.perf_counter() - start) / repeats * 1000


@torch.no_grad()
def _forward_flops(network: nn.Module, image: torch.Tensor) -> tuple[int, int]:
    """FLOPs of one forward pass of ``image`` by torch.utils.flop_counter, and the selective scans' share of them.

    Matmuls and convolutions count 2 per multiply-accumulate (so the rest / 2 are the MACs papers report), the
    scans by the formulas of :mod:`nnunet_mamba.ops.flops`. Not counted: elementwise ops and norms, and the scan and
    conv1d inside mamba-ssm's fused ``mamba_inner_fn`` (the Mamba layer's path on CUDA with causal-conv1d), which
    calls compiled kernels rather than custom ops.
    """
    from torch.utils.flop_counter import FlopCounterMode

    scan_ops = register_scan_flops()  # also ops defined since import; before the counter, which copies the registry
    network.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        network(image)
    network.train()
    per_op = counter.get_flop_counts().get("Global", {})
    return counter.get_total_flops(), sum(n for op, n in per_op.items() if op in scan_ops)
