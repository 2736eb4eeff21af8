"""covnet_train on a tiny workspace: outputs, self-contained checkpoints, resume, refusals, the schedule."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch
from kit.workspaces import TRAIN_FLAGS, copy_workspace, make_tiny_trainable_workspace

from covnet.checkpoint import Checkpoint
from covnet.cli.common import run_command
from covnet.cli.train import main as train_main
from covnet.image.io import read_image
from covnet.inference.predictor import InferenceSettings, Predictor
from covnet.runtime.log import setup_logging
from covnet.training.distributed import DistributedContext, device_for
from covnet.training.progress import History
from covnet.training.session import poly_learning_rate
from covnet.training.settings import TrainingSettings

SCRIPTS = __import__("pathlib").Path(sys.executable).parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace with fold 0 trained for 3 tiny epochs."""
    workspace = make_tiny_trainable_workspace(tmp_path_factory.mktemp("trained") / "ws")
    code = run_command("covnet_train", train_main, ["0", "--workspace", str(workspace.root), *TRAIN_FLAGS])
    assert code == 0
    return workspace


def test_a_trained_fold_has_every_output(trained):
    fold = trained.fold(0)
    assert not fold.checkpoint("latest").exists()
    final = Checkpoint.load(fold.checkpoint("final"))
    settings = json.loads(fold.settings_file.read_text())
    splits = json.loads(trained.splits_json.read_text())
    assert settings["validation"] == splits[0]["val"] and settings["train"] == splits[0]["train"]
    recorded = TrainingSettings.from_json(settings["settings"])
    assert recorded == TrainingSettings.from_json(final.settings) and recorded.epochs == 3
    # The best checkpoint is the epoch with the best moving-average pseudo-Dice.
    ema = final.history["ema_pseudo_dice"]
    best = Checkpoint.load(fold.checkpoint("best"))
    assert best.epoch == 1 + int(np.nanargmax(ema)) and best.best_ema_dice == pytest.approx(np.nanmax(ema))
    log = fold.log_file.read_text()
    assert [log.count(f"epoch {epoch}: train loss") for epoch in (1, 2, 3)] == [1, 1, 1]
    assert "waiting for data" in log and "training finished after 3 epochs" in log
    plot = matplotlib.image.imread(fold.progress_plot)
    assert plot.ndim == 3 and min(plot.shape[:2]) > 100 and len(np.unique(plot.reshape(-1, plot.shape[2]), axis=0)) > 10
    summary = fold.validation_summary()
    assert [case["case"] for case in summary["per_case"]] == sorted(splits[0]["val"])
    assert {"left_lung", "right_lung", "infection", "lungs"} <= set(summary["mean"])
    for case in splits[0]["val"]:           # each prediction in its case's own geometry, with the dataset's labels
        predicted, geometry = read_image(fold.validation_dir / f"{case}.nii.gz")
        reference, reference_geometry = read_image(trained.labels_tr / f"{case}.nii.gz")
        assert geometry == reference_geometry and predicted.shape == reference.shape
        assert set(np.unique(predicted)) <= {0, 1, 2, 3}
    for row in summary["per_case"]:
        assert all(row[name]["dice"] is None or 0 <= row[name]["dice"] <= 1 for name in summary["mean"])


def test_checkpoint_is_plain_and_self_contained(trained, tmp_path):
    path = trained.fold(0) / "checkpoint_final.pth"
    raw = torch.load(path, weights_only=True)       # plain types only
    assert raw["epoch"] == 3 and raw["fold"] == "0" and len(raw["history"]["train_loss"]) == 3
    checkpoint = Checkpoint.load(path)
    assert checkpoint.typed_plan.lateral_pairs == [[1, 2]]
    # Inference from the checkpoint alone: a raw case comes back in its own geometry.
    copied = tmp_path / "model.pth"
    copied.write_bytes(path.read_bytes())
    image, geometry = read_image(trained.images_tr / "phantom_000_0000.nii.gz")
    predictor = Predictor.from_files([copied], settings=InferenceSettings(use_mirroring=False))
    segmentation, probabilities = predictor.predict_image(image, geometry, output_file=tmp_path / "out.nii.gz")
    written, written_geometry = read_image(tmp_path / "out.nii.gz")
    assert written.shape == image.shape and written_geometry == geometry
    assert np.array_equal(written, segmentation) and set(np.unique(written)) <= {0, 1, 2, 3}
    assert np.allclose(probabilities.full().sum(axis=0), 1, atol=1e-4)


def test_poly_schedule_per_epoch():
    assert poly_learning_rate(0.01, 0, 1000) == 0.01
    assert poly_learning_rate(0.01, 500, 1000) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_learning_rate(0.01, 999, 1000) > 0


def test_an_epoch_without_validation_says_so_instead_of_nan():
    history = History()
    nan = float("nan")
    history.record(1.25, nan, [nan, nan], 0.01, 3.0, 0.07, 0.1)
    history.record(1.1, 0.9, [0.5, 0.75], 0.009, 3.0, 0.07, 0.1)
    assert "no validation" in history.epoch_line(0, ["lungs", "infection"])
    assert "nan" not in history.epoch_line(0, ["lungs", "infection"])
    assert "pseudo-Dice lungs 0.500 infection 0.750" in history.epoch_line(1, ["lungs", "infection"])


