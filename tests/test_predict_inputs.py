"""covnet_predict's inputs: label maps among the CTs, two inputs for one case, -o inside -i, images that are
not CTs, degenerate and implausible grids, DICOM folders with several series, -o that is a file, a mixed-plan
ensemble, ITK's console messages and the output folder a failed run leaves."""
from __future__ import annotations

import json
import re
import unicodedata

import numpy as np
import pytest
import torch
from kit.images import write_dicom_series
from kit.workspaces import phantom_image, run_predict

from covnet.image.ct import MAX_RESAMPLED_VOXELS, grid_problem, label_map_reason, not_hu_reason
from covnet.image.discovery import sanitize_case_id
from covnet.image.io import Geometry, read_image, write_image
from covnet.inference.inputs import find_cohort
from covnet.inference.predictor import Predictor
from covnet.runtime.errors import CovnetError


def predict(trained, inputs, outputs, *flags) -> int:
    """One fold, no mirroring, and the network's own sides: the tiny model's lungs would add side warnings."""
    return run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, "-f", "0", "--disable-tta",
                       "--no-lateral-fix", *flags)


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning: ")]


# ---------------------------------------------------------------------------------------------- A2: label maps
def test_a_label_map_next_to_its_ct_is_skipped_and_does_not_take_the_case_name(trained, tmp_path, capsys):
    inputs, alone = tmp_path / "in", tmp_path / "alone"
    image, geometry = phantom_image(trained, 0)
    label, _ = read_image(trained.labels_tr / "phantom_000.nii.gz")
    write_image(image, geometry, inputs / "case_0000.nii.gz")
    write_image(label, geometry, inputs / "case.nii.gz")          # e.g. an earlier output copied back
    write_image(image, geometry, alone / "case_0000.nii.gz")
    assert predict(trained, inputs, tmp_path / "out") == 0
    warnings = warnings_in(capsys.readouterr().err)
    assert len(warnings) == 1 and str(inputs / "case.nii.gz") in warnings[0] and "label map" in warnings[0]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["case.nii.gz"]
    assert predict(trained, alone, tmp_path / "reference") == 0
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "case.nii.gz")[0],
                                  read_image(tmp_path / "reference" / "case.nii.gz")[0])


def test_a_label_map_alone_is_skipped_with_a_warning_when_read(trained, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 1), inputs / "ct.nii.gz")
    label, geometry = read_image(trained.labels_tr / "phantom_002.nii.gz")
    write_image(label, geometry, inputs / "mask.nrrd")
    assert predict(trained, inputs, tmp_path / "out") == 0
    captured = capsys.readouterr()
    warnings = warnings_in(captured.err)
    assert len(warnings) == 1 and str(inputs / "mask.nrrd") in warnings[0]
    assert re.search(r"is a label map, not a CT \(uint8 with only [34] distinct values: 0, 1, 2(, 3)?\); skipped$",
                     warnings[0])
    assert "1 case(s) written, 1 label map(s) skipped" in captured.out
    assert not (tmp_path / "out" / "mask.nrrd").exists()


def test_two_cts_for_one_case_are_an_error_naming_both_before_any_work(trained, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 0), inputs / "a_0000.nii.gz")
    write_image(*phantom_image(trained, 1), inputs / "a.nii.gz")
    assert predict(trained, inputs, tmp_path / "out") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(inputs / "a.nii.gz") in error[0] and str(inputs / "a_0000.nii.gz") in error[0]
    assert "would both be case 'a'" in error[0]
    assert not (tmp_path / "out").exists()


def test_case_names_across_folders_and_true_clashes(tmp_path):
    (tmp_path / "in" / "deep" / "er").mkdir(parents=True)
    (tmp_path / "in" / "x").mkdir()
    for name in ("a_0000.nii.gz", "b_0000.mhd", "deep/er/c_0000.nrrd", "x/a.nii"):
        (tmp_path / "in" / name).write_bytes(b"x")
    cases = {case.case: case.output.name for case in find_cohort(tmp_path / "in", tmp_path / "out")}
    assert cases == {"a": "a.nii.gz", "x_a": "x_a.nii", "b": "b.mha", "c": "c.nrrd"}
    (tmp_path / "in" / "a.nii").write_bytes(b"x")       # unreadable, so not known as a label map: a true clash
    with pytest.raises(CovnetError, match=r"a.nii: and .*a_0000.nii.gz would both be case 'a'"):
        find_cohort(tmp_path / "in", tmp_path / "out")


