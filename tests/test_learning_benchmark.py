"""``nnunet-mamba learning-benchmark``: its dataset, its trainer variants, its result table, and the --tiny path end
to end through the real nnU-Net command line."""
import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")

from nnunet_mamba.cli import learning, learning_results  # noqa: E402
from nnunet_mamba.synthetic import CUE_DISTANCE, LEARNING_LABELS, learning_case, make_learning_dataset  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
RINGS = (LEARNING_LABELS["ring_bright_cue"], LEARNING_LABELS["ring_dark_cue"])


@pytest.mark.parametrize("shape, n", [((128, 128), 40), ((48, 48, 48), 8)], ids=["2d", "3d"])
def test_every_case_has_the_local_classes_and_a_ring_labelled_by_its_distant_cue(shape, n):
    rng = np.random.default_rng(1)
    side = min(shape)
    ring_classes = set()
    for _ in range(n):
        image, label, info = learning_case(rng, shape)
        present = set(np.unique(label).tolist())
        assert {0, 1, 2} <= present and len(present & set(RINGS)) == 1, present
        ring = RINGS[0] if RINGS[0] in present else RINGS[1]
        ring_classes.add(ring)
        # the rule: the ring's class is the sign of the cue, which is far away and labelled background
        cue = tuple(int(round(c)) for c in info["cue"])
        assert label[cue] == 0
        assert (image[cue] > 0) == (ring == LEARNING_LABELS["ring_bright_cue"]) == (info["cue_sign"] > 0)
        distance = np.linalg.norm(np.subtract(info["cue"], info["ring"]))
        assert CUE_DISTANCE[0] * side <= distance <= CUE_DISTANCE[1] * side
        # the ring itself looks the same for both classes: +1 on noise of std 0.5
        assert abs(image[label == ring].mean() - 1.0) < 0.25
    assert ring_classes == set(RINGS)  # both context classes occur


def test_learning_dataset_is_in_nnunets_raw_layout(tmp_path):
    folder = make_learning_dataset(str(tmp_path), 961, (40, 40), n_cases=3, name="LB")
    with open(os.path.join(folder, "dataset.json")) as f:
        meta = json.load(f)
    assert meta["labels"] == LEARNING_LABELS and meta["numTraining"] == 3
    assert sorted(os.listdir(os.path.join(folder, "imagesTr"))) == [f"case_{i:04d}_0000.nii.gz" for i in range(3)]
    assert len(os.listdir(os.path.join(folder, "labelsTr"))) == 3


def test_variants_take_the_schedule_and_seed_from_the_environment(monkeypatch):
    from nnunet_mamba.trainers import list_trainers
    from nnunet_mamba.trainers import learning as variants

    assert not any(name.endswith(variants.SUFFIX) for name in list_trainers())
    assert issubclass(variants.nnUNetTrainerUMambaBot_learnbench, variants.base_trainers()["nnUNetTrainerUMambaBot"])

    class Base:  # stands in for an nnU-Net trainer: its own schedule, set in __init__
        def __init__(self, *args):
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1000, 250, 50

        def print_to_log_file(self, *args):
            pass

    trainer_class = type("T", (variants.LearnBenchMixin, Base), {})
    monkeypatch.setenv(variants.EPOCHS_ENV, "7")
    monkeypatch.setenv(variants.ITERATIONS_ENV, "30")
    monkeypatch.setenv(variants.SEED_ENV, "3")
    monkeypatch.delenv(variants.VAL_ITERATIONS_ENV, raising=False)
    trainer = trainer_class({}, "2d", 0, {})
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (7, 30, 50)
    first = torch.rand(3)
    trainer_class({}, "2d", 0, {})
    assert torch.equal(first, torch.rand(3))  # seeded


def _args(**overrides) -> argparse.Namespace:
    values = {"dims": None, "trainers": None, "seeds": None, "epochs": None, "iterations": None,
              "val_iterations": None, "cases": None, "size": None, "jobs": None, "device": "cpu", "work": None,
              "out": None, "json": None, "tiny": False, "merge": None, "collect": None}
    return argparse.Namespace(**{**values, **overrides})


