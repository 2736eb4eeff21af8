"""covnet_evaluate under faults: damaged predictions or references, a kill while writing the summary,
an output folder without write permission. It writes no workspace, so it takes no workspace lock."""
from __future__ import annotations

import shutil

import pytest
from kit.faults import (
    assert_one_line_error,
    run,
    run_crashing,
    run_ok,
    run_without_write_permission,
    snapshot,
    temporaries,
    truncate,
)

from covnet.phantoms.generate import make_phantom_dataset
from covnet.workspace import Workspace


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    make_phantom_dataset(Workspace(root), num_labelled=3, num_unlabelled=0, num_test=0, seed=4)
    return root / "raw" / "labelsTr", root / "raw" / "dataset.json"


def arguments(reference, predictions, labels, output):
    return ["--ref", reference, "--pred", predictions, "--labels", labels, "-o", output]


@pytest.mark.parametrize("damaged_side", ["prediction", "reference"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_label_file_is_one_line_and_scores_nothing(tmp_path, folders, damaged_side, damage):
    reference, labels = folders
    predictions = tmp_path / "pred"
    shutil.copytree(reference, predictions)
    if damaged_side == "reference":
        reference = shutil.copytree(reference, tmp_path / "ref")
    target = (predictions if damaged_side == "prediction" else reference) / "phantom_001.nii.gz"
    truncate(target) if damage == "truncated" else target.write_bytes(b"")
    output = tmp_path / "out" / "summary.json"
    result = run("covnet_evaluate", *arguments(reference, predictions, labels, output))
    assert_one_line_error(result, str(target), "truncated" if damage == "truncated" else "empty")
    assert not output.exists()


def test_kill_while_writing_the_summary_then_rerun_matches(tmp_path, folders):
    reference, labels = folders
    first, second = tmp_path / "a" / "summary.json", tmp_path / "b" / "summary.json"
    run_ok("covnet_evaluate", *arguments(reference, reference, labels, first))
    run_crashing("self@summary.json#1", "covnet_evaluate", *arguments(reference, reference, labels, second))
    assert temporaries(second.parent) and not second.exists()
    run_ok("covnet_evaluate", *arguments(reference, reference, labels, second))
    assert temporaries(second.parent) == []
    assert snapshot(second.parent) == snapshot(first.parent)


def test_output_folder_without_write_permission(tmp_path, folders):
    reference, labels = folders
    output_dir = tmp_path / "locked"
    output_dir.mkdir()
    result = run_without_write_permission(output_dir, "covnet_evaluate", *arguments(reference, reference, labels, output_dir / "summary.json"))
    assert_one_line_error(result, str(output_dir), "Permission denied")
