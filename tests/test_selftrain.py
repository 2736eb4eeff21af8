"""covnet_selftrain on a tiny workspace (10 labelled, 4 unlabelled phantoms; folds 0 and 1 trained tiny):
rounds, pseudo-labels stored as preprocessed cases, honest validation, teacher choice, refusals, prediction."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from kit.workspaces import copy_workspace, run_selftrain, selftrained_workspace_once, trained_workspace_once

from covnet.checkpoint import Checkpoint
from covnet.cli.common import run_command
from covnet.cli.predict import main as predict_main
from covnet.inference.predictor import InferenceSettings, Predictor
from covnet.planning.plans import Plan
from covnet.preprocessing.storage import load_case
from covnet.runtime.errors import CovnetError
from covnet.selftrain.teacher import choose_teacher, ranking_score
from covnet.workspace import Workspace

LABELS = {0, 1, 2, 3}
IGNORE = 4





@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Workspace:
    return trained_workspace_once(tmp_path_factory)


@pytest.fixture(scope="module")
def selftrained(tmp_path_factory) -> Workspace:
    return selftrained_workspace_once(tmp_path_factory)


def _fold_score(workspace: Workspace, fold: int) -> float:
    summary = json.loads((workspace.fold(fold) / "validation" / "summary.json").read_text())
    return ranking_score(summary["mean"], Plan.load(workspace.plans_json))


def _pool(workspace: Workspace) -> list[str]:
    return sorted(path.stem for path in workspace.preprocessed_pool.glob("*.json"))


def test_two_rounds_use_up_the_pool(selftrained):
    workspace = selftrained
    summary = json.loads((workspace.selftrain / "summary.json").read_text())
    best = max((0, 1), key=lambda fold: (_fold_score(workspace, fold), -fold))
    assert summary["teacher"]["mode"] == "best" and summary["teacher"]["fold"] == str(best)
    assert {"lungs", "infection"} <= set(summary["teacher"]["validation"])
    rounds = summary["rounds"]
    assert [entry["round"] for entry in rounds] == [1, 2]
    assert [entry["pool_size"] for entry in rounds] == [2, 0]
    added = [case for entry in rounds for case in entry["cases_added"]]
    assert sorted(added) == _pool(workspace) and len(set(added)) == 4
    for entry in rounds:
        assert set(entry["confidence"]) == set(entry["cases_added"])
        assert all(0 < value <= 1 for value in entry["confidence"].values())
        assert set(entry["validation"]["lungs"]) == {"dice", "nsd"}
        # the cases taken are the most confident of the candidates
        selection = json.loads((workspace.selftrain_round(entry["round"]) / "selection.json").read_text())
        taken = min(selection["confidence"].values())
        others = [value for case, value in selection["candidates_confidence"].items()
                  if case not in entry["cases_added"]]
        assert all(value <= taken for value in others)
    for index in (1, 2):
        folder = workspace.selftrain_round(index)
        for name in ("selection.json", "checkpoint_final.pth", "validation/summary.json", "pseudo_labels"):
            assert (folder / name).exists(), name
        assert not (folder / "candidates").exists()
    assert summary["final"]["round"] == 2 and summary["final"]["reason"] == "last"
    final = workspace.selftrain_final / "checkpoint_final.pth"
    assert final.read_bytes() == (workspace.selftrain_round(2) / "checkpoint_final.pth").read_bytes()
    assert (workspace.selftrain / "progress.png").stat().st_size > 0
    assert not list(workspace.root.rglob(".tmp-*"))


def test_pseudo_labels_are_preprocessed_cases_on_the_pool_images(selftrained):
    workspace = selftrained
    selection = json.loads((workspace.selftrain_round(1) / "selection.json").read_text())
    folder = workspace.selftrain_round(1) / "pseudo_labels"
    teacher = Checkpoint.load(workspace.fold(json.loads((workspace.selftrain / "summary.json").read_text())
                                              ["teacher"]["fold"]) / "checkpoint_final.pth")
    predictor = Predictor([teacher], settings=InferenceSettings(use_mirroring=False))
    for case in selection["cases_added"]:
        image, segmentation, properties = load_case(folder, case)
        pool_image, _, pool_properties = load_case(workspace.preprocessed_pool, case)
        assert (folder / f"{case}.npy").resolve() == (workspace.preprocessed_pool / f"{case}.npy").resolve()
        assert np.array_equal(image, pool_image) and segmentation.shape == pool_image.shape[1:]
        assert set(np.unique(segmentation)) <= LABELS | {IGNORE}
        assert properties.bounding_box == pool_properties.bounding_box
        for label, voxels in properties.class_locations.items():
            assert int(label) in (1, 2, 3)
            assert all(segmentation[tuple(voxel)] == int(label) for voxel in voxels[:50])
        # the teacher's argmax where it is at least 0.9 sure, ignore elsewhere
        probabilities = predictor.predict_probabilities(np.asarray(pool_image))
        largest, argmax = probabilities.max(dim=0)
        expected = torch.where(largest < 0.9, IGNORE, argmax).numpy()
        assert np.mean(expected == segmentation) > 0.999
    stored = json.loads((folder / f"{selection['cases_added'][0]}.json").read_text())
    assert stored["pseudo_label"]["round"] == 1 and stored["pseudo_label"]["min_confidence"] == 0.9


def test_students_never_train_on_the_held_out_cases(selftrained):
    workspace = selftrained
    splits = json.loads(workspace.splits_json.read_text())
    summary = json.loads((workspace.selftrain / "summary.json").read_text())
    fold = int(summary["teacher"]["fold"])
    pseudo = []
    for entry in summary["rounds"]:
        folder = workspace.selftrain_round(entry["round"])
        settings = json.loads((folder / "settings.json").read_text())
        pseudo += entry["cases_added"]
        assert sorted(settings["validation"]) == sorted(splits[fold]["val"])
        assert not set(settings["train"]) & set(settings["validation"])
        assert sorted(settings["train"]) == sorted(splits[fold]["train"] + pseudo)
        assert {case: settings["case_weights"][case] for case in pseudo} == {case: 0.5 for case in pseudo}
        assert all(settings["case_weights"][case] == 1.0 for case in splits[fold]["train"])
        expected_start = workspace.fold(fold) if entry["round"] == 1 else workspace.selftrain_round(entry["round"] - 1)
        assert Path(settings["settings"]["pretrained"]) == expected_start / "checkpoint_final.pth"
        validated = json.loads((folder / "validation" / "summary.json").read_text())
        assert sorted(case["case"] for case in validated["per_case"]) == sorted(splits[fold]["val"])
    checkpoint = Checkpoint.load(workspace.selftrain_final / "checkpoint_final.pth")
    assert checkpoint.fold == "selftrain_round_02"
    assert checkpoint.typed_plan.ignore_label == IGNORE and checkpoint.typed_plan.num_classes == 4


def test_a_second_run_needs_continue_and_continue_redoes_nothing(selftrained, capsys):
    workspace = selftrained
    before = (workspace.selftrain / "summary.json").read_text()
    checkpoint_time = (workspace.selftrain_round(2) / "checkpoint_final.pth").stat().st_mtime_ns
    assert run_selftrain(workspace) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "already holds a self-training" in error[0] and "--continue" in error[0]
    assert run_selftrain(workspace, "--continue") == 0
    assert json.loads((workspace.selftrain / "summary.json").read_text()) == json.loads(before)
    assert (workspace.selftrain_round(2) / "checkpoint_final.pth").stat().st_mtime_ns == checkpoint_time
    assert run_selftrain(workspace, "--continue", "--min-confidence", "0.5") == 2
    assert "--min-confidence 0.9" in capsys.readouterr().err


def test_covnet_predict_uses_the_selftrained_model(selftrained, tmp_path, capsys):
    workspace = selftrained
    image = workspace.images_tr / "phantom_000_0000.nii.gz"
    code = run_command("covnet_predict", predict_main, ["-i", str(image), "-o", str(tmp_path / "out"), "--workspace",
                                                        str(workspace.root), "--disable-tta"])
    assert code == 0
    assert "model: the self-trained model" in capsys.readouterr().out
    assert (tmp_path / "out" / "phantom_000.nii.gz").is_file()


def _write_mean(workspace: Workspace, fold: int, lungs: float, infection: float) -> None:
    path = workspace.fold(fold) / "validation" / "summary.json"
    summary = json.loads(path.read_text())
    summary["mean"]["lungs"]["dice"], summary["mean"]["infection"]["dice"] = lungs, infection
    summary["mean"]["left_lung"]["dice"] = 1.0       # labels do not count when the regions are there
    path.write_text(json.dumps(summary))


def test_teacher_choice(trained, tmp_path, capsys):
    workspace = copy_workspace(trained, tmp_path / "ws")
    _write_mean(workspace, 0, lungs=0.9, infection=0.1)     # mean 0.5
    _write_mean(workspace, 1, lungs=0.6, infection=0.6)     # mean 0.6
    teacher = choose_teacher(workspace, "best")
    splits = json.loads(workspace.splits_json.read_text())
    assert teacher.fold == "1" and teacher.folds == ["1"]
    assert teacher.validation_cases == splits[1]["val"] and teacher.train_cases == splits[1]["train"]
    _write_mean(workspace, 0, lungs=0.9, infection=0.5)     # mean 0.7
    assert choose_teacher(workspace, "best").fold == "0"
    ensemble = choose_teacher(workspace, "ensemble")
    assert ensemble.folds == ["0", "1"] and ensemble.fold == "0" and len(ensemble.checkpoints) == 2
    assert ensemble.pretrained == workspace.fold(0) / "checkpoint_final.pth"
    assert choose_teacher(workspace, "1").fold == "1"
    with pytest.raises(CovnetError, match="fold 3 has not finished training"):
        choose_teacher(workspace, "3")
    shutil.rmtree(workspace.results)
    assert run_selftrain(workspace) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no trained fold" in error[0]


def test_ranking_without_regions_uses_every_foreground_label(trained):
    plan = Plan.load(trained.root / "preprocessed" / "plans.json")
    mean = {"left_lung": {"dice": 0.2}, "right_lung": {"dice": 0.4}, "infection": {"dice": None}}
    assert ranking_score(mean, plan) == pytest.approx(0.3)


def test_chosen_fold_one_round_and_every_voxel_ignored(trained, tmp_path):
    workspace = copy_workspace(trained, tmp_path / "ws")
    assert run_selftrain(workspace, "--teacher", "1", "--max-rounds", "1", "--min-confidence", "1.01") == 0
    summary = json.loads((workspace.selftrain / "summary.json").read_text())
    assert summary["teacher"]["mode"] == "fold" and summary["teacher"]["fold"] == "1"
    assert [entry["pool_size"] for entry in summary["rounds"]] == [2]
    assert not workspace.selftrain_round(2).exists() and summary["final"]["round"] == 1
    settings = json.loads((workspace.selftrain_round(1) / "settings.json").read_text())
    assert sorted(settings["validation"]) == sorted(json.loads(workspace.splits_json.read_text())[1]["val"])
    for case in summary["rounds"][0]["cases_added"]:
        _, segmentation, properties = load_case(workspace.selftrain_round(1) / "pseudo_labels", case)
        assert np.all(segmentation == IGNORE)
        assert all(not voxels for voxels in properties.class_locations.values())
    assert os.path.isfile(workspace.selftrain_final / "checkpoint_final.pth")
