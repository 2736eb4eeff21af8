import csv
import json
import shutil

import numpy as np
import pytest

from covnet.cli.common import run_command
from covnet.cli.evaluate import main as evaluate_main
from covnet.dataset import COVID_LABELS, COVID_REGIONS, DatasetDescription
from covnet.evaluation.folders import evaluate_folders, format_mean_table, structures_of
from covnet.evaluation.metrics import dice, normalized_surface_dice
from covnet.image.io import Geometry, write_image
from covnet.runtime.errors import CovnetError

SPACING = (2.5, 0.8, 0.9)
SHAPE = (8, 20, 22)
GEOMETRY = Geometry(SPACING, (-10.0, 5.0, 30.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), SHAPE)
NAMES = ["left_lung", "right_lung", "infection", "lungs"]


def phantom_label(with_infection: bool) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[1:7, 3:17, 2:10] = 1
    label[1:7, 3:17, 12:20] = 2
    if with_infection:
        label[3:5, 6:10, 4:8] = 3
    return label


def perturb(label: np.ndarray) -> np.ndarray:
    changed = label.copy()
    changed[:, :, 8:10] = 0  # thin the left lung by 1.8 mm
    changed[2:6, 10:14, 14:18] = 3  # infection in the right lung
    return changed


@pytest.fixture()
def dataset(tmp_path):
    description = DatasetDescription({"0": "CT"}, dict(COVID_LABELS), 3, regions=dict(COVID_REGIONS))
    description.save(tmp_path / "dataset.json")
    reference_dir = tmp_path / "labelsTr"
    labels = {"case_a": phantom_label(True), "case_b": phantom_label(True), "case_c": phantom_label(False)}
    for case, label in labels.items():
        write_image(label, GEOMETRY, reference_dir / f"{case}.nii.gz")
    return tmp_path, description, labels


def test_structures_are_labels_then_regions_without_duplicating_infection():
    description = DatasetDescription({"0": "CT"}, dict(COVID_LABELS), 0, regions=dict(COVID_REGIONS))
    assert structures_of(description) == {"left_lung": [1], "right_lung": [2], "infection": [3], "lungs": [1, 2, 3]}
    clashing = DatasetDescription({"0": "CT"}, dict(COVID_LABELS), 0, regions={"infection": [2, 3]})
    with pytest.raises(CovnetError):
        structures_of(clashing)


def test_ignored_reference_voxels_count_for_no_structure(tmp_path):
    """As in nnU-Net: where the reference says "ignore", neither mask counts, and ignore is no structure."""
    labels = {**COVID_LABELS, "ignore": 4}
    description = DatasetDescription({"0": "CT"}, labels, 1, regions=dict(COVID_REGIONS))
    reference = phantom_label(True)
    reference[:, :, 0:6] = 4                   # the left lung's outer part is unknown
    reference[5:, :, :] = 4                    # and so are the top slices, across both lungs
    prediction = phantom_label(True)           # lungs reaching into the unknown part, infection too
    prediction[6:, 0:3, 0:4] = 3
    write_image(reference, GEOMETRY, tmp_path / "ref" / "case.nii.gz")
    write_image(prediction, GEOMETRY, tmp_path / "pred" / "case.nii.gz")
    summary = evaluate_folders(tmp_path / "ref", tmp_path / "pred", description)
    assert list(summary["mean"]) == NAMES
    assert summary["per_case"][0]["left_lung"] == {"dice": 1.0, "nsd": 1.0}
    assert summary["mean"] == {name: {"dice": 1.0, "nsd": 1.0} for name in NAMES}
    # Unmasked, the lungs predicted under the ignored voxels would be false positives.
    valid = reference != 4
    assert dice(np.isin(prediction, [1]), np.isin(reference, [1])) < 0.8
    assert dice(np.isin(prediction, [1]) & valid, np.isin(reference, [1])) == 1.0


