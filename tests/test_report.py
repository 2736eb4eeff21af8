"""Per-case volumes, infection percentages, confidence and the report files."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from covnet.inference.report import assign_infection_to_lungs, case_report, write_report

SPACING = (2.0, 0.5, 0.8)  # one voxel = 0.8 mm³ = 0.0008 mL
VOXEL_ML = 0.0008


def lungs_with_infection() -> np.ndarray:
    """Right lung (2): 800 voxels at low x; left lung (1): 1000 voxels at high x, 50 of them infected (3)."""
    segmentation = np.zeros((12, 12, 30), np.uint8)
    segmentation[1:11, 1:11, 2:10] = 2
    segmentation[1:11, 1:11, 15:25] = 1
    segmentation[4:6, 3:8, 18:23] = 3
    return segmentation


def test_volumes_and_percentages_of_known_blocks():
    report = case_report(lungs_with_infection(), SPACING)
    assert report["left_lung_ml"] == pytest.approx(1000 * VOXEL_ML)
    assert report["right_lung_ml"] == pytest.approx(800 * VOXEL_ML)
    assert report["infection_ml"] == pytest.approx(50 * VOXEL_ML)
    assert report["left_lung_infection_ml"] == pytest.approx(50 * VOXEL_ML)
    assert report["right_lung_infection_ml"] == 0
    assert report["infection_percent_left_lung"] == pytest.approx(5.0)
    assert report["infection_percent_right_lung"] == 0
    assert report["infection_percent_lungs"] == pytest.approx(100 * 50 / 1800)
    assert report["confidence"] is None
    assert all(isinstance(value, float) for key, value in report.items() if key != "confidence")


def test_infection_in_both_lungs_is_split_by_side():
    segmentation = lungs_with_infection()
    segmentation[2:4, 2:4, 3:8] = 3  # 20 voxels inside the right lung
    report = case_report(segmentation, SPACING)
    assert report["right_lung_infection_ml"] == pytest.approx(20 * VOXEL_ML)
    assert report["left_lung_infection_ml"] == pytest.approx(50 * VOXEL_ML)
    assert report["right_lung_ml"] == pytest.approx(800 * VOXEL_ML)
    assert report["infection_percent_right_lung"] == pytest.approx(100 * 20 / 800)


def test_infection_goes_to_the_lung_nearest_in_millimetres_not_in_voxels():
    segmentation = np.zeros((12, 5, 20), np.uint8)
    segmentation[0:4, :, 0:10] = 1   # left lung ends at z = 3: 3 voxels above the infection
    segmentation[:, :, 14:20] = 2    # right lung starts at x = 14: 4 voxels beside the infection
    segmentation[6, 2, 10] = 3
    assert assign_infection_to_lungs(segmentation, (1.0, 1.0, 1.0), 1, 2, 3) == (1, 0)
    assert assign_infection_to_lungs(segmentation, (3.0, 1.0, 1.0), 1, 2, 3) == (0, 1)


def test_infection_with_only_one_lung_goes_to_that_lung():
    segmentation = np.zeros((6, 6, 6), np.uint8)
    segmentation[1:5, 1:5, 1:5] = 2
    segmentation[2, 2, 2] = 3
    report = case_report(segmentation, (1.0, 1.0, 1.0))
    assert report["right_lung_infection_ml"] == pytest.approx(0.001)
    assert report["right_lung_ml"] == pytest.approx(0.064)
    assert report["left_lung_ml"] == 0 and report["infection_percent_left_lung"] is None
    assert report["infection_percent_right_lung"] == pytest.approx(100 / 64)


def test_empty_segmentation_gives_zero_volumes_and_no_percentages_or_confidence():
    segmentation = np.zeros((4, 4, 4), np.uint8)
    probabilities = np.full((4, 4, 4, 4), 0.25, np.float32)
    report = case_report(segmentation, (1.0, 1.0, 1.0), probabilities)
    assert report["left_lung_ml"] == report["right_lung_ml"] == report["infection_ml"] == 0
    assert report["infection_percent_lungs"] is None and report["infection_percent_left_lung"] is None
    assert report["confidence"] is None


def test_confidence_is_the_mean_top_probability_over_lung_and_infection_voxels():
    segmentation = lungs_with_infection()
    probabilities = np.zeros((4, *segmentation.shape), np.float32)
    probabilities[0] = 0.55  # background voxels: never counted
    probabilities[1][segmentation == 1] = 0.9
    probabilities[2][segmentation == 2] = 0.7
    probabilities[3][segmentation == 3] = 0.6
    expected = (950 * 0.9 + 800 * 0.7 + 50 * 0.6) / 1800
    assert case_report(segmentation, SPACING, probabilities)["confidence"] == pytest.approx(expected, rel=1e-6)
    from_tensor = case_report(segmentation, SPACING, torch.from_numpy(probabilities))["confidence"]
    assert from_tensor == pytest.approx(expected, rel=1e-6)


def test_bad_inputs_are_errors():
    segmentation = lungs_with_infection()
    with pytest.raises(ValueError, match="probabilities"):
        case_report(segmentation, SPACING, np.zeros((4, 2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="spacing"):
        case_report(segmentation, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="infection"):
        case_report(segmentation, SPACING, labels={"left_lung": 1, "right_lung": 2})


def test_write_report_writes_csv_and_json(tmp_path):
    first = {"case": "a", **case_report(lungs_with_infection(), SPACING)}
    second = {"case": "b", **case_report(np.zeros((3, 3, 3), np.uint8), (1.0, 1.0, 1.0))}
    csv_path, json_path = write_report([first, second], tmp_path / "out")
    assert csv_path == tmp_path / "out" / "report.csv" and json_path == tmp_path / "out" / "report.json"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["report.csv", "report.json"]

    with csv_path.open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0])[0] == "case" and [row["case"] for row in table] == ["a", "b"]
    assert float(table[0]["left_lung_ml"]) == pytest.approx(0.8)
    assert float(table[0]["infection_percent_left_lung"]) == pytest.approx(5.0)
    assert table[1]["infection_percent_lungs"] == "" and table[1]["confidence"] == ""

    cases = json.loads(json_path.read_text())["cases"]
    assert cases[0]["case"] == "a" and cases[0]["infection_ml"] == pytest.approx(50 * VOXEL_ML)
    assert cases[1]["infection_percent_lungs"] is None


def test_write_report_rewrites_the_files_in_place(tmp_path):
    write_report([{"case": "old", "infection_ml": 1.0}], tmp_path)
    write_report([{"case": "new", "infection_ml": float("nan")}], tmp_path)
    cases = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert cases == {"cases": [{"case": "new", "infection_ml": None}]}
    assert "old" not in (tmp_path / "report.csv").read_text()
