"""nnU-Net's own side of planning: its baseline networks (PlainConvUNet, the ResEnc M / L presets of nnU-Net
Revisited) and the constants and batch-size rule of its ExperimentPlanner, for the plans writer and the benchmark."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

# nnU-Net's planner constants (ExperimentPlanner): smallest batch, largest share of the dataset's voxels in one
# batch, smallest feature-map edge at the bottleneck.
MIN_BATCH_SIZE = 2
MAX_DATASET_COVERED = 0.05
FEATUREMAP_MIN_EDGE_LENGTH = 4

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
