"""covnet_plan_and_preprocess under faults: bad files, kills, no write permission, a second run."""
from __future__ import annotations

import pytest
from kit.faults import (
    assert_no_orphans,
    assert_one_line_error,
    assert_second_run_refused,
    copy_tree,
    run,
    run_crashing,
    run_ok,
    run_without_write_permission,
    snapshot,
    temporaries,
    truncate,
)

from covnet.phantoms.generate import make_phantom_dataset
from covnet.runtime.locking import lock_file
from covnet.workspace import Workspace

COMMAND = "covnet_plan_and_preprocess"


@pytest.fixture(scope="module")
def raw_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw_workspace")
    make_phantom_dataset(Workspace(root), num_labelled=3, num_unlabelled=2, num_test=0, seed=5)
    return root


@pytest.fixture(scope="module")
def reference(raw_workspace, tmp_path_factory):
    """The uninterrupted run's preprocessed/ folder."""
    root = copy_tree(raw_workspace, tmp_path_factory.mktemp("reference") / "ws")
    run_ok(COMMAND, "--workspace", root, "-np", "1")
    return snapshot(root / "preprocessed")


@pytest.fixture
def workspace(raw_workspace, tmp_path):
    return copy_tree(raw_workspace, tmp_path / "ws")


# a case's arrays; the planner's copy, written after plans.json and before the fingerprint
@pytest.mark.parametrize("rule", ["self@.npy#1", "self@.npy#4", "self@plans.planned.json#1"])
def test_kill_during_a_write_then_rerun_matches_an_uninterrupted_run(workspace, reference, rule):
    run_crashing(rule, COMMAND, "--workspace", workspace, "-np", "1")
    assert temporaries(workspace), "the kill should have left a temporary file behind"
    run_ok(COMMAND, "--workspace", workspace, "-np", "1")
    assert temporaries(workspace) == []
    assert snapshot(workspace / "preprocessed") == reference


def test_kill_with_workers_running_leaves_no_orphans_and_rerun_matches(workspace, reference):
    _, group = run_crashing("parent@.npy#1", COMMAND, "--workspace", workspace, "-np", "2")
    assert_no_orphans(group)
    run_ok(COMMAND, "--workspace", workspace, "-np", "2")
    assert temporaries(workspace) == []
    assert snapshot(workspace / "preprocessed") == reference


@pytest.mark.parametrize("damage", ["truncated", "empty"])
@pytest.mark.parametrize("target", ["imagesTr/phantom_001_0000.nii.gz", "labelsTr/phantom_002.nii.gz",
                                    "imagesUnlabelled/unlabelled_001_0000.nii.gz"])
def test_damaged_input_is_one_line_naming_the_file(workspace, target, damage):
    path = workspace / "raw" / target
    truncate(path) if damage == "truncated" else path.write_bytes(b"")
    result = run(COMMAND, "--workspace", workspace, "-np", "1")
    assert_one_line_error(result, path.name, "truncated" if damage == "truncated" else "empty")
    assert "Traceback" not in result.stderr and temporaries(workspace) == []
    written = sorted(p.stem for p in (workspace / "preprocessed").rglob("*.json"))
    assert path.name.split("_0000")[0].split(".")[0] not in written


def test_read_only_workspace_is_one_line(workspace):
    run_ok(COMMAND, "--workspace", workspace, "-np", "1", "--plan-only")
    result = run_without_write_permission(workspace, COMMAND, "--workspace", workspace, "-np", "1", "--overwrite")
    assert_one_line_error(result, str(workspace), "Permission denied")


def test_second_run_on_a_busy_workspace_is_refused(workspace):
    arguments = ["--workspace", workspace, "-np", "1"]
    assert_second_run_refused(COMMAND, lock_file(workspace, "preprocessed"), arguments, arguments)
