"""The commands that fill raw/ under faults: covnet_make_phantoms, covnet_import_covid19ctseg and
covnet_import_unlabelled (bad files, kills, no write permission, a second run)."""
from __future__ import annotations

import shutil

import pytest
from kit.faults import (
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
from kit.releases import as_covid19ctseg_release

from covnet.runtime.locking import lock_file

PHANTOMS = ("covnet_make_phantoms", "--num-labelled", "3", "--num-unlabelled", "2", "--num-test", "1", "--seed", "2")


@pytest.fixture(scope="module")
def phantom_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "ws"
    run_ok(*PHANTOMS, "--workspace", root)
    return root


@pytest.fixture(scope="module")
def release(phantom_reference, tmp_path_factory):
    """The phantoms' labelled cases laid out as the public COVID-19-CT-Seg release."""
    release = tmp_path_factory.mktemp("release") / "release"
    as_covid19ctseg_release(phantom_reference / "raw", release)
    return release


@pytest.fixture(scope="module")
def imported_reference(release, phantom_reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("imported") / "ws"
    run_ok("covnet_import_covid19ctseg", "--source", release, "--workspace", root)
    run_ok("covnet_import_unlabelled", "--source", phantom_reference / "raw" / "imagesUnlabelled", "--workspace", root)
    return root


# ------------------------------------------------------------------------------------------ covnet_make_phantoms

@pytest.mark.parametrize("nth_write", [1, 5])
def test_phantoms_killed_during_a_write_rerun_matches(tmp_path, phantom_reference, nth_write):
    root = tmp_path / "ws"
    run_crashing(f"self@.nii.gz#{nth_write}", *PHANTOMS, "--workspace", root)
    assert temporaries(root) and not (root / "raw" / "dataset.json").exists()
    run_ok(*PHANTOMS, "--workspace", root)
    assert temporaries(root) == []
    assert snapshot(root / "raw") == snapshot(phantom_reference / "raw")


def test_phantoms_workspace_that_is_a_file(tmp_path):
    not_a_folder = tmp_path / "workspace.txt"
    not_a_folder.write_text("x")
    assert_one_line_error(run(*PHANTOMS, "--workspace", not_a_folder), str(not_a_folder), "is a file")


def test_phantoms_overwrite_in_a_read_only_workspace(tmp_path, phantom_reference):
    root = copy_tree(phantom_reference, tmp_path / "ws")
    result = run_without_write_permission(root, *PHANTOMS, "--workspace", root, "--overwrite")
    assert_one_line_error(result, str(root), "Permission denied")
    assert snapshot(root / "raw") == snapshot(phantom_reference / "raw")


def test_phantoms_second_run_is_refused(tmp_path):
    root = tmp_path / "ws"
    arguments = list(PHANTOMS[1:]) + ["--workspace", root]
    assert_second_run_refused(PHANTOMS[0], lock_file(root, "raw"), arguments, arguments + ["--overwrite"])


# ------------------------------------------------------------------------------------ covnet_import_covid19ctseg

@pytest.mark.parametrize("rule", ["self@.nii.gz#3", "self@dataset.json#1"])
def test_import_killed_during_a_write_or_the_install_rerun_matches(tmp_path, release, imported_reference, rule):
    root = tmp_path / "ws"
    run_crashing(rule, "covnet_import_covid19ctseg", "--source", release, "--workspace", root)
    assert not (root / "raw" / "dataset.json").exists()
    run_ok("covnet_import_covid19ctseg", "--source", release, "--workspace", root)
    assert temporaries(root) == [] and not any(p.name.startswith(".covid19ctseg") for p in (root / "raw").iterdir())
    reference = {k: v for k, v in snapshot(imported_reference / "raw").items() if k.startswith(("images", "labels"))
                 and "Unlabelled" not in k or k == "dataset.json"}
    assert snapshot(root / "raw") == reference


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_import_of_a_damaged_release_file_is_one_line(tmp_path, release, damage):
    damaged = copy_tree(release, tmp_path / "release")
    target = damaged / "COVID-19-CT-Seg_20cases" / "coronacases_org_002.nii.gz"
    truncate(target) if damage == "truncated" else target.write_bytes(b"")
    root = tmp_path / "ws"
    result = run("covnet_import_covid19ctseg", "--source", damaged, "--workspace", root)
    assert_one_line_error(result, "coronacases_org_002.nii.gz", "truncated" if damage == "truncated" else "empty")
    assert not (root / "raw" / "imagesTr").exists() and temporaries(root) == []


def test_import_into_a_read_only_workspace(tmp_path, release):
    root = tmp_path / "ws"
    (root / "raw").mkdir(parents=True)
    result = run_without_write_permission(root, "covnet_import_covid19ctseg", "--source", release, "--workspace", root)
    assert_one_line_error(result, str(root), "Permission denied")


def test_import_second_run_is_refused(tmp_path, release):
    root = tmp_path / "ws"
    arguments = ["--source", release, "--workspace", root]
    assert_second_run_refused("covnet_import_covid19ctseg", lock_file(root, "raw"), arguments, arguments)


# -------------------------------------------------------------------------------------- covnet_import_unlabelled

def test_unlabelled_import_killed_during_a_write_rerun_matches(tmp_path, phantom_reference):
    root, source = tmp_path / "ws", phantom_reference / "raw" / "imagesUnlabelled"
    run_crashing("self@_0000.nii.gz#2", "covnet_import_unlabelled", "--source", source, "--workspace", root)
    run_ok("covnet_import_unlabelled", "--source", source, "--workspace", root)
    assert temporaries(root) == []
    expected = {}
    fresh = tmp_path / "fresh"
    run_ok("covnet_import_unlabelled", "--source", source, "--workspace", fresh)
    expected = snapshot(fresh / "raw")
    assert snapshot(root / "raw") == expected


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_unlabelled_damaged_file_is_one_line(tmp_path, phantom_reference, damage):
    source = tmp_path / "source"
    shutil.copytree(phantom_reference / "raw" / "imagesUnlabelled", source)
    target = source / "unlabelled_001_0000.nii.gz"
    truncate(target) if damage == "truncated" else target.write_bytes(b"")
    result = run("covnet_import_unlabelled", "--source", source, "--workspace", tmp_path / "ws")
    assert_one_line_error(result, target.name, "truncated" if damage == "truncated" else "empty")
    assert not list((tmp_path / "ws").rglob("unlabelled_001*")) and temporaries(tmp_path / "ws") == []


def test_unlabelled_read_only_workspace_and_second_run(tmp_path, phantom_reference):
    root, source = tmp_path / "ws", phantom_reference / "raw" / "imagesUnlabelled"
    (root / "raw").mkdir(parents=True)
    result = run_without_write_permission(root, "covnet_import_unlabelled", "--source", source, "--workspace", root)
    assert_one_line_error(result, str(root), "Permission denied")
    arguments = ["--source", source, "--workspace", root]
    assert_second_run_refused("covnet_import_unlabelled", lock_file(root, "raw"), arguments, arguments)
