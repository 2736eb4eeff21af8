"""covnet_train's starts and restarts: --continue (resume, extend, refuse another recipe), refusals that leave
nothing behind, --num-folds (leave-one-out on four cases), fold names, and --seed reproducibility."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from kit.workspaces import command, copy_workspace, make_tiny_trainable_workspace, phantom_image

from covnet.checkpoint import Checkpoint
from covnet.cli.settings_flags import add_settings_flags, settings_from_args
from covnet.dataset import DatasetDescription
from covnet.image.io import write_image
from covnet.inference.model_choice import select_checkpoints
from covnet.runtime.errors import CovnetError
from covnet.training.distributed import DistributedContext
from covnet.training.run import fold_job
from covnet.training.session import TrainingSession
from covnet.training.settings import TrainingSettings

# One iteration per epoch, no background workers, validation without mirroring: seconds per run.
FLAGS = ("--iters-per-epoch", "1", "--val-iters", "1", "--num-workers", "0", "--no-val-mirroring")


def train(workspace, fold, *flags) -> int:
    return command("covnet_train", fold, "--workspace", workspace.root, *flags)


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def workspace(trained, tmp_path):
    return copy_workspace(trained, tmp_path / "ws")


def test_continue_with_more_epochs_extends_a_finished_training(workspace):
    fold = workspace.fold(0)
    before = Checkpoint.load(fold.checkpoint("final"))
    assert before.epoch == 1 and fold.validation_summary() is not None
    # Only --epochs is given: every other setting is the one the training was started with.
    assert train(workspace, "0", "--continue", "--epochs", "3") == 0
    after = Checkpoint.load(fold.checkpoint("final"))
    assert after.epoch == 3 and len(after.history["train_loss"]) == 3
    assert after.history["train_loss"][0] == before.history["train_loss"][0]     # the same run, continued
    assert after.settings["epochs"] == 3 and after.settings["num_workers"] == 0
    assert after.settings["validation_mirroring"] is False and after.settings["iterations_per_epoch"] == 1
    assert not all(torch.equal(after.network_state[name], weights) for name, weights in before.network_state.items())
    assert not fold.checkpoint("latest").exists()
    log = fold.log_file.read_text()
    assert "extending the finished training from 1 to 3 epochs" in log and "epoch 3: train loss" in log
    assert json.loads(fold.settings_file.read_text())["settings"]["epochs"] == 3
    summary = fold.validation_summary()
    assert sorted(row["case"] for row in summary["per_case"]) == sorted(
        json.loads(workspace.splits_json.read_text())[0]["val"])


def test_continue_alone_on_a_finished_training_changes_nothing(workspace):
    fold = workspace.fold(0)
    before = {path.name: path.stat().st_mtime_ns for path in fold.path.iterdir() if path.is_file()}
    assert train(workspace, "0", "--continue") == 0
    after = {path.name: path.stat().st_mtime_ns for path in fold.path.iterdir() if path.is_file()}
    assert {name: time for name, time in after.items() if name != "training_log.txt"} == \
        {name: time for name, time in before.items() if name != "training_log.txt"}
    assert "the training finished (1 epochs) and is validated; nothing to do" in fold.log_file.read_text()


def test_continue_cannot_shorten_a_training_or_change_its_recipe(workspace, capsys):
    fold = workspace.fold(0)
    assert train(workspace, "0", "--continue", "--epochs", "3") == 0       # now 3 epochs
    capsys.readouterr()
    before = {path.name: path.stat().st_mtime_ns for path in fold.path.rglob("*") if path.is_file()}
    assert train(workspace, "0", "--continue", "--epochs", "2") == 2
    assert "holds 3 epochs; --epochs 2 cannot shorten a training" in error_line(capsys)
    assert train(workspace, "0", "--continue", "--lr", "0.5", "--no-batch-dice") == 2
    line = error_line(capsys)
    assert "started with --lr 0.01, --batch-dice" in line and "continued with --lr 0.5, --no-batch-dice" in line
    assert {path.name: path.stat().st_mtime_ns for path in fold.path.rglob("*") if path.is_file()} == before


def test_continue_without_a_checkpoint_says_so_and_starts(workspace):
    assert train(workspace, "2", "--continue", "--epochs", "1", *FLAGS) == 0
    fold = workspace.fold(2)
    assert Checkpoint.load(fold.checkpoint("final")).epoch == 1
    assert "holds no checkpoint yet; training starts at epoch 1" in fold.log_file.read_text()


def test_a_refused_start_leaves_nothing(workspace, tmp_path, capsys):
    results_before = sorted(path.name for path in workspace.results.iterdir())
    assert train(workspace, "7", *FLAGS) == 2
    assert error_line(capsys).endswith("fold '7' does not exist; choose 0 to 4 or 'all'")
    assert train(workspace, "3", "--pretrained", tmp_path / "missing.pth", *FLAGS) == 2
    assert "missing.pth: checkpoint not found" in error_line(capsys)
    assert train(workspace, "3", "--iters-per-epoch", "0") == 2
    assert error_line(capsys).endswith("--iters-per-epoch must be at least 1, not 0")
    assert train(workspace, "3", "--momentum", "1") == 2
    assert error_line(capsys).endswith("--momentum must be below 1, not 1")
    assert train(workspace, "3", "--num-folds", "4") == 2
    line = error_line(capsys)
    assert "splits.json: holds 5 folds, not the 4 asked for (--num-folds); delete" in line
    assert sorted(path.name for path in workspace.results.iterdir()) == results_before


def test_leave_one_out_on_four_cases(tmp_path, capsys):
    workspace = make_tiny_trainable_workspace(tmp_path / "ws", num_labelled=4)
    description = DatasetDescription.load(workspace.dataset_json)
    description.groups = {}                             # four patients, one case each
    description.save(workspace.dataset_json)
    assert train(workspace, "0", *FLAGS) == 2          # 5 folds by default: one line saying what to do
    assert "cannot make 5 folds from 4 patient(s); use --num-folds 4 (leave-one-out)" in error_line(capsys)
    assert not workspace.splits_json.exists() and not workspace.results.exists()
    assert train(workspace, "3", "--num-folds", "4", "--epochs", "1", *FLAGS) == 0
    capsys.readouterr()
    splits = json.loads(workspace.splits_json.read_text())
    assert len(splits) == 4 and all(len(split["val"]) == 1 and len(split["train"]) == 3 for split in splits)
    settings = json.loads(workspace.fold(3).settings_file.read_text())
    assert settings["validation"] == splits[3]["val"] and settings["train"] == splits[3]["train"]
    assert [row["case"] for row in workspace.fold(3).validation_summary()["per_case"]] == splits[3]["val"]
    assert workspace.fold_names() == ["0", "1", "2", "3"] and workspace.trained_folds() == ["3"]
    assert train(workspace, "4", *FLAGS) == 2
    assert error_line(capsys).endswith("fold '4' does not exist; choose 0 to 3 or 'all'")
    assert not workspace.fold(4).exists()
    # The split's folds are what prediction offers and ensembles.
    paths, description = select_checkpoints(workspace.results)
    assert paths == [workspace.fold(3).checkpoint("final")] and "folds 3" in description
    for bad in ("9", "abc", "-1"):
        with pytest.raises(CovnetError, match=f"-f '{bad}' does not exist; choose 0 to 3 or 'all'"):
            select_checkpoints(workspace.results, [bad])
    write_image(*phantom_image(workspace, 0), tmp_path / "in" / "case.nii.gz")
    assert command("covnet_predict", "-i", tmp_path / "in", "-o", tmp_path / "out", "--workspace", workspace.root,
                   "-f", "9") == 2
    assert error_line(capsys).endswith("-f '9' does not exist; choose 0 to 3 or 'all'")


def test_fold_jobs_follow_the_split(trained):
    job = fold_job(trained, "1")
    splits = json.loads(trained.splits_json.read_text())
    assert (job.train_cases, job.validation_cases) == (splits[1]["train"], splits[1]["val"])
    assert job.folder == trained.fold(1) and job.name == "1"
    every = fold_job(trained, " ALL ")
    assert every.name == "all" and every.validation_cases == [] and len(every.train_cases) == 10
    for bad in ("5", "abc", "1.5", "-1", "01"):
        with pytest.raises(CovnetError, match="does not exist; choose 0 to 4 or 'all'"):
            fold_job(trained, bad)


def _initial_weights(workspace, seed: int) -> dict:
    settings = TrainingSettings(seed=seed, num_workers=0)
    return TrainingSession(fold_job(workspace, "0"), settings, DistributedContext(), torch.device("cpu")
                           ).network.state_dict()


def test_the_seed_sets_the_network_initialisation(trained):
    first, again, other = (_initial_weights(trained, seed) for seed in (5, 5, 6))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_two_runs_with_one_seed_give_the_same_losses(trained, tmp_path):
    losses = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        workspace = copy_workspace(trained, tmp_path / run)
        assert train(workspace, "all", "--seed", str(seed), "--epochs", "1", "--iters-per-epoch", "2",
                     "--val-iters", "1", "--num-workers", "0") == 0
        history = Checkpoint.load(workspace.fold("all").checkpoint("final")).history
        losses[run] = history["train_loss"] + history["validation_loss"]
    assert losses["a"] == losses["b"]
    assert losses["a"] != losses["c"] and np.all(np.isfinite(losses["c"]))


def test_flags_are_the_settings_fields():
    import argparse
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, TrainingSettings)
    args = parser.parse_args(["--iters-per-epoch", "7", "--no-val-mirroring", "--weight-decay", "0",
                              "--gradient-clip", "3", "--oversample-foreground", "1", "--no-batch-dice"])
    settings = settings_from_args(TrainingSettings, args)
    assert (settings.iterations_per_epoch, settings.validation_mirroring, settings.weight_decay,
            settings.gradient_clip, settings.oversample_foreground, settings.batch_dice) == (7, False, 0, 3, 1, False)
    assert settings.epochs == TrainingSettings().epochs                   # not given: the default
    recorded = TrainingSettings(epochs=4, initial_lr=0.5)
    continued = settings_from_args(TrainingSettings, parser.parse_args(["--epochs", "9"]), base=recorded)
    assert (continued.epochs, continued.initial_lr) == (9, 0.5)          # not given: the recorded value
    assert "default: 250" in parser.format_help() and "--augmentation" not in parser.format_help()
