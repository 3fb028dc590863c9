"""Small synthetic segmentation datasets in nnU-Net's raw layout, for the demo and the end-to-end tests."""
from __future__ import annotations

import json
import os
from typing import Sequence

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