def test_output_inside_the_input_is_never_read_and_earlier_outputs_are_skipped(trained, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 3), inputs / "scan.mha")
    assert predict(trained, inputs, inputs / "out") == 0
    assert predict(trained, inputs, inputs / "out") == 0
    captured = capsys.readouterr()
    assert warnings_in(captured.err) == [] and "1 case(s) in" in captured.out
    assert sorted(p.name for p in (inputs / "out").glob("*.mha")) == ["scan.mha"]
    # Another output folder: the first one's label map is known by its report row and skipped unread.
    assert predict(trained, inputs, tmp_path / "other") == 0
    warnings = warnings_in(capsys.readouterr().err)
    assert len(warnings) == 1 and str(inputs / "out" / "scan.mha") in warnings[0]
    assert "covnet_predict wrote" in warnings[0]
    assert sorted(p.name for p in (tmp_path / "other").glob("*.mha")) == ["scan.mha"]


def test_label_map_rule():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (10, 12, 14)).astype(np.uint8)
    assert "4 distinct values" in label_map_reason(labels)
    assert "2 distinct values" in label_map_reason((labels > 2).astype(np.int16))
    ct = rng.integers(-1024, 2000, (10, 12, 14)).astype(np.int16)
    assert label_map_reason(ct) is None                                    # negative air
    assert label_map_reason(labels.astype(np.float32)) is None             # float pixels are intensities
    assert label_map_reason(rng.integers(0, 256, (10, 12, 14)).astype(np.uint8)) is None   # a 0-255 export
    rare = labels.copy()
    rare.flat[5] = 200                                                      # a value the sample may miss
    assert "5 distinct values" in label_map_reason(rare)
    assert label_map_reason(np.zeros((4, 4, 4), np.uint8)) is None          # constant: not_hu_reason's case


# ---------------------------------------------------------------------------------------------- A3: not a CT
def test_images_that_are_not_cts_fail_one_line_each_and_the_rest_is_written(trained, tmp_path, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    image, geometry = phantom_image(trained, 0)
    write_image(image, geometry, inputs / "good.nii.gz")
    write_image(np.clip((image.astype(np.float32) + 1000) / 6, 0, 255).astype(np.uint8), geometry,
                inputs / "windowed.nii.gz")
    write_image(np.full(image.shape, 40, np.int16), geometry, inputs / "constant.nii.gz")
    air = (-1000 + np.random.default_rng(0).normal(0, 15, image.shape)).astype(np.int16)
    write_image(air, geometry, inputs / "air.nii.gz")
    write_image(image[:5], Geometry(geometry.spacing, geometry.origin, geometry.direction, (5, *image.shape[1:])),
                inputs / "slab.nii.gz")
    write_image(image, Geometry((50.0, *geometry.spacing[1:]), geometry.origin, geometry.direction, image.shape),
                inputs / "spacing.nii.gz")
    assert predict(trained, inputs, outputs) == 2
    err = capsys.readouterr().err.strip().splitlines()
    problems = {"windowed.nii.gz": "this does not look like HU", "constant.nii.gz": "every voxel is 40",
                "air.nii.gz": "there is no body in this image", "slab.nii.gz": "has only z 5 voxels",
                "spacing.nii.gz": "has spacing z 50 mm, outside the 0.1-20 mm"}
    for name, problem in problems.items():
        lines = [line for line in err if str(inputs / name) in line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0], err
    assert err[-1] == "covnet_predict: 1 case(s) written, 5 failed: air, constant, slab, spacing, windowed"
    assert [row["case"] for row in json.loads((outputs / "report.json").read_text())["cases"]] == ["good"]


def test_hu_check_definitions():
    ct = np.full((20, 20, 20), -1000, np.int16)
    ct[2:18, 2:18, 2:18] = 40
    assert not_hu_reason(ct) is None
    assert "constant" in not_hu_reason(np.full((4, 4, 4), -1000.0))
    assert "does not look like HU" in not_hu_reason(ct + 1000)
    ct[2:18, 2:18, 2:18] = -1000
    ct[0, 0, 0] = 40                                     # one voxel in 8000: still no body
    assert "no body" in not_hu_reason(ct)


def test_grid_limits():
    assert grid_problem((141, 512, 512), (2.0, 0.98, 0.98), (1.0, 0.8, 0.8)) is None      # a chest CT
    assert "has only z 7" in grid_problem((7, 512, 512), (5.0, 0.98, 0.98), (1.0, 0.8, 0.8))
    assert "y 0.01 mm" in grid_problem((100, 512, 512), (1.0, 0.01, 0.01), (1.0, 0.8, 0.8))
    too_big = grid_problem((600, 1024, 1024), (1.0, 1.0, 1.0), (1.0, 0.8, 0.8))
    assert f"limit {MAX_RESAMPLED_VOXELS / 1e6:.0f} M" in too_big and "983 M voxels" in too_big


# ---------------------------------------------------------------------------------------------- A9: messages
def test_output_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys):
    inputs = tmp_path / "in"
    image = np.full((10, 10, 10), -1000, np.int16)
    write_image(image, Geometry((1.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1), image.shape), inputs / "a.nii.gz")
    (tmp_path / "taken").write_text("a file")
    for output, problem in {
            tmp_path / "taken": "is a file; -o must name a folder for the label maps and report",
            tmp_path / "taken" / "sub": f"cannot be made: {tmp_path / 'taken'} is a file, not a folder"}.items():
        # no workspace, no model: the output is refused first
        assert run_predict("-i", inputs, "-o", output, "--workspace", tmp_path / "nothing") == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"covnet_predict: error: {output}: {problem}"]
    assert (tmp_path / "taken").read_text() == "a file"


