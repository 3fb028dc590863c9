"""Plans files for our networks (``nnunet-mamba plan``) and a training-memory estimate that needs no GPU.

The plans-file route: from nnU-Net's plans of a dataset (``nnUNetPlans.json``) write ``<plans name>.json`` beside
it whose configurations name one of our network classes, so that nnU-Net's stock trainer and predictor build it
(``nnUNetv2_train DATASET 2d 0 -p <plans name>``). Every configuration keeps nnU-Net's ``data_identifier``: patch
and batch size do not change preprocessing, so nnU-Net's preprocessed data is reused as it is.

What the stock trainer needs from such a file:

- ``get_network_from_plans`` passes every ``arch_kwargs`` entry (plus input_channels, num_classes,
  deep_supervision) to the class, so ``arch_kwargs`` hold exactly the network's constructor arguments, the patch
  size included as ``input_size`` where the network takes one (U-Mamba Enc and ViM-UNet are sized from it, U-Mamba
  checks it against the strides when built);
- nnU-Net derives the deep-supervision target scales from ``arch_kwargs.strides``: fixed architectures get the
  strides that reproduce their own output scales (``network.plan_strides``) and refuse any others.

Patch and batch size are chosen against a GPU-memory target the way nnU-Net's planners do it: start from nnU-Net's
patch; while batch 2 does not fit, shrink the axis that is largest relative to the median image (U-Mamba: by
nnU-Net's topology rules, re-deriving stages, kernels and strides; fixed architectures: by their total stride);
then take the largest batch that fits, capped so that one batch covers at most 5% of the dataset's voxels.

The memory estimate is the peak of one nnU-Net training step as ``torch.cuda.max_memory_allocated`` reports it
(fp16 autocast, Dice+CE with deep supervision, SGD with momentum). The network's forward pass and the loss run
under ``FakeTensorMode`` (tensors with shapes and dtypes but no storage) with bfloat16 autocast on the CPU (2-byte
elements, as fp16 on CUDA), so it needs neither a GPU nor mamba-ssm, and the Mamba layers count with what they
really save. Every tensor autograd saves for the backward pass is summed, each storage once, and::

    estimate = saved + TRANSIENT_FACTOR x largest saved tensor + 2 x parameter bytes

Parameters and SGD's momentum stay resident; gradients are not added because nnU-Net zeroes them with
``set_to_none``, so they are allocated during the backward pass while the saved activations are being freed. The
transient term stands for the backward pass's temporaries (gradients of the largest activations, workspaces);
its factor is fitted to peaks measured on an H100 (README, "Planning"), which the estimate matches within 10%.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import pydoc
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.multiprocessing.reductions import StorageWeakRef

from .networks import create_network, get_network_spec, plan_kwargs, resolve_plan_imports
from .networks.registry import NetworkSpec

# nnU-Net's networks, for comparison in benchmarks and tests.
BASELINES = {"plainconvunet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
             "resenc_m": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
             "resenc_l": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"}


@dataclass(frozen=True)
class ResEncPreset:
    """One of nnU-Net's ResEnc presets (nnU-Net Revisited), as its planner (nnunetv2's
    residual_encoder_unet_planners.nnUNetPlannerResEncM / L) sets it up: the VRAM target and its reference values."""

    plans_name: str
    vram_target_gb: float
    reference_gb: float
    reference_2d: float
    reference_3d: float


# M and L build the same layout (ResidualEncoderUNet, these blocks per stage, nnU-Net's widths); they differ in
# the memory target, so in the batch (2D) or patch (3D) their planners choose for a dataset.
RESENC_BLOCKS_PER_STAGE_ENCODER = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
RESENC_BLOCKS_PER_STAGE_DECODER = (1,) * 12
RESENC_PRESETS = {"resenc_m": ResEncPreset("nnUNetResEncUNetMPlans", 8, 8, 135e6, 680e6),
                  "resenc_l": ResEncPreset("nnUNetResEncUNetLPlans", 24, 24, 380e6, 2100e6)}
# nnU-Net's ExperimentPlanner: the batch sizes its reference values correspond to, the smallest batch it plans
PLANNER_REFERENCE_BATCH = {2: 12, 3: 2}


def baseline_kwargs(name: str, arch_kwargs: dict) -> dict:
    """Constructor kwargs of the baseline ``name`` for a plan's U-Net layout: a ResEnc plan's kwargs are taken as
    they are; a PlainConvUNet plan's per-stage convolutions become the ResEnc planners' blocks per stage."""
    kwargs = dict(arch_kwargs)
    if name not in RESENC_PRESETS:
        return {k: v for k, v in kwargs.items() if k != "n_blocks_per_stage"}
    if "n_blocks_per_stage" not in kwargs:
        n = kwargs["n_stages"]
        kwargs.pop("n_conv_per_stage", None)
        kwargs.update(n_blocks_per_stage=list(RESENC_BLOCKS_PER_STAGE_ENCODER[:n]),
                      n_conv_per_stage_decoder=list(RESENC_BLOCKS_PER_STAGE_DECODER[:n - 1]))
    return kwargs


def resenc_batch_size(name: str, arch_kwargs: dict, patch_size: Sequence[int], in_channels: int,
                      num_classes: int) -> int:
    """The batch size nnU-Net's ResEnc planner ``name`` plans for this layout and patch: its reference value,
    scaled to its VRAM target, over nnU-Net's static estimate of the network's feature maps, times the reference
    batch (``ExperimentPlanner.get_plans_for_configuration``; the presets do not cap it by the dataset's size).
    The planner would first shrink a patch whose estimate exceeds the reference, and in 3D it spends a larger
    budget on a larger patch where the images are larger; here the patch is kept, so the budget goes to the batch."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    preset, dim = RESENC_PRESETS[name], len(patch_size)
    estimate = ExperimentPlanner.static_estimate_VRAM_usage(
        tuple(patch_size), in_channels, num_classes, BASELINES[name], baseline_kwargs(name, arch_kwargs), ())
    reference = (preset.reference_2d if dim == 2 else preset.reference_3d) * preset.vram_target_gb / \
        preset.reference_gb
    return max(round(reference / estimate * PLANNER_REFERENCE_BATCH[dim]), MIN_BATCH_SIZE)

TRANSIENT_FACTOR = 1.2  # fitted to H100 peaks, see the module docstring

# nnU-Net's planner constants (ExperimentPlanner): smallest batch, largest share of the dataset's voxels in one
# batch, smallest feature-map edge at the bottleneck.
MIN_BATCH_SIZE = 2
MAX_DATASET_COVERED = 0.05
FEATUREMAP_MIN_EDGE_LENGTH = 4


class PlanningError(ValueError):
    """A plan that cannot be made; the message says why and what to change."""


def build_network(name: str, arch_kwargs: dict, in_channels: int, num_classes: int) -> nn.Module:
    """A registered network, or a baseline of ``BASELINES``, from constructor kwargs, with deep supervision."""
    if name in BASELINES:
        return pydoc.locate(BASELINES[name])(input_channels=in_channels, num_classes=num_classes,
                                             deep_supervision=True, **arch_kwargs)
    return create_network(name, input_channels=in_channels, num_classes=num_classes, deep_supervision=True,
                          **arch_kwargs)


def training_loss(num_outputs: int) -> nn.Module:
    """nnU-Net's default loss: Dice + CE on each output, weighted 1, 1/2, 1/4, ... with the lowest one at 0."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    # plain floats, no tensors: the loss is also built under FakeTensorMode
    weights = [1 / 2 ** i for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(loss, [w / sum(weights) for w in weights])


def network_memory_gib(network: nn.Module, in_channels: int, patch_size: Sequence[int], batch_size: int) -> float:
    """Estimated peak GiB of one training step of ``network`` (in training mode); see the module docstring."""
    saved: Dict[StorageWeakRef, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[StorageWeakRef(storage)] = storage.nbytes()
        return tensor

    # non-fake inputs allowed: constants a network keeps outside its parameters and buffers become fake on use
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        state = {name: mode.from_tensor(t) for name, t in itertools.chain(network.named_parameters(),
                                                                           network.named_buffers())}
        resident = {StorageWeakRef(t.untyped_storage()) for t in state.values()}
        image = torch.empty(batch_size, in_channels, *patch_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = functional_call(network, state, (image,))
            outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            targets = [torch.zeros(batch_size, 1, *o.shape[2:]) for o in outputs]
            # held until the sum below: the graph keeps every saved storage alive, so none is freed and its
            # address reused by a later one (which would merge their entries)
            loss = training_loss(len(outputs))(outputs, targets)
        activations = [n for ref, n in saved.items() if ref not in resident]
        total = sum(activations) + TRANSIENT_FACTOR * max(activations, default=0)
        del loss
    parameters = sum(p.numel() * p.element_size() for p in network.parameters())
    return (total + 2 * parameters) / 2 ** 30


def estimate_training_memory_gib(network_name: str, arch_kwargs: dict, patch_size: Sequence[int], batch_size: int,
                                 num_classes: int, in_channels: int) -> float:
    """Estimated peak GiB of one nnU-Net training step (fp16 autocast, SGD) on a GPU, computed on the CPU.

    ``arch_kwargs`` are the constructor kwargs of ``network_name`` (a registered network or a baseline),
    classes imported, ``input_size`` included where the network needs it (:func:`nnunet_mamba.plan_kwargs` makes
    them from a plans configuration).
    """
    network = build_network(network_name, arch_kwargs, in_channels, num_classes)
    return network_memory_gib(network, in_channels, patch_size, batch_size)


@dataclass
class Candidate:
    """A patch size and the arch_kwargs that go with it, as written to the plans (classes as import paths)."""

    patch_size: List[int]
    arch_kwargs: dict


def _axis_to_shrink(patch: Sequence[int], median: Sequence[float], shrinkable: Sequence[bool]) -> Optional[int]:
    # nnU-Net's choice: the axis that is largest relative to the median image, so the patch keeps its proportions
    axes = [a for a in range(len(patch)) if shrinkable[a]]
    return max(axes, key=lambda a: patch[a] / median[a]) if axes else None


def _shrink_unet(candidate: Candidate, spacing: Sequence[float], median: Sequence[float]) -> Optional[Candidate]:
    """The next smaller patch by nnU-Net's planner, with the U-Net topology re-derived for it."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    def topology(patch):
        return get_pool_and_conv_props(spacing, patch, FEATUREMAP_MIN_EDGE_LENGTH, 999999)

    patch = list(candidate.patch_size)
    divisor = topology(patch)[4]
    axis = _axis_to_shrink(patch, median, [p - d >= FEATUREMAP_MIN_EDGE_LENGTH for p, d in zip(patch, divisor)])
    if axis is None:
        return None
    # as nnU-Net: step by the divisibility of the next smaller size, so that no valid size is skipped
    smaller = list(patch)
    smaller[axis] -= divisor[axis]
    patch[axis] -= topology(smaller)[4][axis]
    _, strides, kernel_sizes, patch, _ = topology(patch)
    n = len(strides)
    if n < 2:
        return None
    arch = dict(candidate.arch_kwargs)
    arch.update(n_stages=n, kernel_sizes=kernel_sizes, strides=strides)
    # per-stage lists the network takes (U-Mamba: block counts; Flemme: widths only) follow the new stage count
    for key, length in (("features_per_stage", n), ("n_conv_per_stage", n), ("n_conv_per_stage_decoder", n - 1)):
        if key in arch:
            arch[key] = arch[key][:length]
    if "input_size" in arch:
        arch["input_size"] = list(patch)
    return Candidate([int(p) for p in patch], arch)


def _shrink_fixed(candidate: Candidate, median: Sequence[float], step: Sequence[int]) -> Optional[Candidate]:
    """The patch one total stride smaller along one axis (fixed architectures pad to multiples of it)."""
    patch = list(candidate.patch_size)
    axis = _axis_to_shrink(patch, median, [p > s for p, s in zip(patch, step)])
    if axis is None:
        return None
    patch[axis] -= step[axis]
    arch = dict(candidate.arch_kwargs)
    if "input_size" in arch:
        arch["input_size"] = list(patch)
    return Candidate(patch, arch)


def _dataset_voxels(plans_manager, median: Sequence[int], num_training: int) -> float:
    """nnU-Net's ``approximate_n_voxels_dataset``: the median image's voxels (at the configuration's spacing; a 2D
    configuration counts the full-resolution volume) times the number of training cases."""
    if len(median) == 2:
        if "3d_fullres" in plans_manager.available_configurations:
            median = plans_manager.get_configuration("3d_fullres").median_image_size_in_voxels
        else:  # a 2D dataset (first axis 1), or 3D data planned in 2D only
            median = [plans_manager.plans["original_median_shape_after_transp"][0], *median]
    return float(math.prod(median)) * num_training


def plan_configuration(network_name: str, plans: dict, configuration: str, dataset_json: dict,
                       gpu_memory_gib: float, log: Callable[[str], None] = print) -> Tuple[dict, float]:
    """One configuration of the plans for ``network_name`` and its estimated peak GiB; ``plans`` are nnU-Net's."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    spec = get_network_spec(network_name)
    plans_manager = PlansManager(plans)
    manager = plans_manager.get_configuration(configuration)
    dim = len(manager.patch_size)
    if dim not in spec.dims:
        supported = [c for c in plans["configurations"]
                     if len(plans_manager.get_configuration(c).patch_size) in spec.dims]
        raise PlanningError(f"{network_name} is {'/'.join(f'{d}D' for d in spec.dims)} only, configuration "
                            f"{configuration!r} is {dim}D (patch {list(manager.patch_size)}); use -c "
                            f"{' '.join(supported) or '(none of these plans fits)'}")
    in_channels = determine_num_input_channels(plans_manager, manager, dataset_json)
    num_classes = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    median = list(manager.median_image_size_in_voxels)
    candidate, shrink = _first_candidate(spec, manager, in_channels, num_classes)

    def build(c: Candidate) -> nn.Module:
        kwargs = resolve_plan_imports(c.arch_kwargs, manager.network_arch_init_kwargs_req_import)
        return build_network(network_name, kwargs, in_channels, num_classes)

    network = build(candidate)
    log(f"{configuration}: nnU-Net's patch {list(manager.patch_size)}, batch {manager.batch_size}: estimated "
        f"{network_memory_gib(network, in_channels, candidate.patch_size, manager.batch_size):.2f} GiB with "
        f"{network_name}")
    while True:
        try:
            estimate = network_memory_gib(network, in_channels, candidate.patch_size, MIN_BATCH_SIZE)
        except ValueError as exc:  # the network's own limit, e.g. a patch too small to train on
            raise PlanningError(f"{network_name} does not fit in {gpu_memory_gib} GiB at batch {MIN_BATCH_SIZE}: "
                                f"patch {candidate.patch_size} is too small for it ({exc})") from None
        if estimate <= gpu_memory_gib:
            break
        smaller = shrink(candidate, median)
        if smaller is None:
            raise PlanningError(f"{network_name} needs {estimate:.2f} GiB at batch {MIN_BATCH_SIZE} even with patch "
                                f"{candidate.patch_size}; raise --gpu-memory-gb")
        if smaller.arch_kwargs != candidate.arch_kwargs:  # fixed architectures mostly stay the same network
            network = build(smaller)
        candidate = smaller

    # grow the batch into the room left, linearly extrapolated and then checked
    per_sample = estimate - network_memory_gib(network, in_channels, candidate.patch_size, 1)
    fitting = MIN_BATCH_SIZE + int((gpu_memory_gib - estimate) / max(per_sample, 1e-9))
    cap = round(_dataset_voxels(plans_manager, median, dataset_json["numTraining"]) * MAX_DATASET_COVERED
                / math.prod(candidate.patch_size))
    batch_size = max(min(fitting, cap), MIN_BATCH_SIZE)
    while batch_size > MIN_BATCH_SIZE:
        grown = network_memory_gib(network, in_channels, candidate.patch_size, batch_size)
        if grown <= gpu_memory_gib:
            estimate = grown
            break
        batch_size -= 1
    log(f"{configuration}: {network_name} patch {candidate.patch_size}, batch {batch_size}: estimated "
        f"{estimate:.2f} GiB (target {gpu_memory_gib} GiB)")

    planned = copy.deepcopy(manager.configuration)
    planned.pop("inherits_from", None)
    planned.update(patch_size=candidate.patch_size, batch_size=batch_size, architecture={
        "network_class_name": spec.class_path, "arch_kwargs": candidate.arch_kwargs,
        "_kw_requires_import": [k for k in manager.network_arch_init_kwargs_req_import
                                if k in candidate.arch_kwargs]})
    return planned, estimate


Shrink = Callable[[Candidate, List[int]], Optional[Candidate]]


def _first_candidate(spec: NetworkSpec, manager, in_channels: int, num_classes: int) -> Tuple[Candidate, Shrink]:
    """nnU-Net's patch with the network's arch_kwargs, and how to shrink it."""
    patch = [int(p) for p in manager.patch_size]
    arch = {**spec.defaults, **plan_kwargs(spec.name, manager.network_arch_init_kwargs, patch,
                                           manager.network_arch_class_name)}
    if "input_size" in arch:
        arch["input_size"] = list(arch["input_size"])
    if spec.sized_by_plans:
        return Candidate(patch, arch), lambda c, median: _shrink_unet(c, manager.spacing, median)
    # fixed architecture: its own strides, and patches in multiples of its total stride (it pads to those anyway)
    probe = build_network(spec.name, resolve_plan_imports(arch, manager.network_arch_init_kwargs_req_import),
                          in_channels, num_classes)
    step = [math.prod(axis) for axis in zip(*probe.plan_strides)]
    patch = [math.ceil(p / s) * s for p, s in zip(patch, step)]
    arch["strides"] = probe.plan_strides
    if "input_size" in arch:
        arch["input_size"] = patch
    return Candidate(patch, arch), lambda c, median: _shrink_fixed(c, median, step)


def _link_stages(configurations: Dict[str, dict]) -> None:
    """Keep cascade links only between configurations that are in the plans."""
    for name, config in configurations.items():
        previous = config.get("previous_stage")
        if previous is not None and previous not in configurations:
            raise PlanningError(f"{name} is the cascade's second stage: plan its first stage too "
                                f"(-c {previous} {name})")
        following = config.get("next_stage")
        if following is not None:
            kept = [n for n in ([following] if isinstance(following, str) else following) if n in configurations]
            if kept:
                config["next_stage"] = kept
            else:
                del config["next_stage"]


def default_plans_name(network_name: str) -> str:
    return f"nnUNetMambaPlans_{network_name}"


def plan_for_network(preprocessed_folder: str, network_name: str, configurations: Optional[Sequence[str]] = None,
                     gpu_memory_gib: float = 8.0, plans_name: Optional[str] = None,
                     source_plans: str = "nnUNetPlans", log: Callable[[str], None] = print) -> str:
    """Write the plans for ``network_name`` into a dataset's nnU-Net preprocessed folder; returns the file's path.

    ``configurations`` default to every configuration of ``<source_plans>.json`` the network supports.
    """
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    spec = get_network_spec(network_name)
    source_file = os.path.join(preprocessed_folder, f"{source_plans}.json")
    if not os.path.isfile(source_file):
        raise PlanningError(f"{source_file} does not exist: run nnUNetv2_plan_and_preprocess (or nnU-Net's planner "
                            f"for {source_plans}) first")
    with open(source_file) as f:
        source = json.load(f)
    with open(os.path.join(preprocessed_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    available = list(source["configurations"])
    if configurations is None:
        plans_manager = PlansManager(source)
        configurations = [c for c in available if len(plans_manager.get_configuration(c).patch_size) in spec.dims]
    unknown = [c for c in configurations if c not in available]
    if unknown or not configurations:
        raise PlanningError(f"configuration(s) {unknown} not in {source_file}, which has {', '.join(available)}"
                            if unknown else f"{source_file} has no configuration {network_name} supports")
    planned, estimates = {}, {}
    for name in configurations:
        planned[name], estimates[name] = plan_configuration(network_name, source, name, dataset_json,
                                                            gpu_memory_gib, log)
    _link_stages(planned)
    plans_name = plans_name or default_plans_name(network_name)
    plans = {**source, "plans_name": plans_name, "configurations": planned,
             # for whoever edits the file: what it was planned for (nnU-Net ignores this entry)
             "nnunet_mamba": {"network": network_name, "source_plans": source_plans,
                              "gpu_memory_target_gib": gpu_memory_gib,
                              "estimated_training_gib": {k: round(v, 2) for k, v in estimates.items()}}}
    recursive_fix_for_json_export(plans)
    path = os.path.join(preprocessed_folder, f"{plans_name}.json")
    with open(path, "w") as f:
        json.dump(plans, f, indent=4)
    return path
