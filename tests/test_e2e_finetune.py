"""Fine-tuning through the real nnU-Net command line: Swin-UMamba trained on a 2-class dataset A, then
``nnUNetv2_train B ... -pretrained_weights <A's checkpoint_final.pth>`` on a 4-class dataset B, then predicted.

Swin-UMamba is the network whose original head names (``out_layers.*``) made nnU-Net refuse the transfer between
datasets with different class counts; ours are ``decoder.seg_layers.*``, which nnU-Net leaves out.
"""
import json
import os

import numpy as np
import pytest
import torch
from helpers import nnunet

pytest.importorskip("nnunetv2")

from nnunet_mamba.synthetic import make_dataset  # noqa: E402

pytestmark = pytest.mark.e2e
SHAPE = (32, 32)  # Swin-UMamba's total stride: no padding, the cheapest patch it takes
TRAINER = "nnUNetTrainerSwinUMambaScratch_demo"  # needs no ImageNet weights
# dataset B: background + 4 labels, two more than A's disk and box
LABELS_B = {"background": 0, "disk": 1, "box": 2, "bright_disk": 3, "black_box": 4}


def make_four_class_dataset(raw_root: str, dataset_id: int, n_train: int = 6, n_test: int = 2,
                            name: str = "FineTuneB", seed: int = 1) -> str:
    """Two disks and two boxes per image (labels 1..4, intensities +2, -2, +4, -4) on noise, in nnU-Net's layout."""
    import SimpleITK as sitk

    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    for index in range(n_train + n_test):
        label = np.zeros(SHAPE, dtype=np.uint8)
        # one object per quadrant, in a random order of the quadrants
        for value, quadrant in zip((1, 2, 3, 4), rng.permutation(4)):
            cy = (quadrant // 2 + rng.uniform(0.35, 0.65)) * SHAPE[0] / 2
            cx = (quadrant % 2 + rng.uniform(0.35, 0.65)) * SHAPE[1] / 2
            size = rng.uniform(0.2, 0.3) * SHAPE[0] / 2 + 1  # half-size: 4-6 voxels in a 16-voxel quadrant
            inside = ((y - cy) ** 2 + (x - cx) ** 2 <= size ** 2) if value in (1, 3) else \
                (np.abs(y - cy) <= size) & (np.abs(x - cx) <= size)
            label[inside] = value
        image = rng.normal(0.0, 0.4, SHAPE) + np.select([label == v for v in (1, 2, 3, 4)], [2.0, -2.0, 4.0, -4.0])
        split = "Tr" if index < n_train else "Ts"
        case = f"case_{index:03d}"
        sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.float32)),
                        os.path.join(folder, f"images{split}", f"{case}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label), os.path.join(folder, f"labels{split}", f"{case}.nii.gz"))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "synthetic"}, "labels": LABELS_B, "numTraining": n_train,
                   "file_ending": ".nii.gz", "name": name}, f, indent=2)
    return folder


def dice_per_label(prediction_dir: str, label_dir: str, labels: dict) -> dict:
    import SimpleITK as sitk

    scores = {name: [] for name, value in labels.items() if value}
    for case in sorted(f for f in os.listdir(label_dir) if f.endswith(".nii.gz")):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(label_dir, case)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(prediction_dir, case)))
        assert pred.shape == ref.shape and set(np.unique(pred)) <= set(labels.values())
        for name in scores:
            r, p = ref == labels[name], pred == labels[name]
            scores[name].append(1.0 if r.sum() + p.sum() == 0 else 2.0 * (r & p).sum() / (r.sum() + p.sum()))
    return {name: float(np.mean(values)) for name, values in scores.items()}


def test_fine_tune_swin_umamba_on_a_dataset_with_more_classes(tmp_path):
    id_a, id_b = 931, 932
    make_dataset(str(tmp_path / "raw"), id_a, SHAPE, n_train=6, n_test=2, name="FineTuneA")
    raw_b = make_four_class_dataset(str(tmp_path / "raw"), id_b)
    nnunet(tmp_path, "nnUNetv2_plan_and_preprocess", "-d", str(id_a), str(id_b), "-c", "2d", "-np", "1",
           "-npfp", "1", "--verify_dataset_integrity", extra_env={"nnUNet_n_proc_DA": "1"})

    nnunet(tmp_path, "nnUNetv2_train", str(id_a), "2d", "0", "-tr", TRAINER, "-device", "cpu")
    model_a = tmp_path / "results" / f"Dataset{id_a:03d}_FineTuneA" / f"{TRAINER}__nnUNetPlans__2d"
    checkpoint_a = model_a / "fold_0" / "checkpoint_final.pth"

    result = nnunet(tmp_path, "nnUNetv2_train", str(id_b), "2d", "0", "-tr", TRAINER, "-device", "cpu",
                    "-pretrained_weights", str(checkpoint_a))
    assert f"Loading pretrained weights from file  {checkpoint_a}" in result.stdout
    model_b = tmp_path / "results" / f"Dataset{id_b:03d}_FineTuneB" / f"{TRAINER}__nnUNetPlans__2d"
    weights_a = torch.load(checkpoint_a, map_location="cpu", weights_only=False)["network_weights"]
    weights_b = torch.load(model_b / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                           weights_only=False)["network_weights"]
    assert weights_a.keys() == weights_b.keys()
    heads = [k for k in weights_a if ".seg_layers." in k]
    assert {weights_a[k].shape[0] for k in heads if k.endswith(".weight")} == {3}
    assert {weights_b[k].shape[0] for k in heads if k.endswith(".weight")} == {5}

    out = tmp_path / "pred_b"
    nnunet(tmp_path, "nnUNetv2_predict", "-i", os.path.join(raw_b, "imagesTs"), "-o", str(out), "-d", str(id_b),
           "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1")
    scores = dice_per_label(str(out), os.path.join(raw_b, "labelsTs"), LABELS_B)
    print(f"fine-tuned {TRAINER} on dataset B (4 classes), Dice per label: {scores}")
    assert set(scores) == {"disk", "box", "bright_disk", "black_box"}
