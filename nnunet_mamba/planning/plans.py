"""Plans files for our networks (``nnunet-mamba plan``), sized by a training-memory estimate that needs no GPU.

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

The estimate itself is :mod:`nnunet_mamba.planning.memory`.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from collections.abc import Callable, Sequence

from torch import nn

from ..networks import get_network_spec, plan_kwargs, resolve_plan_imports
from ..networks.registry import NetworkSpec
from .baselines import FEATUREMAP_MIN_EDGE_LENGTH, MAX_DATASET_COVERED, MIN_BATCH_SIZE
from .memory import build_network, network_memory_gib


class PlanningError(ValueError):
    """A plan that cannot be made; the message says why and what to change."""


@dataclass
class Candidate:
    """A patch size and the arch_kwargs that go with it, as written to the plans (classes as import paths)."""

    patch_size: list[int]
    arch_kwargs: dict


def _axis_to_shrink(patch: Sequence[int], median: Sequence[float], shrinkable: Sequence[bool]) -> int | None:
    # nnU-Net's choice: the axis that is largest relative to the median image, so the patch keeps its proportions
    axes = [a for a in range(len(patch)) if shrinkable[a]]
    return max(axes, key=lambda a: patch[a] / median[a]) if axes else None


def _shrink_unet(candidate: Candidate, spacing: Sequence[float], median: Sequence[float]) -> Candidate | None:
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


def _shrink_fixed(candidate: Candidate, median: Sequence[float], step: Sequence[int]) -> Candidate | None:
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
                       gpu_memory_gib: float, log: Callable[[str], None] = print) -> tuple[dict, float]:
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


Shrink = Callable[[Candidate, list[int]], Candidate | None]


def _first_candidate(spec: NetworkSpec, manager, in_channels: int, num_classes: int) -> tuple[Candidate, Shrink]:
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


def _link_stages(configurations: dict[str, dict]) -> None:
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


def plan_for_network(preprocessed_folder: str, network_name: str, configurations: Sequence[str] | None = None,
                     gpu_memory_gib: float = 8.0, plans_name: str | None = None,
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