def test_default_trainers_per_dimension_baselines_first_without_demo_or_pretrained():
    settings = learning._settings(_args())
    for dim in (2, 3):
        names = [t for t, _ in settings.trainers[dim]]
        assert settings.trainers[dim][:2] == [("nnUNetTrainer", "nnUNetPlans"),
                                              ("nnUNetTrainer", "nnUNetResEncUNetMPlans")]
        assert not any(n.endswith("_demo") for n in names)
        assert "nnUNetTrainerSwinUMamba" not in names and "nnUNetTrainerUMambaBot" in names
    assert "nnUNetTrainerSwinUMambaScratch" in [t for t, _ in settings.trainers[2]]
    assert "nnUNetTrainerSegResMamba" in [t for t, _ in settings.trainers[3]]
    assert "nnUNetTrainerSegResMamba" not in [t for t, _ in settings.trainers[2]]
    assert settings.epochs * settings.iterations >= 1000


@pytest.mark.parametrize("overrides, message", [
    ({"trainers": ["nnUNetTrainerNope"]}, "unknown trainer"),
    ({"trainers": ["nnUNetTrainerViMUNetTiny"], "dims": [3]}, "does not support 3D"),
    ({"trainers": ["nnUNetTrainerUMambaBot:nnUNetResEncUNetMPlans"]}, "only nnUNetTrainer"),
    ({"seeds": [0, 0]}, "--seeds must differ"),
    ({"cases": 6}, "--cases"),
])
def test_arguments_are_checked_before_any_work(tmp_path, overrides, message):
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=message):
        learning.run(_args(work=str(work), **overrides))
    assert not work.exists()


def _record(dim, trainer, plans, seed, fg, seconds=2.0, peak=None):
    dice = {f"dice_{c}": fg for c in learning_results.CLASSES}
    return {"dim": dim, "trainer": trainer, "plans": plans, "label": learning_results.run_label(trainer, plans),
            "seed": seed, "fg_dice": fg, **dice, "sec_per_epoch": seconds, "peak_gib": peak,
            "pseudo_dice": [0.2, fg], "ema_dice": [0.2, fg]}


def test_aggregation_mean_spread_and_baselines_first(tmp_path):
    runs = [_record(2, "nnUNetTrainerUMambaBot", "nnUNetPlans", 0, 0.80, 3.0, 1.5),
            _record(2, "nnUNetTrainerUMambaBot", "nnUNetPlans", 1, 0.86, 5.0, 1.7),
            _record(2, "nnUNetTrainer", "nnUNetResEncUNetMPlans", 0, 0.90),
            _record(2, "nnUNetTrainer", "nnUNetPlans", 0, 0.84),
            _record(2, "nnUNetTrainer", "nnUNetPlans", 1, 0.88)]
    rows = learning_results.aggregate(runs)
    assert [r["trainer"] for r in rows] == ["nnUNetTrainer (ResEnc M)", "nnUNetTrainer", "nnUNetTrainerUMambaBot"]
    bot = rows[2]
    assert bot["seeds"] == 2
    assert bot["fg_dice"] == pytest.approx(0.83) and bot["fg_dice_spread"] == pytest.approx(0.06)
    assert bot["delta_points"] == pytest.approx(-3.0)  # 0.83 - 0.86
    assert bot["sec_per_epoch"] == pytest.approx(4.0) and bot["peak_gib"] == pytest.approx(1.7)
    assert rows[0]["peak_gib"] is None and rows[0]["delta_points"] == pytest.approx(4.0)
    lines = learning_results.table_lines(rows)
    assert "0.830 ±0.030" in lines[3] and "-3.0" in lines[3]
    written = learning_results.write_outputs(str(tmp_path / "lb"), rows, runs, "header")
    assert all(os.path.getsize(p) > 0 for p in written)
    with open(tmp_path / "lb.csv") as f:
        assert [r["trainer"] for r in csv.DictReader(f)] == [r["trainer"] for r in rows]