def test_a_failed_run_leaves_no_empty_folders(trained, tmp_path):
    inputs = tmp_path / "in"
    image, geometry = phantom_image(trained, 0)
    write_image(np.full(image.shape, -1000, np.int16), geometry, inputs / "air.nii.gz")
    assert predict(trained, inputs, tmp_path / "out") == 2               # every case failed
    assert not (tmp_path / "out").exists()                                 # no empty report, no empty folder
    assert run_predict("-i", inputs, "-o", tmp_path / "new", "--workspace", tmp_path / "no_model") == 2
    assert not (tmp_path / "new").exists()                                 # failed before anything was written


def test_a_mixed_plan_ensemble_names_both_models_and_what_differs(trained, tmp_path):
    first = trained.fold(0) / "checkpoint_final.pth"
    data = torch.load(first, weights_only=True)
    data["plan"]["target_spacing"] = [value * 2 for value in data["plan"]["target_spacing"]]
    other = tmp_path / "elsewhere" / "checkpoint_final.pth"
    other.parent.mkdir()
    torch.save(data, other)
    with pytest.raises(CovnetError) as raised:
        Predictor.from_files([first, other])
    message = str(raised.value)
    assert message.startswith(f"{other} and {first} were trained under different plans (target_spacing [")
    assert "fold 0" not in message and "an ensemble needs one plan" in message


def two_series_folder(trained, folder):
    """One folder holding a 20-slice series and a 10-slice one (files of both side by side)."""
    image, _ = phantom_image(trained, 2)
    write_dicom_series(image[:20], folder, spacing_zyx=(5.0, 5.5, 5.5), series_uid="1.2.826.0.1.3680043.2.1125.7")
    write_dicom_series(image[:10], folder / "other", spacing_zyx=(5.0, 5.5, 5.5),
                       series_uid="1.2.826.0.1.3680043.2.1125.8")
    for path in sorted((folder / "other").iterdir()):
        path.rename(folder / f"b_{path.name}")
    (folder / "other").rmdir()
    return image


