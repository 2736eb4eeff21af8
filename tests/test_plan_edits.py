"""Hand-edited plans.json: a rerun keeps the edit and redoes the cases it made stale, training refuses stale
cases, --replan reverts, and an edit that cannot work is one line (README, "Hand-edited plans.json")."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from kit.workspaces import command

from covnet.phantoms.generate import make_phantom_dataset
from covnet.planning.plans import Plan
from covnet.preprocessing.run import stale_cases
from covnet.workspace import Workspace

PLAN = "covnet_plan_and_preprocess"


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Workspace:
    """Three labelled and one unlabelled phantom, planned (CUDA plan: no timing) and preprocessed once."""
    workspace = Workspace(tmp_path_factory.mktemp("planned") / "ws")
    make_phantom_dataset(workspace, num_labelled=3, num_unlabelled=1, num_test=0, seed=3)
    assert command(PLAN, "--workspace", workspace.root, "-np", "1") == 0
    return workspace


@pytest.fixture
def workspace(planned, tmp_path) -> Workspace:
    shutil.copytree(planned.root, tmp_path / "ws", symlinks=True)   # copy2 keeps the raw files' stamps
    return Workspace(tmp_path / "ws")


def edit(workspace: Workspace, change) -> dict:
    data = json.loads(workspace.plans_json.read_text())
    change(data)
    workspace.plans_json.write_text(json.dumps(data, indent=2))
    return data


def set_mean(value: float):
    def change(data):
        data["normalization"]["0"]["mean"] = value
    return change


def one_error_line(captured: str) -> str:
    lines = [line for line in captured.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured, captured
    return lines[0]


def stamps(workspace: Workspace) -> dict[str, dict]:
    folders = (workspace.preprocessed_cases, workspace.preprocessed_pool)
    return {path.stem: json.loads(path.read_text())["plan_key"] for folder in folders for path in folder.glob("*.json")}


def test_a_normalisation_edit_is_kept_and_its_stale_cases_redone_while_training_refuses_them(workspace, capsys):
    planned_mean = Plan.load(workspace.plans_json).normalization["0"].mean
    image_before = np.load(workspace.preprocessed_cases / "phantom_000.npy")
    edit(workspace, set_mean(planned_mean + 100))
    capsys.readouterr()

    # training before the rerun: the arrays were normalised under the planned mean, the plan says another
    assert command("covnet_train", "0", "--workspace", workspace.root) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "3 cases were preprocessed under another plan (normalization changed" in line
    assert "run covnet_plan_and_preprocess to redo them" in line
    assert not workspace.fold(0).exists()

    assert command(PLAN, "--workspace", workspace.root, "-np", "1") == 0
    printed = capsys.readouterr().out
    assert "was edited by hand: keeping it" in printed and "normalization.0.mean" in printed
    assert "preprocessed 4 cases (0 already done)" in printed
    plan = Plan.load(workspace.plans_json)
    assert plan.normalization["0"].mean == planned_mean + 100                       # the edit stands
    assert Plan.load(workspace.planned_plans_json).normalization["0"].mean == planned_mean
    assert all(key["normalization"]["0"]["mean"] == planned_mean + 100 for key in stamps(workspace).values())
    # the arrays really are normalised with the edited mean: x' = x - 100 / std for the same raw voxels
    image_after = np.load(workspace.preprocessed_cases / "phantom_000.npy")
    np.testing.assert_allclose(image_after, image_before - 100 / plan.normalization["0"].std, atol=1e-3)
    assert stale_cases(workspace.preprocessed_cases, ["phantom_000", "phantom_001", "phantom_002"], plan) == {}

    # a second rerun has nothing to redo and still keeps the edit
    assert command(PLAN, "--workspace", workspace.root, "-np", "1") == 0
    assert "preprocessed 0 cases (4 already done)" in capsys.readouterr().out
    assert Plan.load(workspace.plans_json).normalization["0"].mean == planned_mean + 100


def test_replan_reverts_the_edit_and_says_so(workspace, capsys):
    planned_mean = Plan.load(workspace.plans_json).normalization["0"].mean
    edit(workspace, set_mean(planned_mean + 50))
    assert command(PLAN, "--workspace", workspace.root, "-np", "1", "--plan-only") == 0
    capsys.readouterr()
    assert command(PLAN, "--workspace", workspace.root, "-np", "1", "--replan") == 0
    printed = capsys.readouterr().out
    assert "--replan: discarding the hand edits of plans.json" in printed and "normalization.0.mean" in printed
    assert json.loads(workspace.plans_json.read_text()) == json.loads(workspace.planned_plans_json.read_text())
    assert Plan.load(workspace.plans_json).normalization["0"].mean == planned_mean
    assert "preprocessed 0 cases (4 already done)" in printed    # the cases were never redone under the edit


def test_a_network_edit_needs_no_preprocessing_and_is_marked_in_the_table(workspace, capsys):
    plan = Plan.load(workspace.plans_json)
    smaller = [size // 2 if size // 2 % step == 0 else size for size, step in zip(plan.patch_size,
                                                                               plan.network.total_stride)]
    assert smaller != plan.patch_size
    edit(workspace, lambda data: data.update(patch_size=smaller))
    capsys.readouterr()
    assert command(PLAN, "--workspace", workspace.root, "-np", "1") == 0
    printed = capsys.readouterr().out
    assert "patch_size" in printed and "preprocessed 0 cases (4 already done)" in printed
    assert "edited in plans.json" in next(line for line in printed.splitlines() if line.startswith("patch size"))
    assert Plan.load(workspace.plans_json).patch_size == smaller


@pytest.mark.parametrize("entry, change, expected", [
    ("std", lambda data: data["normalization"]["0"].update(std=0), "normalization: std must be > 0"),
    ("patch", lambda data: data.update(patch_size=[33, 48, 64]), "patch_size: must be 3 positive integers"),
    ("batch", lambda data: data.update(batch_size="two"), "batch_size: must be a positive integer"),
    ("typo", lambda data: data.update(normalisation={}), "unknown entries normalisation"),
])
def test_an_invalid_edit_is_one_line_naming_plans_json_and_the_entry(workspace, capsys, entry, change, expected):
    edit(workspace, change)
    before = stamps(workspace)
    capsys.readouterr()
    assert command(PLAN, "--workspace", workspace.root, "-np", "1") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(workspace.plans_json) in line and expected in line and "--replan" in line
    assert stamps(workspace) == before                                       # nothing redone or removed
    assert command("covnet_train", "0", "--workspace", workspace.root) == 2  # training says the same
    assert expected in one_error_line(capsys.readouterr().err)


def test_invalid_json_is_one_line_and_replan_recovers(workspace, capsys):
    workspace.plans_json.write_text(workspace.plans_json.read_text()[:-20])
    assert command(PLAN, "--workspace", workspace.root, "-np", "1", "--plan-only") == 2
    assert "is not valid JSON" in one_error_line(capsys.readouterr().err)
    assert command(PLAN, "--workspace", workspace.root, "-np", "1", "--plan-only", "--replan") == 0
    assert Plan.load(workspace.plans_json).to_json() == Plan.load(workspace.planned_plans_json).to_json()


def test_labels_are_changed_in_dataset_json_not_in_plans_json(workspace, capsys):
    edit(workspace, lambda data: data.update(labels={("lesion" if name == "infection" else name): value
                                                    for name, value in data["labels"].items()}))
    assert command(PLAN, "--workspace", workspace.root, "-np", "1", "--plan-only") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "labels was edited by hand, but comes from raw/dataset.json" in line


def test_a_new_request_or_new_raw_data_replans_but_not_over_hand_edits(workspace, capsys):
    planned_mean = Plan.load(workspace.plans_json).normalization["0"].mean
    # without edits, another budget is simply a new plan
    assert command(PLAN, "--workspace", workspace.root, "-np", "1", "--plan-only", "--gpu-memory-gb", "4") == 0
    assert "planning afresh: --gpu-memory-gb 4 (the plan's: 8)" in capsys.readouterr().out
    assert Plan.load(workspace.plans_json).gpu_memory_gb == 4
    # a rerun without the flag keeps the 4 GB plan rather than falling back to the default
    assert command(PLAN, "--workspace", workspace.root, "-np", "1", "--plan-only") == 0
    assert "kept" in capsys.readouterr().out and Plan.load(workspace.plans_json).gpu_memory_gb == 4

    edit(workspace, set_mean(planned_mean + 10))
    assert command(PLAN, "--workspace", workspace.root, "-np", "1", "--plan-only", "--gpu-memory-gb", "8") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "has hand edits (normalization.0.mean) that a new plan would discard" in line
    assert "--gpu-memory-gb 8 (the plan's: 4)" in line and "--replan" in line

    label = workspace.labels_tr / "phantom_001.nii.gz"
    label.touch()   # an edited raw case: the fingerprint no longer matches
    assert command(PLAN, "--workspace", workspace.root, "-np", "1", "--plan-only") == 2
    assert "the labelled cases in raw/ changed" in one_error_line(capsys.readouterr().err)
    assert Plan.load(workspace.plans_json).normalization["0"].mean == planned_mean + 10    # left as it was