def test_an_ignore_label_below_a_class_or_in_a_region_is_refused():
    with pytest.raises(CovnetError, match="ignore label's value 1 must be above"):
        DatasetDescription.from_json({"channel_names": {"0": "CT"}, "labels": {"background": 0, "lung": 1,
                                                                                "ignore": 1}})
    with pytest.raises(CovnetError, match="region 'lungs' uses label values \\[4\\]"):
        DatasetDescription.from_json({"channel_names": {"0": "CT"}, "labels": {**COVID_LABELS, "ignore": 4},
                                      "regions": {"lungs": [1, 2, 3, 4]}})
    with pytest.raises(CovnetError, match="without gaps"):
        DatasetDescription.from_json({"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 2}})
    described = DatasetDescription.from_json({"channel_names": {"0": "CT"}, "labels": {**COVID_LABELS, "ignore": 4}})
    assert described.foreground_labels == {"left_lung": 1, "right_lung": 2, "infection": 3}
    assert described.num_classes == 4 and described.ignore_label == 4


def test_reference_against_itself_is_perfect(dataset, tmp_path):
    root, description, _ = dataset
    output = tmp_path / "out" / "summary.json"
    summary = evaluate_folders(root / "labelsTr", root / "labelsTr", description, output_json=output)
    assert [row["case"] for row in summary["per_case"]] == ["case_a", "case_b", "case_c"]
    for row in summary["per_case"]:
        for name in NAMES:
            if row["case"] == "case_c" and name == "infection":
                assert row[name] == {"dice": None, "nsd": None}  # empty vs empty
            else:
                assert row[name] == {"dice": 1.0, "nsd": 1.0}
    assert summary["mean"] == {name: {"dice": 1.0, "nsd": 1.0} for name in NAMES}
    assert summary["nsd_tolerance_mm"] == {"left_lung": 1.0, "right_lung": 1.0, "infection": 3.0, "lungs": 1.0}
    text = output.read_text()
    assert "NaN" not in text and "null" in text
    assert json.loads(text) == summary


def test_perturbed_prediction_matches_direct_metric_calls(dataset, tmp_path):
    root, description, labels = dataset
    prediction_dir = tmp_path / "pred"
    for case, label in labels.items():
        write_image(perturb(label), GEOMETRY, prediction_dir / f"{case}.nii.gz")
    summary = evaluate_folders(root / "labelsTr", prediction_dir, description,
                               output_json=prediction_dir / "summary.json", num_processes=2)
    tolerance = {"left_lung": 1.0, "right_lung": 1.0, "infection": 3.0, "lungs": 1.0}
    values = {"left_lung": [1], "right_lung": [2], "infection": [3], "lungs": [1, 2, 3]}
    for row in summary["per_case"]:
        reference, prediction = labels[row["case"]], perturb(labels[row["case"]])
        for name in NAMES:
            reference_mask, prediction_mask = np.isin(reference, values[name]), np.isin(prediction, values[name])
            assert row[name]["dice"] == pytest.approx(dice(prediction_mask, reference_mask), abs=1e-12)
            assert row[name]["nsd"] == pytest.approx(
                normalized_surface_dice(prediction_mask, reference_mask, SPACING, tolerance[name]), abs=1e-12)
    assert summary["per_case"][2]["infection"] == {"dice": 0.0, "nsd": 0.0}  # prediction only
    for name in ("left_lung", "right_lung", "infection"):
        assert summary["mean"][name]["dice"] < 1 and summary["mean"][name]["nsd"] < 1
    infection_dices = [row["infection"]["dice"] for row in summary["per_case"]]
    assert summary["mean"]["infection"]["dice"] == pytest.approx(np.mean(infection_dices))

    with open(prediction_dir / "summary.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["case"] + [f"{name}_{metric}" for name in NAMES for metric in ("dice", "nsd")]
    assert [row[0] for row in rows[1:]] == ["case_a", "case_b", "case_c", "mean"]
    assert float(rows[1][1]) == summary["per_case"][0]["left_lung"]["dice"]
    assert float(rows[-1][5]) == pytest.approx(summary["mean"]["infection"]["dice"])


def test_means_leave_out_empty_cases(dataset, tmp_path):
    root, description, labels = dataset
    prediction_dir = tmp_path / "pred"
    for case, label in labels.items():
        changed = label.copy()
        if case == "case_a":
            changed[changed == 3] = 1  # infection missed entirely: dice 0 in case_a
        write_image(changed, GEOMETRY, prediction_dir / f"{case}.nii.gz")
    summary = evaluate_folders(root / "labelsTr", prediction_dir, description)
    assert summary["per_case"][2]["infection"]["dice"] is None
    # case_a 0, case_b 1, case_c empty-vs-empty left out.
    assert summary["mean"]["infection"] == {"dice": 0.5, "nsd": 0.5}
    assert not (prediction_dir / "summary.json").exists()  # no output_json, nothing written


def test_tolerance_override(dataset, tmp_path):
    root, description, labels = dataset
    prediction_dir = tmp_path / "pred"
    for case, label in labels.items():
        write_image(np.roll(label, 1, axis=0), GEOMETRY, prediction_dir / f"{case}.nii.gz")
    default = evaluate_folders(root / "labelsTr", prediction_dir, description)
    wide = evaluate_folders(root / "labelsTr", prediction_dir, description, tolerances_mm={"lungs": 2.6})
    assert default["mean"]["lungs"]["nsd"] < 1 and wide["mean"]["lungs"]["nsd"] == 1.0
    assert wide["nsd_tolerance_mm"]["lungs"] == 2.6 and wide["nsd_tolerance_mm"]["infection"] == 3.0


def test_missing_prediction_names_the_expected_file(dataset, tmp_path):
    root, description, labels = dataset
    prediction_dir = tmp_path / "pred"
    write_image(labels["case_a"], GEOMETRY, prediction_dir / "case_a.nii.gz")
    with pytest.raises(CovnetError, match="case_b.nii.gz"):
        evaluate_folders(root / "labelsTr", prediction_dir, description, num_processes=2)


def test_prediction_on_another_grid_is_an_error(dataset, tmp_path):
    root, description, labels = dataset
    prediction_dir = tmp_path / "pred"
    other = Geometry((2.5, 0.8, 1.2), GEOMETRY.origin, GEOMETRY.direction, SHAPE)
    for case, label in labels.items():
        write_image(label, other if case == "case_b" else GEOMETRY, prediction_dir / f"{case}.nii.gz")
    with pytest.raises(CovnetError, match="case_b.nii.gz: geometry differs"):
        evaluate_folders(root / "labelsTr", prediction_dir, description)


def test_empty_reference_folder_is_an_error(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    description = DatasetDescription({"0": "CT"}, dict(COVID_LABELS), 0)
    with pytest.raises(CovnetError, match="holds no reference"):
        evaluate_folders(tmp_path / "ref", tmp_path / "pred", description)


def test_cli_prints_table_and_writes_default_output(dataset, tmp_path, capsys):
    root, _, _ = dataset
    predictions = tmp_path / "predictions"
    shutil.copytree(root / "labelsTr", predictions)
    assert evaluate_main(["--ref", str(root / "labelsTr"), "--pred", str(predictions)]) == 0
    printed = capsys.readouterr().out
    for name in NAMES:
        assert name in printed
    assert "1.0000" in printed and "3 mm" in printed
    summary = json.loads((predictions / "summary.json").read_text())
    assert len(summary["per_case"]) == 3 and (predictions / "summary.csv").is_file()
    assert format_mean_table(summary) in printed


def test_cli_never_writes_into_the_reference_folder(dataset, capsys):
    root, _, _ = dataset
    before = sorted(p.name for p in (root / "labelsTr").iterdir())
    code = run_command("covnet_evaluate", evaluate_main, ["--ref", str(root / "labelsTr"), "--pred", str(root / "labelsTr")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "reference folder" in error[0] and "summary.json" in error[0]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == before


def test_cli_uses_labels_file_and_output_option(dataset, tmp_path, capsys):
    root, _, labels = dataset
    custom = DatasetDescription({"0": "CT"}, {"background": 0, "left": 1, "right": 2, "lesion": 3}, 3,
                                regions={"infection": [3]})
    custom.save(tmp_path / "custom.json")
    output = tmp_path / "results" / "eval.json"
    assert evaluate_main(["--ref", str(root / "labelsTr"), "--pred", str(root / "labelsTr"),
                          "--labels", str(tmp_path / "custom.json"), "-o", str(output), "-np", "2"]) == 0
    summary = json.loads(output.read_text())
    assert list(summary["mean"]) == ["left", "right", "lesion", "infection"]
    assert summary["nsd_tolerance_mm"] == {"left": 1.0, "right": 1.0, "lesion": 1.0, "infection": 3.0}
    assert (tmp_path / "results" / "eval.csv").is_file()


def test_cli_missing_folder_is_one_line_error(tmp_path, capsys):
    code = run_command("covnet_evaluate", evaluate_main,
                       ["--ref", str(tmp_path / "nowhere"), "--pred", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and "nowhere" in error and error.startswith("covnet_evaluate: error:")


def test_cli_falls_back_to_covid_labels_without_dataset_json(dataset, capsys):
    root, _, _ = dataset
    (root / "dataset.json").unlink()
    custom_dir = root / "elsewhere"
    assert evaluate_main(["--ref", str(root / "labelsTr"), "--pred", str(root / "labelsTr"),
                          "-o", str(custom_dir / "s.json")]) == 0
    assert list(json.loads((custom_dir / "s.json").read_text())["mean"]) == NAMES


def test_cli_zero_processes_is_refused(dataset, capsys):
    root, _, _ = dataset
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--ref", str(root / "labelsTr"), "--pred", str(root / "labelsTr"), "-o",
                       str(root / "out" / "s.json"), "-np", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "covnet_evaluate: error: argument -np/--num-processes: must be ≥ 1, not 0"
    assert not (root / "out").exists()
