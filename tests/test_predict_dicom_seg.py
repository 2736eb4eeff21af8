"""covnet_predict's DICOM-SEG output: read back frame by frame against covnet_predict's own NIfTI of the same
case, for a series whose rows and columns are flipped, one stored in reverse order, one file's series in a folder
of two, and the real DICOM series; the report's volumes against the SEG's; the default output type and --continue;
a SEG asked of an image file; a kill before a case's last file, then --continue."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pydicom
import pytest
from kit.faults import run_crashing, run_ok, temporaries
from kit.images import write_dicom_series
from kit.seg import check_seg_against_label_map
from kit.workspaces import phantom_image, run_predict

from covnet.dataset import COVID_LABELS
from covnet.export.dicom_seg import read_segment_masks, segment_volumes_ml
from covnet.image.io import read_image, write_image

FLIPPED_ROWS_AND_COLUMNS = (-1, 0, 0, 0, -1, 0)
SERIES = {"flipped": dict(orientation=FLIPPED_ROWS_AND_COLUMNS, series_uid="1.2.826.0.1.3680043.2.1125.21"),
          "reversed": dict(descending_storage=True, series_uid="1.2.826.0.1.3680043.2.1125.22")}
FOLD_0 = ("-f", "0", "--disable-tta")


@pytest.fixture(scope="module")
def both_run(trained, tmp_path_factory):
    """Two phantom CTs as DICOM series (rows and columns flipped; slices stored in reverse order), predicted with
    --output-type both: a SEG beside the NIfTI of each."""
    base = tmp_path_factory.mktemp("seg")
    inputs, outputs = base / "in", base / "out"
    for index, (case, options) in enumerate(SERIES.items()):
        image, geometry = phantom_image(trained, 2 + index)
        write_dicom_series(image, inputs / case, spacing_zyx=geometry.spacing, **options)
    assert run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, *FOLD_0, "--output-type",
                       "both") == 0
    return inputs, outputs


def visible_files(folder):
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))


@pytest.mark.parametrize("case", sorted(SERIES))
def test_each_segment_lands_on_its_source_slice_and_pixel(both_run, case):
    inputs, outputs = both_run
    labels, geometry = read_image(outputs / f"{case}.nii.gz")
    # Labels that a mirrored or shifted SEG could not match: several structures, no symmetry along any axis.
    assert len(set(np.unique(labels).tolist()) - {0}) >= 2
    assert not any(np.array_equal(labels, np.flip(labels, axis)) for axis in range(3))
    checked = check_seg_against_label_map(outputs / f"{case}.seg.dcm", inputs / case, labels, geometry, COVID_LABELS)
    assert checked >= geometry.shape[0]


def test_both_writes_a_seg_beside_each_label_map(both_run):
    _, outputs = both_run
    assert visible_files(outputs) == ["flipped.nii.gz", "flipped.seg.dcm", "report.csv", "report.json",
                                      "reversed.nii.gz", "reversed.seg.dcm"]


def test_report_volumes_match_the_seg(both_run):
    _, outputs = both_run
    rows = json.loads((outputs / "report.json").read_text())["cases"]
    assert [row["case"] for row in rows] == ["flipped", "reversed"]
    for row in rows:
        volumes = segment_volumes_ml(outputs / f"{row['case']}.seg.dcm")
        # The report gives each infection voxel to the nearest lung: only these two sums are the SEG's.
        assert row["infection_ml"] == pytest.approx(volumes["infection"], rel=1e-6)
        assert row["left_lung_ml"] + row["right_lung_ml"] == pytest.approx(sum(volumes.values()), rel=1e-6)
        assert volumes["left_lung"] > 0 and volumes["right_lung"] > 0


def test_the_seg_references_its_series_and_names_the_model(both_run, trained):
    inputs, outputs = both_run
    checkpoint = trained.fold(0) / "checkpoint_final.pth"
    expected_id = hashlib.sha256(hashlib.sha256(checkpoint.read_bytes()).hexdigest().encode()).hexdigest()
    for case, options in SERIES.items():
        seg = pydicom.dcmread(outputs / f"{case}.seg.dcm", stop_before_pixels=True)
        source = pydicom.dcmread(next((inputs / case).iterdir()), stop_before_pixels=True)
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == options["series_uid"]
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        for segment in seg.SegmentSequence:
            assert expected_id in segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters


def test_a_dicom_series_gets_a_seg_by_default_and_continue_knows_it(trained, both_run, tmp_path):
    inputs, with_nifti = both_run
    outputs = tmp_path / "out"
    assert run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, *FOLD_0) == 0
    assert visible_files(outputs) == ["flipped.seg.dcm", "report.csv", "report.json", "reversed.seg.dcm"]
    for case in SERIES:
            assert same_seg_frames(outputs / f"{case}.seg.dcm", with_nifti / f"{case}.seg.dcm")
    report = (outputs / "report.json").read_text()
    kept = (outputs / "flipped.seg.dcm").stat().st_mtime_ns
    (outputs / "reversed.seg.dcm").unlink()
    assert run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, *FOLD_0, "--continue") == 0
    assert (outputs / "flipped.seg.dcm").stat().st_mtime_ns == kept
    assert (outputs / "reversed.seg.dcm").is_file()
    assert (outputs / "report.json").read_text() == report


def test_one_file_of_a_folder_of_two_series_gets_a_seg_of_its_own_series(trained, tmp_path):
    folder = tmp_path / "study"
    image, geometry = phantom_image(trained, 4)
    write_dicom_series(image[:20], folder, spacing_zyx=geometry.spacing, series_uid="1.2.826.0.1.3680043.2.1125.31")
    write_dicom_series(image[10:30], folder / "other", spacing_zyx=geometry.spacing,
                       origin_xyz=(-100.0, -120.0, 30.0 + 10 * geometry.spacing[0]),
                       series_uid="1.2.826.0.1.3680043.2.1125.32", orientation=FLIPPED_ROWS_AND_COLUMNS)
    for path in sorted((folder / "other").iterdir()):
        path.rename(folder / f"b_{path.name}")
    (folder / "other").rmdir()
    outputs = tmp_path / "out"
    assert run_predict("-i", folder / "b_slice_0003.dcm", "-o", outputs, "--workspace", trained.root, *FOLD_0,
                       "--output-type", "both") == 0
    seg_path = outputs / "study_b_slice_0003.seg.dcm"
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.826.0.1.3680043.2.1125.32"
    labels, label_geometry = read_image(outputs / "study_b_slice_0003.nii.gz")
    assert check_seg_against_label_map(seg_path, folder, labels, label_geometry, COVID_LABELS) >= 20


@pytest.mark.parametrize("output_type", ["dicom-seg", "both"])
def test_a_seg_of_an_image_file_is_one_line_and_nothing_is_written(trained, tmp_path, capsys, output_type):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 0), inputs / "case_0000.nii.gz")
    assert run_predict("-i", inputs, "-o", tmp_path / "out", "--workspace", trained.root, *FOLD_0,
                       "--output-type", output_type) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"covnet_predict: error: {inputs / 'case_0000.nii.gz'}: is not a DICOM series: --output-type "
                     f"{output_type} writes a DICOM-SEG, which needs the series it segments; use --output-type nifti"]
    assert not (tmp_path / "out").exists()


def test_the_real_dicom_series_gets_a_seg_whose_segments_lie_on_the_right_slices(trained, real_ct_dir, tmp_path):
    """The tiny model's labels are poor, but wherever they are, the SEG must hold them on the same slices and pixels
    as covnet_predict's NIfTI of the series (which stores its slices with InstanceNumber rising as z falls)."""
    series = real_ct_dir / "dicom_abdomen_512x512x20"
    for output_type in ("dicom-seg", "nifti"):
        assert run_predict("-i", series, "-o", tmp_path / output_type, "--workspace", trained.root, *FOLD_0,
                           "--output-type", output_type) == 0
    assert visible_files(tmp_path / "dicom-seg") == ["dicom_abdomen_512x512x20.seg.dcm", "report.csv", "report.json"]
    seg_path = tmp_path / "dicom-seg" / "dicom_abdomen_512x512x20.seg.dcm"
    labels, geometry = read_image(tmp_path / "nifti" / "dicom_abdomen_512x512x20.nii.gz")
    slices_with_labels = int((labels.reshape(labels.shape[0], -1) > 0).any(axis=1).sum())
    assert slices_with_labels >= 2 and not np.array_equal(labels, labels[::-1])
    assert check_seg_against_label_map(seg_path, series, labels, geometry, COVID_LABELS) >= slices_with_labels
    (row,) = json.loads((tmp_path / "dicom-seg" / "report.json").read_text())["cases"]
    volumes = segment_volumes_ml(seg_path)
    assert row["infection_ml"] == pytest.approx(volumes["infection"], rel=1e-6, abs=1e-9)
    assert row["left_lung_ml"] + row["right_lung_ml"] == pytest.approx(sum(volumes.values()), rel=1e-6)


