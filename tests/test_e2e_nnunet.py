"""Round trips through the real nnU-Net command line: plan_and_preprocess, train, predict (subprocesses).

Uses the README's one-liner (eval "$(nnunet-mamba env)") and our short-run trainer variants on tiny synthetic data.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")

from nnunet_mamba.synthetic import dice_scores, make_dataset  # noqa: E402

pytestmark = pytest.mark.e2e
BIN = os.path.dirname(sys.executable)
CASES = {2: (2, (48, 64)), 3: (3, (24, 32, 40))}  # dataset id offset, image shape (non-cubic on purpose)
CONFIG = {2: "2d", 3: "3d_fullres"}


def nnunet(work, *command, extra_env=None):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results"), "nnUNet_extTrainer": "", "nnUNet_def_n_proc": "1",
           "nnUNet_n_proc_DA": "0", **(extra_env or {})}
    script = 'eval "$(nnunet-mamba env)" && ' + " ".join(command)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def planned(request, tmp_path_factory):
    dim = request.param
    offset, shape = CASES[dim]
    work = tmp_path_factory.mktemp(f"e2e{dim}d")
    dataset_id = 900 + offset
    raw = make_dataset(str(work / "raw"), dataset_id, shape, n_train=6, n_test=2, name=f"E2E{dim}D")
    # nnU-Net's planner needs >= 1 augmentation process
    nnunet(work, "nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", CONFIG[dim], "-np", "1", "-npfp", "1",
           "--verify_dataset_integrity", extra_env={"nnUNet_n_proc_DA": "1"})
    return dim, work, dataset_id, raw


@pytest.mark.parametrize("trainer", ["nnUNetTrainerUMambaBot_demo", "nnUNetTrainerUMambaEnc_demo"])
def test_train_and_predict_through_nnunet_cli(planned, trainer):
    dim, work, dataset_id, raw = planned
    config = CONFIG[dim]
    nnunet(work, "nnUNetv2_train", str(dataset_id), config, "0", "-tr", trainer, "-device", "cpu")
    model_dir = work / "results" / f"Dataset{dataset_id:03d}_E2E{dim}D" / f"{trainer}__nnUNetPlans__{config}"
    checkpoint = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer
    assert checkpoint["current_epoch"] == 2
    assert any("mamba" in key for key in checkpoint["network_weights"])

    out = work / f"pred_{trainer}"
    nnunet(work, "nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", str(out), "-d", str(dataset_id),
           "-c", config, "-f", "0", "-tr", trainer, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1")
    import SimpleITK as sitk
    for case in sorted(os.listdir(os.path.join(raw, "labelsTs"))):
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case)))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, "labelsTs", case)))
        assert prediction.shape == reference.shape
        assert set(np.unique(prediction)) <= {0, 1, 2}
    scores = dice_scores(str(out), os.path.join(raw, "labelsTs"))
    # bright disk vs dark box on noise: even 8 iterations learn it (the demo reaches ~0.9)
    assert np.mean(list(scores.values())) > 0.3, scores
