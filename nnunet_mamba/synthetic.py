"""Small synthetic segmentation datasets in nnU-Net's raw layout, for the demo and the end-to-end tests."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

LABELS = {"background": 0, "disk": 1, "box": 2}


def _case(rng: np.random.Generator, shape: Sequence[int]):
    """One image with a bright ball (label 1) and a dark box (label 2) on a noisy background."""
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    label = np.zeros(shape, dtype=np.uint8)
    radius = rng.uniform(0.15, 0.25) * min(shape)
    centre = [rng.uniform(radius, s - radius) for s in shape]
    label[sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2] = 1
    half = [rng.uniform(0.08, 0.15) * s for s in shape]
    corner = [rng.uniform(h, s - h) for h, s in zip(half, shape)]
    box = np.all([np.abs(g - c) <= h for g, c, h in zip(grid, corner, half)], axis=0)
    label[box & (label == 0)] = 2
    image = rng.normal(0.0, 0.4, shape) + np.where(label == 1, 2.0, 0.0) + np.where(label == 2, -2.0, 0.0)
    return image.astype(np.float32), label


def make_dataset(raw_root: str, dataset_id: int, shape: Sequence[int], n_train: int = 10, n_test: int = 2,
                 name: str = "MambaDemo", seed: int = 0) -> str:
    """Write ``Dataset{id:03d}_{name}`` (images .nii.gz, 2D or 3D by ``len(shape)``) and return its folder."""
    import SimpleITK as sitk

    if len(shape) not in (2, 3):
        raise ValueError(f"shape must be 2D or 3D, got {tuple(shape)}")
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(n_train + n_test):
        image, label = _case(rng, shape)
        split = "Tr" if index < n_train else "Ts"
        case = f"case_{index:03d}"
        sitk.WriteImage(sitk.GetImageFromArray(image), os.path.join(folder, f"images{split}", f"{case}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label), os.path.join(folder, f"labels{split}", f"{case}.nii.gz"))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "synthetic"}, "labels": LABELS, "numTraining": n_train,
                   "file_ending": ".nii.gz", "name": name}, f, indent=2)
    return folder


def dice_scores(prediction_dir: str, label_dir: str) -> dict:
    """Mean Dice per foreground label over the cases present in both folders."""
    import SimpleITK as sitk

    scores = {name: [] for name, value in LABELS.items() if value}
    cases = sorted(f for f in os.listdir(label_dir) if f.endswith(".nii.gz"))
    missing = [c for c in cases if not os.path.isfile(os.path.join(prediction_dir, c))]
    if missing:
        raise FileNotFoundError(f"no prediction for {missing} in {prediction_dir}")
    for case in cases:
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(label_dir, case)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(prediction_dir, case)))
        for name in scores:
            r, p = ref == LABELS[name], pred == LABELS[name]
            denominator = r.sum() + p.sum()
            scores[name].append(1.0 if denominator == 0 else 2.0 * (r & p).sum() / denominator)
    return {name: float(np.mean(values)) for name, values in scores.items()}


# The learning benchmark's task (``nnunet-mamba learning-benchmark``).
LEARNING_LABELS = {"background": 0, "disk": 1, "square": 2, "ring_bright_cue": 3, "ring_dark_cue": 4}
# distance between a ring's centre and its cue's centre, as fractions of the image side: 30-90 px at 128 px
CUE_DISTANCE = (0.23, 0.70)
CUE_INTENSITY = 2.5


def _ball(grid, centre, radius: float) -> np.ndarray:
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def _cross(grid, centre, arm: float) -> np.ndarray:
    """A plus sign (2D) or a three-axis cross (3D): one bar per axis, 3 px thick."""
    near = [np.abs(g - c) for g, c in zip(grid, centre)]
    return np.any([np.all([n <= (arm if i == axis else 1) for i, n in enumerate(near)], axis=0)
                   for axis in range(len(near))], axis=0)


def learning_case(rng: np.random.Generator, shape: Sequence[int], max_tries: int = 1000):
    """One image of the learning benchmark: ``(image, label, info)``; see :func:`make_learning_dataset`.

    ``info`` holds the ring's and the cue's centres, the cue's sign (+1 bright, -1 dark) and their distance.
    """
    side = min(shape)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    ring_r = max(4.0, rng.uniform(0.07, 0.10) * side)
    thickness = max(2.0, 0.3 * ring_r)
    disk_r = max(3.0, rng.uniform(0.06, 0.10) * side)
    half = max(2.5, rng.uniform(0.05, 0.09) * side)
    arm = max(3.0, 0.04 * side)
    # (radius of a bounding ball, margin to the image border) per object, in placement order
    extents = [ring_r, arm * np.sqrt(len(shape)), disk_r, half * np.sqrt(len(shape))]

    def inside(centre, extent):
        return all(extent + 1 <= c <= s - extent - 2 for c, s in zip(centre, shape))

    for _ in range(max_tries):
        ring = [rng.uniform(ring_r + 1, s - ring_r - 2) for s in shape]
        direction = rng.normal(size=len(shape))
        distance = rng.uniform(*CUE_DISTANCE) * side
        cue = [r + distance * d for r, d in zip(ring, direction / np.linalg.norm(direction))]
        others = [[rng.uniform(e + 1, s - e - 2) for s in shape] for e in extents[2:]]
        centres = [ring, cue, *others]
        if not all(inside(c, e) for c, e in zip(centres, extents)):
            continue
        # objects apart by a gap of 2 px at least, so that no label touches another
        if all(np.linalg.norm(np.subtract(centres[i], centres[j])) > extents[i] + extents[j] + 2
               for i in range(4) for j in range(i)):
            break
    else:
        raise RuntimeError(f"could not place the objects in an image of shape {tuple(shape)}")
    sign = 1 if rng.random() < 0.5 else -1
    ring_mask = _ball(grid, ring, ring_r) & ~_ball(grid, ring, ring_r - thickness)
    cue_mask = _cross(grid, cue, arm)
    disk_mask = _ball(grid, others[0], disk_r)
    square_mask = np.all([np.abs(g - c) <= half for g, c in zip(grid, others[1])], axis=0)
    label = np.zeros(shape, dtype=np.uint8)
    label[disk_mask] = LEARNING_LABELS["disk"]
    label[square_mask] = LEARNING_LABELS["square"]
    label[ring_mask] = LEARNING_LABELS["ring_bright_cue" if sign > 0 else "ring_dark_cue"]
    image = (rng.normal(0.0, 0.5, shape) + 2.0 * disk_mask - 2.0 * square_mask + 1.0 * ring_mask
             + sign * CUE_INTENSITY * cue_mask)
    info = {"ring": ring, "cue": cue, "cue_sign": sign, "distance": float(distance), "cue_arm": arm}
    return image.astype(np.float32), label, info


def make_learning_dataset(raw_root: str, dataset_id: int, shape: Sequence[int], n_cases: int,
                          name: str = "LearnBench", seed: int = 0) -> str:
    """Write the learning benchmark's ``Dataset{id:03d}_{name}`` (training cases only) and return its folder.

    Every image (2D or 3D by ``len(shape)``, 1 channel, noise of std 0.5) holds four objects, at least 2 px apart:

    - purely local classes: a bright disk/ball (label 1, +2) and a dark square/cube (label 2, -2);
    - context classes: a ring (a spherical shell in 3D, +1) that looks the same in every image; its label is
      ``ring_bright_cue`` (3) or ``ring_dark_cue`` (4) by the sign of a cue, a small cross (+-2.5, labelled
      background) whose centre lies 0.23-0.70 image sides away from the ring's (30-90 px at 128 px). Which one
      it is cannot be told from the ring's neighbourhood: a network must carry the cue's sign across that distance.

    Each case draws its sizes, positions and the cue's sign from one generator seeded by ``seed``.
    nnU-Net's fold 0 validates on a fifth of the cases.
    """
    import SimpleITK as sitk

    if len(shape) not in (2, 3):
        raise ValueError(f"shape must be 2D or 3D, got {tuple(shape)}")
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(n_cases):
        image, label, _ = learning_case(rng, shape)
        case = f"case_{index:04d}"
        sitk.WriteImage(sitk.GetImageFromArray(image), os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label), os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "synthetic"}, "labels": LEARNING_LABELS, "numTraining": n_cases,
                   "file_ending": ".nii.gz", "name": name}, f, indent=2)
    return folder