HEADER_1000 = ("device: NVIDIA H200 | schedule: 20 epochs x 50 iterations (= 1000), 10 pseudo-Dice iterations per "
               "epoch | seeds 0")


def _json_file(path, runs, header=HEADER_1000):
    path.write_text(json.dumps({"header": header, "rows": [], "runs": runs, "failed": []}))
    return str(path)


def test_merge_makes_one_table_from_several_invocations(tmp_path):
    """Seeds trained by separate invocations (other machines, other days) in one table: the spread is over all of
    them, the schedule comes from the files' headers where the runs of older versions lack it."""
    first = _json_file(tmp_path / "a.json", [_record(2, "nnUNetTrainer", "nnUNetPlans", 0, 0.84),
                                            _record(2, "nnUNetTrainerUMambaBot", "nnUNetPlans", 0, 0.80)])
    second = _json_file(tmp_path / "b.json", [{**_record(2, "nnUNetTrainerUMambaBot", "nnUNetPlans", 1, 0.86),
                                              "schedule": "e20_i50_v10", "device": "NVIDIA H200"}])
    prefix, merged = tmp_path / "out" / "lb", tmp_path / "merged.json"
    assert learning.run(_args(merge=[first, second], out=str(prefix), json=str(merged))) == 0
    data = json.loads(merged.read_text())
    bot = next(r for r in data["rows"] if r["trainer"] == "nnUNetTrainerUMambaBot")
    assert bot["seeds"] == 2 and bot["fg_dice"] == pytest.approx(0.83) and bot["delta_points"] == pytest.approx(-1.0)
    assert {r["schedule"] for r in data["runs"]} == {"e20_i50_v10"}
    assert "20 epochs x 50 iterations (= 1000)" in data["header"] and "merged from 2 files" in data["header"]
    assert os.path.getsize(f"{prefix}.md") > 0 and not (tmp_path / "nnunet_mamba_learnbench").exists()


@pytest.mark.parametrize("second_runs, message", [
    ([{**_record(2, "nnUNetTrainerUMambaBot", "nnUNetPlans", 0, 0.9), "schedule": "e30_i100_v10"}],
     "different schedules"),
    ([_record(2, "nnUNetTrainer", "nnUNetPlans", 0, 0.9)], "is in both"),
])
def test_merge_refuses_mixed_schedules_and_repeated_runs(tmp_path, second_runs, message):
    first = _json_file(tmp_path / "a.json", [_record(2, "nnUNetTrainer", "nnUNetPlans", 0, 0.84)])
    second = _json_file(tmp_path / "b.json", second_runs)
    with pytest.raises(SystemExit, match=message):
        learning.run(_args(merge=[first, second], out=str(tmp_path / "lb")))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a learning-benchmark --json file"):
        learning.run(_args(merge=[str(tmp_path / "bad.json")], out=str(tmp_path / "lb")))


def test_a_second_benchmark_on_the_same_work_folder_is_refused(tmp_path):
    """A second invocation on a busy --work would re-preprocess data the first one's runs read (seen: nnU-Net's
    ResEnc M planner rewrote nnUNetPlans_2d under seven running trainings, which failed)."""
    with learning._work_lock(str(tmp_path)):
        with pytest.raises(SystemExit, match=rf"in use by another learning-benchmark \(pid {os.getpid()}\)"):
            with learning._work_lock(str(tmp_path)):
                pass
    with learning._work_lock(str(tmp_path)):  # released: free again
        pass


def test_read_run_takes_nnunets_files(tmp_path):
    fold = tmp_path / "fold_0"
    (fold / "validation").mkdir(parents=True)
    per_class = {str(v): {"Dice": 0.1 * v} for v in range(1, 5)}
    (fold / "validation" / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": 0.25},
                                                                  "mean": per_class}))
    logging = {"epoch_start_timestamps": [0.0, 10.0, 13.0], "epoch_end_timestamps": [9.0, 12.0, 16.0],
               "mean_fg_dice": [0.1, 0.2, 0.3], "ema_fg_dice": [0.1, 0.11, 0.13]}
    torch.save({"logging": logging}, fold / "checkpoint_final.pth")
    (fold / "learnbench_memory.json").write_text(json.dumps({"peak_memory_bytes": 3 * 2 ** 29}))
    run = learning_results.read_run(str(fold))
    assert run["fg_dice"] == 0.25 and run["dice_disk"] == pytest.approx(0.1) and run["dice_ring_dark_cue"] == 0.4
    assert run["sec_per_epoch"] == 3.0 and run["peak_gib"] == 1.5 and run["pseudo_dice"] == [0.1, 0.2, 0.3]


