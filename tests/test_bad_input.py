"""Every kind of bad raw input: one line on stderr naming the file, exit 2, nothing written."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from kit.images import make_tiny_case

from covnet.cli import plan_and_preprocess
from covnet.cli.common import run_command
from covnet.image.io import Geometry, write_image


@pytest.fixture
def workspace(tiny_workspace):
    return tiny_workspace


def run(workspace, capsys):
    code = run_command("covnet_plan_and_preprocess", plan_and_preprocess.main, ["--workspace", str(workspace), "-np", "1"])
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, error_lines


def assert_refused(workspace, capsys, file_name: str, problem: str):
    code, error_lines = run(workspace, capsys)
    assert code == 2
    assert len(error_lines) == 1, error_lines
    assert file_name in error_lines[0] and problem in error_lines[0], error_lines[0]
    preprocessed = workspace / "preprocessed"
    assert not preprocessed.exists() or not any(preprocessed.rglob("*.json")), "something was written"


def test_valid_tiny_dataset_is_accepted(workspace, capsys):
    code, error_lines = run(workspace, capsys)
    assert code == 0
    assert (workspace / "preprocessed" / "plans.json").is_file()


def test_missing_dataset_json(workspace, capsys):
    (workspace / "raw" / "dataset.json").unlink()
    assert_refused(workspace, capsys, "dataset.json", "not found")


def test_image_without_label(workspace, capsys):
    (workspace / "raw" / "labelsTr" / "case_1.nii.gz").unlink()
    assert_refused(workspace, capsys, "case_1_0000.nii.gz", "has no label")


def test_undeclared_label_value(workspace, capsys):
    image, label, geometry = make_tiny_case(2)
    label[0, 0, 0] = 7
    write_image(label, geometry, workspace / "raw" / "labelsTr" / "case_2.nii.gz")
    assert_refused(workspace, capsys, "case_2.nii.gz", "label values [7] are not declared")


def test_geometry_mismatch(workspace, capsys):
    image, label, geometry = make_tiny_case(1)
    shifted = Geometry((2.5, 1.5, 1.2), geometry.origin, geometry.direction, geometry.shape)
    write_image(label, shifted, workspace / "raw" / "labelsTr" / "case_1.nii.gz")
    assert_refused(workspace, capsys, "case_1.nii.gz", "geometry does not match its image")


def test_two_dimensional_image(workspace, capsys):
    sitk.WriteImage(sitk.Image(24, 20, sitk.sitkInt16), str(workspace / "raw" / "imagesTr" / "case_0_0000.nii.gz"))
    assert_refused(workspace, capsys, "case_0_0000.nii.gz", "is not a 3D volume")


def test_nan_voxels(workspace, capsys):
    image, label, geometry = make_tiny_case(0)
    image = image.astype(np.float32)
    image[3, 3, 3] = np.nan
    write_image(image, geometry, workspace / "raw" / "imagesTr" / "case_0_0000.nii.gz")
    assert_refused(workspace, capsys, "case_0_0000.nii.gz", "NaN/inf")


def test_unreadable_file(workspace, capsys):
    (workspace / "raw" / "imagesTr" / "case_2_0000.nii.gz").write_bytes(b"\x00garbage")
    assert_refused(workspace, capsys, "case_2_0000.nii.gz", "truncated or unreadable")


def test_empty_folder(workspace, capsys):
    for path in (workspace / "raw" / "imagesTr").iterdir():
        path.unlink()
    assert_refused(workspace, capsys, "imagesTr", "holds no images")


def test_more_than_one_channel(workspace, capsys):
    path = workspace / "raw" / "dataset.json"
    data = json.loads(path.read_text())
    data["channel_names"] = {"0": "CT", "1": "PET"}
    path.write_text(json.dumps(data))
    assert_refused(workspace, capsys, "dataset.json", "declares 2 channels")


def test_memory_budget_that_fits_no_patch(workspace, capsys):
    code = run_command("covnet_plan_and_preprocess", plan_and_preprocess.main,
                       ["--workspace", str(workspace), "--gpu-memory-gb", "0.00001"])
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(error_lines) == 1 and "--gpu-memory-gb 1e-05: no patch fits" in error_lines[0]
    assert not (workspace / "preprocessed" / "plans.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        plan_and_preprocess.main(["--workspace", str(workspace), "--gpu-memory-gb", "0"])
    assert exit_info.value.code == 2 and "must be > 0" in capsys.readouterr().err


def test_channel_key_that_is_not_an_index_blames_dataset_json(workspace, capsys):
    path = workspace / "raw" / "dataset.json"
    data = json.loads(path.read_text())
    data["channel_names"] = {"1": "CT"}
    path.write_text(json.dumps(data))
    assert_refused(workspace, capsys, "dataset.json", "channel_names keys must be the channel indices ['0']")
    assert not (workspace / "preprocessed" / "plans.json").exists()


@pytest.mark.parametrize("field, changed", [("origin", lambda g: Geometry(g.spacing, (0.0, 0.0, 0.0), g.direction,
                                                                            g.shape)),
                                            ("direction", lambda g: Geometry(g.spacing, g.origin,
                                                                               (0.0, 1.0, 0.0, 1.0, 0.0, 0.0,
                                                                                0.0, 0.0, 1.0), g.shape))])
def test_geometry_mismatch_names_the_differing_field(workspace, capsys, field, changed):
    image, label, geometry = make_tiny_case(1)
    write_image(label, changed(geometry), workspace / "raw" / "labelsTr" / "case_1.nii.gz")
    code, error_lines = run(workspace, capsys)
    assert code == 2 and len(error_lines) == 1
    assert f"{field} " in error_lines[0] and " vs " in error_lines[0], error_lines[0]
    other = {"origin": "direction", "direction": "origin"}[field]
    assert f"{other} " not in error_lines[0].split("label vs image:")[1]


def test_windowed_ct_in_the_pool_is_refused_loudly_and_left_out(workspace, capsys):
    image, _, geometry = make_tiny_case(11)
    windowed = np.clip((image.astype(np.float32) + 1000) / 8, 0, 255).astype(np.uint8)
    write_image(windowed, geometry, workspace / "raw" / "imagesUnlabelled" / "pool_1_0000.nii.gz")
    code, error_lines = run(workspace, capsys)
    assert code == 0
    assert len(error_lines) == 1 and error_lines[0].startswith("warning: ")
    assert "pool_1_0000.nii.gz" in error_lines[0] and "does not look like HU" in error_lines[0]
    pool = sorted(p.name for p in (workspace / "preprocessed" / "unlabelled").glob("*.json"))
    assert pool == ["pool_0.json"]


def test_windowed_ct_among_the_labelled_cases_is_an_error(workspace, capsys):
    image, _, geometry = make_tiny_case(2)
    windowed = np.clip((image.astype(np.float32) + 1000) / 8, 0, 255).astype(np.uint8)
    write_image(windowed, geometry, workspace / "raw" / "imagesTr" / "case_2_0000.nii.gz")
    code, error_lines = run(workspace, capsys)
    assert code == 2 and len(error_lines) == 1
    assert "case_2_0000.nii.gz" in error_lines[0] and "does not look like HU" in error_lines[0]