def same_seg_frames(first, second) -> bool:
    masks, others = read_segment_masks(first), read_segment_masks(second)
    return masks.keys() == others.keys() and all(
        masks[name].keys() == others[name].keys()
        and all(np.array_equal(masks[name][uid], others[name][uid]) for uid in masks[name]) for name in masks)


@pytest.mark.parametrize("output_type, killed_at", [("dicom-seg", ".seg.dcm#2"), ("both", ".nii.gz#2")],
                         ids=["seg_only", "both"])
def test_a_kill_before_a_cases_last_file_then_continue_completes_the_run(trained, both_run, tmp_path, output_type,
                                                                          killed_at):
    """Killed as the second case's last file (its SEG alone, or its label map after its SEG) is renamed into
    place: that case is not complete, and --continue redoes it and only it."""
    inputs, reference = both_run
    output = tmp_path / "out"
    arguments = ["-i", inputs, "-o", output, "--workspace", trained.root, *FOLD_0, "--output-type", output_type,
                 "--runtime", "torch"]     # as both_run's reference (run_predict): a folder records its runtime
    run_crashing(f"self@{killed_at}", "covnet_predict", *arguments)
    last = "reversed.seg.dcm" if output_type == "dicom-seg" else "reversed.nii.gz"
    assert not (output / last).exists() and [path.name.endswith(f"-{last}") for path in temporaries(output)] == [True]
    first_case = {path.name: path.stat().st_mtime_ns for path in output.glob("flipped.*")}
    run_ok("covnet_predict", *arguments, "--continue")
    assert temporaries(output) == []
    assert {path.name: path.stat().st_mtime_ns for path in output.glob("flipped.*")} == first_case
    assert (output / "report.json").read_text() == (reference / "report.json").read_text()
    for case in SERIES:
        assert same_seg_frames(output / f"{case}.seg.dcm", reference / f"{case}.seg.dcm")
        if output_type == "both":
            np.testing.assert_array_equal(read_image(output / f"{case}.nii.gz")[0],
                                          read_image(reference / f"{case}.nii.gz")[0])


def test_a_folder_of_covnets_own_segs_among_the_inputs_is_skipped(trained, both_run, tmp_path, capsys):
    """An earlier run's output folder holds SEGs, which DICOM discovery sees as a series: it is no CT."""
    inputs, _ = both_run
    folder = tmp_path / "in"
    shutil.copytree(inputs / "flipped", folder / "ct")
    assert run_predict("-i", folder / "ct", "-o", folder / "old", "--workspace", trained.root, *FOLD_0) == 0
    capsys.readouterr()
    assert run_predict("-i", folder, "-o", tmp_path / "out", "--workspace", trained.root, *FOLD_0) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert f"warning: {folder / 'old'}: holds only DICOM-SEGs covnet_predict wrote (their rows are in .reports/), " \
           f"not a CT; skipped" in warnings
    assert visible_files(tmp_path / "out") == ["ct.seg.dcm", "report.csv", "report.json"]