def _training_log(lines: list[str]) -> str:
    return "".join(f"2026-12-02 07:40:{i:02d}.0: {line}\n" for i, line in enumerate(lines))


def test_read_progress_takes_an_unfinished_runs_curve_from_nnunets_newest_log(tmp_path):
    fold = tmp_path / "fold_0"
    assert learning_results.read_progress(str(fold)) is None  # not started
    fold.mkdir()
    assert learning_results.read_progress(str(fold)) is None  # no log yet
    # an older log (before a resume) and the newest, in numpy 2's repr as nnU-Net 2.8 writes it
    (fold / "training_log_2026_12_2_07_00_00.txt").write_text(_training_log(
        ["Pseudo dice [0.1, 0.1, 0.1, 0.1]", "Epoch time: 99.0 s"]))
    (fold / "training_log_2026_12_2_07_40_20.txt").write_text(_training_log([
        "Epoch 0", "Pseudo dice [np.float32(0.9443), np.float32(0.942), np.float32(0.0), np.float32(0.0)]",
        "Epoch time: 19.56 s", "Epoch 1", "Pseudo dice [np.float32(1.0), np.float32(1.0), np.float32(1e-04), "
        "np.float32(0.4)]", "Epoch time: 11.08 s", "Epoch 2", "Epoch time: 10.5 s"]))
    progress = learning_results.read_progress(str(fold))
    assert progress["epochs_done"] == 3 and progress["sec_per_epoch"] == 11.08
    assert progress["pseudo_dice"] == pytest.approx([(0.9443 + 0.942) / 4, (2.0 + 1e-4 + 0.4) / 4])
    line = learning_results.progress_line({"dim": 2, "label": "nnUNetTrainer (ResEnc M)", "seed": 0, "epochs": 20,
                                           **progress})
    assert line == "2D nnUNetTrainer (ResEnc M) seed 0: 3 of 20 epochs, last pseudo Dice 0.600 (no final validation)"


def test_unfinished_runs_are_reported_and_merged(tmp_path, capsys):
    unfinished = [{"dim": 2, "trainer": "nnUNetTrainer", "plans": "nnUNetResEncUNetMPlans",
                   "label": "nnUNetTrainer (ResEnc M)", "seed": 0, "schedule": "e20_i50_v10", "epochs": 20,
                   "epochs_done": 17, "pseudo_dice": [0.5, 0.955], "sec_per_epoch": 9.9}]
    first = tmp_path / "a.json"
    finished = {**_record(2, "nnUNetTrainer", "nnUNetPlans", 0, 0.9), "schedule": "e20_i50_v10"}
    learning._report(HEADER_1000, [finished], str(tmp_path / "a"), str(first),
                     [], unfinished)
    assert "2D nnUNetTrainer (ResEnc M) seed 0: 17 of 20 epochs, last pseudo Dice 0.955" in capsys.readouterr().out
    assert json.loads(first.read_text())["unfinished"] == unfinished
    second = tmp_path / "b.json"  # with an unfinished run of another schedule, which the merge leaves out
    second.write_text(json.dumps({"header": HEADER_1000, "rows": [], "failed": [], "runs": [
        {**_record(2, "nnUNetTrainerUMambaBot", "nnUNetPlans", 0, 0.95), "schedule": "e20_i50_v10"}],
        "unfinished": [{**unfinished[0], "schedule": "e30_i100_v10", "epochs": 30}]}))
    merged = tmp_path / "merged.json"
    learning.merge(argparse.Namespace(merge=[str(first), str(second)], out=str(tmp_path / "m"), json=str(merged)))
    assert json.loads(merged.read_text())["unfinished"] == unfinished
    third = tmp_path / "c.json"  # a later rerun that finished the unfinished run: it leaves the list
    third.write_text(json.dumps({"header": HEADER_1000, "rows": [], "failed": [], "unfinished": [], "runs": [
        {**_record(2, "nnUNetTrainer", "nnUNetResEncUNetMPlans", 0, 0.96), "schedule": "e20_i50_v10"}]}))
    capsys.readouterr()
    learning.merge(argparse.Namespace(merge=[str(first), str(second), str(third)], out=str(tmp_path / "m"),
                                      json=str(merged)))
    assert json.loads(merged.read_text())["unfinished"] == []
    assert "not in the table" not in capsys.readouterr().out