def test_a_dicom_folder_with_two_series_says_which_was_taken_and_a_file_picks_the_other(trained, tmp_path, capsys):
    folder = tmp_path / "in" / "study"
    two_series_folder(trained, folder)
    assert predict(trained, tmp_path / "in", tmp_path / "out", "--output-type", "nifti") == 0
    warnings = warnings_in(capsys.readouterr().err)
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {folder}: holds 2 DICOM series; took "
                                                         f"1.2.826.0.1.3680043.2.1125.7 (20 slices)")
    assert f"1.2.826.0.1.3680043.2.1125.8 (10 slices), e.g. {folder}/b_slice_00" in warnings[0]
    assert "give one of its files as the input" in warnings[0]
    assert read_image(tmp_path / "out" / "study.nii.gz")[0].shape[0] == 20
    assert predict(trained, folder / "b_slice_0003.dcm", tmp_path / "picked", "--output-type", "nifti") == 0
    assert warnings_in(capsys.readouterr().err) == []
    assert read_image(tmp_path / "picked" / "study_b_slice_0003.nii.gz")[0].shape[0] == 10


def test_itk_console_messages_do_not_reach_the_terminal(trained, tmp_path, capfd):
    inputs = tmp_path / "in"
    (inputs / "notes").mkdir(parents=True)
    (inputs / "notes" / "readme.txt").write_text("not an image")
    write_image(*phantom_image(trained, 1), inputs / "ct.nii.gz")
    assert predict(trained, inputs, tmp_path / "out") == 0
    captured = capfd.readouterr()
    assert "No Series" not in captured.out + captured.err and "WARNING: In" not in captured.err


# ---------------------------------------------------------------------------------------------- output types
def test_both_on_files_and_a_series_writes_a_label_map_for_each_and_a_seg_for_the_series(trained, tmp_path, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    image, geometry = phantom_image(trained, 1)
    write_image(image, geometry, inputs / "a_file.nii.gz")
    write_dicom_series(phantom_image(trained, 2)[0][:16], inputs / "series", spacing_zyx=(5.0, 5.5, 5.5))
    assert predict(trained, inputs, outputs, "--output-type", "both") == 0
    assert warnings_in(capsys.readouterr().err) == [
        "warning: --output-type both: 1 of the 2 cases are image files, not DICOM series (a_file): they get their "
        "label map without a DICOM-SEG"]
    assert sorted(path.name for path in outputs.iterdir()) == [".reports", "a_file.nii.gz", "report.csv",
                                                               "report.json", "series.nii.gz", "series.seg.dcm"]


def test_a_seg_of_files_only_or_dicom_seg_of_a_mixed_folder_is_refused_with_advice_that_keeps_the_segs(tmp_path):
    inputs = tmp_path / "in"
    geometry = Geometry((2.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1), (8, 8, 8))
    write_image(np.full((8, 8, 8), -1000, np.int16), geometry, inputs / "a_file.nii.gz")
    with pytest.raises(CovnetError, match="use --output-type nifti$"):
        find_cohort(inputs, tmp_path / "out", "both")
    write_dicom_series(np.full((4, 8, 8), -1000, np.int16), inputs / "series", spacing_zyx=(5.0, 5.5, 5.5))
    with pytest.raises(CovnetError, match="a_file.nii.gz: is not a DICOM series: --output-type dicom-seg writes a "
                                          "DICOM-SEG, which needs the series it segments; use --output-type both$"):
        find_cohort(inputs, tmp_path / "out", "dicom-seg")
    assert {case.case: case.output_type for case in find_cohort(inputs, tmp_path / "out", "both")} == \
        {"a_file": "nifti", "series": "both"}


# ---------------------------------------------------------------------------------------------- case names
def test_names_with_accents_keep_their_letters_and_do_not_collide(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    decomposed = unicodedata.normalize("NFD", "Jürgen")           # as macOS file systems store an accent
    for name in ("Müller.nii.gz", "Mäller.nii.gz", f"{decomposed}_0000.nii.gz", "Straße 2.mha", "Иванов.nrrd",
                 "Петров.nrrd"):
        (inputs / name).write_bytes(b"x")
    cases = {case.case: case.output.name for case in find_cohort(inputs, tmp_path / "out")}
    assert cases == {"Muller": "Muller.nii.gz", "Maller": "Maller.nii.gz", "Jurgen": "Jurgen.nii.gz",
                     "Strasse_2": "Strasse_2.mha", "Иванов": "Иванов.nrrd", "Петров": "Петров.nrrd"}
    assert sanitize_case_id("Łódź, Ølund (1)") == "Lodz_Olund_1" and sanitize_case_id("ﬁle²") == "file2"
    assert sanitize_case_id("CT 0/study.01") == "CT_0_study_01" and sanitize_case_id("..") == "case"