def test_finished_fold_is_not_redone_and_needs_a_choice(trained, capsys):
    before = (trained.fold(0) / "checkpoint_final.pth").stat().st_mtime_ns
    code = run_command("covnet_train", train_main, ["0", "--workspace", str(trained.root), *TRAIN_FLAGS])
    error = capsys.readouterr().err
    assert code == 2 and "already holds a finished training" in error
    assert run_command("covnet_train", train_main, ["0", "--workspace", str(trained.root), "--continue",
                                                    *TRAIN_FLAGS]) == 0
    assert (trained.fold(0) / "checkpoint_final.pth").stat().st_mtime_ns == before


def test_validate_only_redoes_the_validation(trained):
    fold = trained.fold(0)
    before = fold.validation_summary()
    shutil.rmtree(fold.validation_dir)
    # Without flags: the validation settings the fold was trained with (no mirroring), so the same scores.
    assert run_command("covnet_train", train_main, ["0", "--workspace", str(trained.root), "--validate-only"]) == 0
    assert fold.validation_summary() == before
    assert sorted(path.name for path in fold.validation_dir.glob("*.nii.gz")) == \
        sorted(f"{case['case']}.nii.gz" for case in before["per_case"])


def test_bad_fold_and_missing_preprocessing_are_one_line(trained, tmp_path, capsys):
    assert run_command("covnet_train", train_main, ["7", "--workspace", str(trained.root)]) == 2
    assert "fold '7' does not exist" in capsys.readouterr().err
    assert run_command("covnet_train", train_main, ["0", "--workspace", str(tmp_path / "empty")]) == 2
    assert "not found" in capsys.readouterr().err


def test_fold_all_trains_on_every_case_without_validation(trained, tmp_path):
    workspace = copy_workspace(trained.root, tmp_path / "ws")
    assert run_command("covnet_train", train_main, ["all", "--workspace", str(workspace.root), "--epochs", "1",
                                                    "--iters-per-epoch", "1", "--val-iters", "1",
                                                    "--num-workers", "0"]) == 0
    settings = json.loads((workspace.fold("all") / "settings.json").read_text())
    assert settings["validation"] == [] and len(settings["train"]) == 10
    assert not (workspace.fold("all") / "validation").exists()


def test_background_workers_train_too(trained, tmp_path):
    workspace = copy_workspace(trained.root, tmp_path / "ws")
    flags = [f for f in TRAIN_FLAGS]
    flags[flags.index("--num-workers") + 1] = "1"
    result = subprocess.run([str(SCRIPTS / "covnet_train"), "1", "--workspace", str(workspace.root), *flags,
                             "--epochs", "1"], capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert result.returncode == 0, result.stderr
    final = Checkpoint.load(workspace.fold(1).checkpoint("final"))
    assert final.settings["num_workers"] == 1 and final.epoch == 1
    assert all(np.isfinite(final.history["train_loss"])) and workspace.fold(1).validation_summary()["per_case"]


def test_compile_on_a_cpu_is_ignored_with_a_warning(trained, tmp_path, capsys):
    workspace = copy_workspace(trained.root, tmp_path / "ws")
    assert run_command("covnet_train", train_main, ["all", "--workspace", str(workspace.root), "--epochs", "1",
                                                    "--iters-per-epoch", "1", "--val-iters", "0", "--num-workers", "0",
                                                    "--device", "cpu", "--compile"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert "warning: --compile is ignored on cpu: torch.compile is used on CUDA only (on a CPU it compiled for " \
           "minutes and then ran slower); training runs uncompiled" in warnings


def test_a_gpu_named_under_torchrun_is_ignored_with_a_warning(capsys):
    setup_logging()
    context = DistributedContext(rank=0, local_rank=0, world_size=2)
    assert device_for(context, torch.device("cuda", 1)) == torch.device("cuda", 0)
    assert capsys.readouterr().err.splitlines() == [
        "warning: --device cuda:1 is ignored under torchrun: each of the 2 processes uses its own GPU, "
        "cuda:LOCAL_RANK; pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)"]
    assert device_for(context, torch.device("cuda")) == torch.device("cuda", 0)
    assert device_for(DistributedContext(), torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert capsys.readouterr().err == ""


def test_num_folds_for_fold_all_is_ignored_with_a_warning(trained, tmp_path, capsys):
    workspace = copy_workspace(trained.root, tmp_path / "ws")
    assert run_command("covnet_train", train_main, ["all", "--workspace", str(workspace.root), "--num-folds", "3",
                                                    "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "0",
                                                    "--num-workers", "0"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert "warning: --num-folds is ignored: fold 'all' trains on every case, without a split" in warnings


def test_training_flags_with_validate_only_are_ignored_with_a_warning(trained, tmp_path, capsys):
    workspace = copy_workspace(trained.root, tmp_path / "ws")
    assert run_command("covnet_train", train_main, ["0", "--workspace", str(workspace.root), "--validate-only",
                                                    "--continue", "--epochs", "9", "--lr", "0.1",
                                                    "--no-val-mirroring"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert "warning: --continue, --epochs, --lr are ignored: --validate-only only redoes the validation of " \
           "checkpoint_final.pth" in warnings