@pytest.mark.e2e
def test_tiny_benchmark_through_the_nnunet_cli(tmp_path):
    """--tiny with nnU-Net's trainer and one seed: dataset, plan/preprocess, nnUNetv2_train, table and plots."""
    work, prefix = tmp_path / "work", tmp_path / "out" / "lb"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "nnUNet_extTrainer": os.path.join(REPO, "nnUNet_trainers")}
    command = [os.path.join(BIN, "nnunet-mamba"), "learning-benchmark", "--tiny", "--trainers", "nnUNetTrainer",
               "--seeds", "0", "--cases", "10", "--work", str(work), "--out", str(prefix),
               "--json", str(tmp_path / "lb.json")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for suffix in (".md", ".csv", ".png", "_dice_epochs.png"):
        assert os.path.getsize(f"{prefix}{suffix}") > 0
    with open(f"{prefix}.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["trainer"] == "nnUNetTrainer" and row["seeds"] == "1"
    for key in ["fg_dice", *(f"dice_{c}" for c in learning_results.CLASSES)]:
        assert 0.0 <= float(row[key]) <= 1.0
    assert float(row["sec_per_epoch"]) > 0
    (run,) = json.loads((tmp_path / "lb.json").read_text())["runs"]
    assert len(run["pseudo_dice"]) == learning.TINY["epochs"]
    assert "nnUNetTrainer" in result.stdout and "fg Dice" in result.stdout
    # a rerun finds the finished run and trains nothing
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "1 of 1 runs already finished" in again.stdout, again.stdout + again.stderr


def test_readme_learning_table_is_the_merge_of_the_evidence_files():
    """The README's H200 table states what ``--merge docs/learning_benchmark/*.json`` gives: every row's seeds,
    foreground Dice (mean and half spread) and class Dice, and no row more or less."""
    import glob
    import re

    paths = sorted(glob.glob(os.path.join(REPO, "docs", "learning_benchmark", "*.json")))
    records, _ = learning_results.merge_runs(paths)
    expected = {}
    for row in learning_results.aggregate(records):
        cells = []
        for key in ["fg_dice"] + [f"dice_{c}" for c in learning_results.CLASSES]:
            half = (row.get(f"{key}_spread") or 0) / 2
            cells.append(f"{row[key]:.3f}" + (f" ±{half:.3f}" if row["seeds"] > 1 and round(half, 3) > 0 else ""))
        expected[(row["dim"], row["trainer"])] = [str(row["seeds"]), *cells, f"{row['delta_points']:+.1f}"]
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Learning benchmark"):readme.index("## Troubleshooting")]
    stated = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and re.fullmatch(r"[23]D", cells[0]) and len(cells) == 11:
            stated[(cells[0], cells[1])] = cells[2:9]
    assert stated == expected


def _finished_fold(fold, fg: float) -> None:
    """nnU-Net's files of a finished run, as read_run reads them."""
    (fold / "validation").mkdir(parents=True)
    (fold / "validation" / "summary.json").write_text(json.dumps(
        {"foreground_mean": {"Dice": fg}, "mean": {str(v): {"Dice": fg} for v in range(1, 5)}}))
    torch.save({"logging": {"epoch_start_timestamps": [0.0], "epoch_end_timestamps": [2.0], "mean_fg_dice": [fg],
                            "ema_fg_dice": [fg]}}, fold / "checkpoint_final.pth")


def test_collect_builds_the_table_from_the_nnunet_files_of_work_folders(tmp_path, capsys):
    """A benchmark killed before its report: --collect reads its finished and unfinished runs, one schedule."""
    work = tmp_path / "work"
    root = work / "results" / "e20_i50_v10_seed1"
    _finished_fold(root / learning.dataset_name(2) / "nnUNetTrainerUMambaBot_learnbench__nnUNetPlans__2d" / "fold_0",
                   0.9)
    unfinished = root / learning.dataset_name(3) / "nnUNetTrainer_learnbench__nnUNetResEncUNetMPlans__3d_fullres"
    (unfinished / "fold_0").mkdir(parents=True)
    (unfinished / "fold_0" / "training_log_2026_12_2_07_40_20.txt").write_text(_training_log(
        ["Pseudo dice [0.5, 0.5, 0.0, 0.0]", "Epoch time: 3.0 s"]))
    (root / learning.dataset_name(2) / "unrelated_folder").mkdir()
    out = tmp_path / "collected.json"
    assert learning.run(_args(collect=[str(work)], out=str(tmp_path / "c"), json=str(out))) == 0
    data = json.loads(out.read_text())
    assert [(r["dim"], r["label"], r["seed"], r["fg_dice"]) for r in data["runs"]] == [
        (2, "nnUNetTrainerUMambaBot", 1, 0.9)]
    assert [(u["dim"], u["label"], u["epochs_done"], u["epochs"]) for u in data["unfinished"]] == [
        (3, "nnUNetTrainer (ResEnc M)", 1, 20)]
    assert "20 epochs x 50 iterations" in data["header"] and "1 finished and 1 unfinished" in data["header"]
    assert learning_results.merge_runs([str(out)])[0][0]["schedule"] == "e20_i50_v10"  # --merge takes the file
    # a second schedule in the folders: the user chooses
    _finished_fold(work / "results" / "e30_i100_v10_seed0" / learning.dataset_name(2)
                   / "nnUNetTrainer_learnbench__nnUNetPlans__2d" / "fold_0", 0.95)
    with pytest.raises(SystemExit, match="runs of 2 schedules"):
        learning.run(_args(collect=[str(work)], out=str(tmp_path / "c")))
    assert learning.run(_args(collect=[str(work)], out=str(tmp_path / "c"), json=str(out), epochs=30,
                              iterations=100, val_iterations=10)) == 0
    assert [r["fg_dice"] for r in json.loads(out.read_text())["runs"]] == [0.95]
    with pytest.raises(SystemExit, match="no runs of e5_i5_v5"):
        learning.run(_args(collect=[str(work)], epochs=5, iterations=5, val_iterations=5))
    with pytest.raises(SystemExit, match="no results folder"):
        learning.run(_args(collect=[str(tmp_path / "nowhere")]))


def test_read_run_without_the_checkpoint_takes_curve_and_times_from_the_training_log(tmp_path):
    """A copy of the results without weights: the final Dice from summary.json, the rest from nnU-Net's log."""
    fold = tmp_path / "fold_0"
    _finished_fold(fold, 0.8)
    (fold / "checkpoint_final.pth").unlink()
    with pytest.raises(FileNotFoundError, match="neither checkpoint_final.pth nor a training log"):
        learning_results.read_run(str(fold))
    (fold / "training_log_2026_12_2_07_40_20.txt").write_text(_training_log([
        "Pseudo dice [1.0, 1.0, 0.0, 0.0]", "Epoch time: 4.0 s", "Pseudo dice [1.0, 1.0, 0.5, 0.5]",
        "Epoch time: 2.0 s", "Pseudo dice [1.0, 1.0, 1.0, 0.0]", "Epoch time: 3.0 s"]))
    run = learning_results.read_run(str(fold))
    assert run["fg_dice"] == 0.8 and run["sec_per_epoch"] == 3.0 and run["ema_dice"] is None
    assert run["pseudo_dice"] == [0.5, 0.75, 0.75]
