"""covnet_predict on a tiny trained workspace: formats and geometry, model choice, ensembles, bad inputs,
the report, --continue, parts, probabilities and previews."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from kit.images import write_dicom_series
from kit.workspaces import phantom_image, run_predict

from covnet.checkpoint import Checkpoint
from covnet.export.dicom_seg import segment_volumes_ml
from covnet.image.io import Geometry, read_image, write_image
from covnet.inference.inputs import find_cohort
from covnet.inference.model_choice import select_checkpoints
from covnet.inference.predictor import InferenceSettings, Predictor, lungs_by_midline
from covnet.inference.report import case_report
from covnet.preprocessing.case import preprocess_case
from covnet.runtime.errors import CovnetError

# A scan tilted by 20° about x and 30° about z (SimpleITK's row-major direction), and one with flipped x and y.
_A, _B = np.deg2rad(20), np.deg2rad(30)
OBLIQUE = tuple((np.array([[np.cos(_B), -np.sin(_B), 0], [np.sin(_B), np.cos(_B), 0], [0, 0, 1]])
                 @ np.array([[1, 0, 0], [0, np.cos(_A), -np.sin(_A)], [0, np.sin(_A), np.cos(_A)]])).ravel())
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)





@pytest.fixture(scope="module")
def cohort(trained, tmp_path_factory):
    """One run over an oblique NIfTI with a _0000 suffix, a flipped .mha and a DICOM series in a subfolder, each
    written as its own kind (the default output type): label maps for the files, a DICOM-SEG for the series."""
    base = tmp_path_factory.mktemp("cohort")
    inputs, outputs = base / "in", base / "out"
    image, geometry = phantom_image(trained, 0)
    write_image(image, Geometry(geometry.spacing, (-12.5, 40.25, 310.0), OBLIQUE, geometry.shape),
                inputs / "oblique_0000.nii.gz")
    image, geometry = phantom_image(trained, 1)
    write_image(image, Geometry(geometry.spacing, (150.0, 90.5, -75.0), FLIPPED, geometry.shape),
                inputs / "flipped.mha")
    image, _ = phantom_image(trained, 2)
    write_dicom_series(image[:16], inputs / "patient_7" / "series_a", spacing_zyx=(5.0, 5.5, 5.5))
    code = run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, "--disable-tta",
                   "--save-probabilities", "--preview")
    assert code == 0
    return inputs, outputs


def test_label_maps_keep_the_input_grid_and_format(cohort):
    inputs, outputs = cohort
    pairs = {"oblique.nii.gz": inputs / "oblique_0000.nii.gz", "flipped.mha": inputs / "flipped.mha"}
    assert sorted(p.name for p in outputs.iterdir() if p.suffix not in (".npz", ".png", ".csv", ".json")
                  and not p.name.startswith(".")) == sorted([*pairs, "series_a.seg.dcm"])
    for name, source in pairs.items():
        image, geometry = read_image(source)
        labels, written = read_image(outputs / name)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}
        assert written.shape == geometry.shape
        assert np.allclose(written.spacing, geometry.spacing, rtol=0, atol=1e-5), name
        assert np.allclose(written.origin, geometry.origin, rtol=0, atol=1e-4), name
        assert np.allclose(written.direction, geometry.direction, rtol=0, atol=1e-6), name
    assert read_image(outputs / "oblique.nii.gz")[1].origin == pytest.approx((-12.5, 40.25, 310.0), abs=1e-4)
    assert read_image(outputs / "flipped.mha")[1].direction == FLIPPED
    assert list(outputs.rglob(".tmp-*")) == []


def test_report_matches_the_written_label_maps(cohort):
    _, outputs = cohort
    rows = json.loads((outputs / "report.json").read_text())["cases"]
    assert [row["case"] for row in rows] == ["flipped", "oblique", "series_a"]
    header = (outputs / "report.csv").read_text().splitlines()[0].split(",")
    assert header == ["case", "left_lung_ml", "right_lung_ml", "infection_ml", "left_lung_infection_ml",
                      "right_lung_infection_ml", "infection_percent_left_lung", "infection_percent_right_lung",
                      "infection_percent_lungs", "confidence"]
    csv_rows = (outputs / "report.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in csv_rows] == ["flipped", "oblique", "series_a"]
    seg_volumes = segment_volumes_ml(outputs / "series_a.seg.dcm")
    assert rows[2]["infection_ml"] == pytest.approx(seg_volumes["infection"], rel=1e-6, abs=1e-9)
    assert rows[2]["left_lung_ml"] + rows[2]["right_lung_ml"] == pytest.approx(sum(seg_volumes.values()), rel=1e-6)
    for row in rows[:2]:
        name = "flipped.mha" if row["case"] == "flipped" else f"{row['case']}.nii.gz"
        labels, geometry = read_image(outputs / name)
        voxel_ml = float(np.prod(geometry.spacing)) / 1000
        counts = np.bincount(labels.ravel(), minlength=4)
        assert row["infection_ml"] == pytest.approx(counts[3] * voxel_ml)
        assert row["left_lung_ml"] + row["right_lung_ml"] == pytest.approx(counts[1:].sum() * voxel_ml)
        probabilities = np.load(outputs / f"{row['case']}.npz")["probabilities"].astype(np.float32)
        expected = case_report(labels, geometry.spacing, probabilities)
        for key, value in expected.items():
            if value is None:
                assert row[key] is None, key
            else:
                assert row[key] == pytest.approx(value, rel=1e-6, abs=2e-3 if key == "confidence" else 1e-9), key


def test_probabilities_and_previews(cohort):
    inputs, outputs = cohort
    for case, source in {"flipped": "flipped.mha", "oblique": "oblique_0000.nii.gz",
                         "series_a": "patient_7/series_a"}.items():
        saved = np.load(outputs / f"{case}.npz")
        probabilities = saved["probabilities"]
        assert probabilities.dtype == np.float16 and probabilities.shape == (4, *read_image(inputs / source)[1].shape)
        assert np.allclose(probabilities.astype(np.float32).sum(axis=0), 1, atol=5e-3)
        assert list(saved["class_names"]) == ["background", "left_lung", "right_lung", "infection"]
        assert (outputs / f"{case}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ensemble_averages_the_folds(trained, tmp_path):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 3), inputs / "case_0000.nii.gz")
    probabilities = {}
    for name, flags in {"both": [], "0": ["-f", "0"], "1": ["-f", "1"]}.items():
        out = tmp_path / name
        assert run_predict("-i", inputs, "-o", out, "--workspace", trained.root, "--disable-tta",
                       "--save-probabilities", "--no-postprocessing", "--no-lateral-fix", *flags) == 0
        probabilities[name] = np.load(out / "case.npz")["probabilities"].astype(np.float32)
    assert not np.allclose(probabilities["0"], probabilities["1"], atol=1e-3)
    assert np.allclose(probabilities["both"], (probabilities["0"] + probabilities["1"]) / 2, atol=2e-3)
    labels = read_image(tmp_path / "both" / "case.nii.gz")[0]
    # the labels are the argmax of the probabilities; where they differ, it is a tie at float16 resolution
    label_probability = np.take_along_axis(probabilities["both"], labels[None].astype(np.int64), axis=0)[0]
    assert np.all(probabilities["both"].max(axis=0) - label_probability <= 2e-3)


def test_model_from_a_copied_results_folder_or_file(trained, tmp_path):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 4), inputs / "case.nrrd")
    copied = tmp_path / "elsewhere" / "results"
    shutil.copytree(trained.fold(0), copied / "fold_0")
    assert run_predict("-i", inputs, "-o", tmp_path / "ws", "--workspace", trained.root, "-f", "0", "--disable-tta") == 0
    assert run_predict("-i", inputs, "-o", tmp_path / "copied", "--model", copied, "--workspace", tmp_path / "none",
                   "--disable-tta") == 0
    assert run_predict("-i", inputs, "-o", tmp_path / "file", "--model", copied / "fold_0" / "checkpoint_final.pth",
                   "--disable-tta") == 0
    reference = read_image(tmp_path / "ws" / "case.nrrd")[0]
    for out in ("copied", "file"):
        assert np.array_equal(read_image(tmp_path / out / "case.nrrd")[0], reference)


def test_model_selection_rules(tmp_path):
    results = tmp_path / "results"
    for folder, names in {"fold_0": ["final", "best"], "fold_2": ["final"], "fold_3": ["latest"],
                          "fold_all": ["final"]}.items():
        (results / folder).mkdir(parents=True)
        for name in names:
            (results / folder / f"checkpoint_{name}.pth").write_bytes(b"")
    paths, description = select_checkpoints(results)
    assert [p.parent.name for p in paths] == ["fold_0", "fold_2"] and "folds 0, 2" in description
    assert [p.name for p in select_checkpoints(results, ["0"], "best")[0]] == ["checkpoint_best.pth"]
    with pytest.raises(CovnetError, match="fold_2/checkpoint_best.pth: not found, but checkpoint_final.pth is"):
        select_checkpoints(results, checkpoint="best")
    with pytest.raises(CovnetError, match="fold_4/checkpoint_final.pth: not found; train this fold first"):
        select_checkpoints(results, ["0", "4"])
    with pytest.raises(CovnetError, match="fold_3/checkpoint_final.pth: not found; this model has not finished"):
        select_checkpoints(results, ["3"])
    assert select_checkpoints(tmp_path)[0] == paths          # a copied workspace: its results/ folder
    (results / "selftrain" / "final").mkdir(parents=True)
    (results / "selftrain" / "final" / "checkpoint_final.pth").write_bytes(b"")
    assert select_checkpoints(results)[0] == [results / "selftrain" / "final" / "checkpoint_final.pth"]
    assert select_checkpoints(results, ["all"])[0] == [results / "fold_all" / "checkpoint_final.pth"]
    for folder in ("selftrain", "fold_0", "fold_2"):
        shutil.rmtree(results / folder)
    assert select_checkpoints(results)[0] == [results / "fold_all" / "checkpoint_final.pth"]


def test_no_trained_model_is_one_line(trained, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 0), inputs / "case.nii.gz")
    assert run_predict("-i", inputs, "-o", tmp_path / "out", "--workspace", tmp_path / "empty_ws") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("covnet_predict: error: ") and "no trained model" in error[0]


def test_bad_cases_are_one_line_each_and_the_rest_is_written(trained, tmp_path, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    write_image(*phantom_image(trained, 0), inputs / "good_a_0000.nii.gz")
    write_image(*phantom_image(trained, 1), inputs / "good_b.mha")
    data = (inputs / "good_a_0000.nii.gz").read_bytes()
    (inputs / "corrupt.nii.gz").write_bytes(data[: len(data) // 2])
    write_image(np.zeros((1, 30, 40), np.int16), Geometry((1.0, 1.0, 1.0), (0.0,) * 3,
                                                          (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), (1, 30, 40)),
                inputs / "flat.nii.gz")
    (inputs / "empty.nrrd").write_bytes(b"")
    assert run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, "--disable-tta") == 2
    err = capsys.readouterr().err.strip().splitlines()
    for name, problem in {"corrupt.nii.gz": "truncated", "flat.nii.gz": "not a 3D volume",
                          "empty.nrrd": "is empty"}.items():
        lines = [line for line in err if name in line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0], err
    assert err[-1] == "covnet_predict: 2 case(s) written, 3 failed: corrupt, empty, flat"
    assert sorted(p.name for p in outputs.iterdir()) == [".reports", "good_a.nii.gz", "good_b.mha",
                                                         "report.csv", "report.json"]
    assert [row["case"] for row in json.loads((outputs / "report.json").read_text())["cases"]] == ["good_a", "good_b"]


def test_a_run_whose_every_case_fails_leaves_no_report(trained, tmp_path, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    (inputs / "sub").mkdir(parents=True)
    (inputs / "empty.nrrd").write_bytes(b"")
    (inputs / "sub" / "also_empty.nii.gz").write_bytes(b"")
    assert run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, "-f", "0", "--disable-tta") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "covnet_predict: 0 case(s) written, 2 failed: also_empty, empty"
    assert not outputs.exists()             # no 1-byte report.csv, no empty report.json, no empty folder
    outputs.mkdir()
    (outputs / "notes.txt").write_text("mine")
    assert run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, "-f", "0", "--disable-tta") == 2
    assert sorted(path.name for path in outputs.iterdir()) == ["notes.txt"]


def test_continue_skips_finished_cases_and_reports_all(trained, tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for index in range(3):
        write_image(*phantom_image(trained, index), inputs / f"c{index}_0000.nii.gz")
    assert run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, "-f", "0", "--disable-tta") == 0
    report = (outputs / "report.json").read_text()
    (outputs / "c1.nii.gz").unlink()
    kept = {name: (outputs / name).stat().st_mtime_ns for name in ("c0.nii.gz", "c2.nii.gz")}
    assert run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, "-f", "0", "--disable-tta",
                   "--continue") == 0
    assert {name: (outputs / name).stat().st_mtime_ns for name in kept} == kept
    assert (outputs / "c1.nii.gz").is_file()
    assert (outputs / "report.json").read_text() == report


def test_a_run_of_another_output_type_keeps_the_other_types_files(trained, tmp_path, capsys):
    """A SEG written earlier stays when --continue (or a new run) writes label maps, and the other way round, as long
    as the model is the same; a new run of another model removes every earlier output, with a warning."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    image, _ = phantom_image(trained, 2)
    write_dicom_series(image[:16], inputs / "series_a", spacing_zyx=(5.0, 5.5, 5.5))
    args = ["-i", inputs, "-o", outputs, "--workspace", trained.root, "--disable-tta"]
    seg, label_map = outputs / "series_a.seg.dcm", outputs / "series_a.nii.gz"
    assert run_predict(*args, "-f", "0") == 0                        # a series' default output: its SEG
    written = seg.read_bytes(), seg.stat().st_mtime_ns
    assert run_predict(*args, "-f", "0", "--continue", "--output-type", "nifti") == 0
    assert (seg.read_bytes(), seg.stat().st_mtime_ns) == written and label_map.is_file()
    written = label_map.read_bytes(), label_map.stat().st_mtime_ns
    assert run_predict(*args, "-f", "0", "--output-type", "dicom-seg") == 0     # a new run redoes only its type
    assert (label_map.read_bytes(), label_map.stat().st_mtime_ns) == written and seg.is_file()
    assert [row["case"] for row in json.loads((outputs / "report.json").read_text())["cases"]] == ["series_a"]
    capsys.readouterr()
    assert run_predict(*args, "-f", "1", "--output-type", "nifti") == 0
    assert not seg.exists() and label_map.is_file()
    assert "its 2 earlier label map(s) and SEG(s) are removed" in capsys.readouterr().err


def test_parts_split_the_cases(trained, tmp_path, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for index in range(3):
        write_image(*phantom_image(trained, index), inputs / f"p{index}.nii.gz")
    args = ["-i", inputs, "-o", outputs, "--workspace", trained.root, "-f", "1", "--disable-tta", "--num-parts", "2"]
    assert run_predict(*args, "--part-id", "0") == 0
    assert sorted(p.name for p in outputs.glob("*.nii.gz")) == ["p0.nii.gz", "p2.nii.gz"]
    assert run_predict(*args, "--part-id", "1") == 0
    assert sorted(p.name for p in outputs.glob("*.nii.gz")) == ["p0.nii.gz", "p1.nii.gz", "p2.nii.gz"]
    assert [row["case"] for row in json.loads((outputs / "report.json").read_text())["cases"]] == ["p0", "p1", "p2"]
    capsys.readouterr()
    assert run_predict(*args, "--part-id", "2") == 2
    assert "--part-id 2" in capsys.readouterr().err


def test_several_parts_need_a_part_id(tmp_path, capsys):
    """--num-parts 2 without --part-id would run as part 0 on every GPU: refused before anything is written."""
    inputs = tmp_path / "in"
    write_image(np.full((8, 8, 8), -1000, np.int16), Geometry((1.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1),
                                                                (8, 8, 8)), inputs / "p0.nii.gz")
    assert run_predict("-i", inputs, "-o", tmp_path / "out", "--workspace", tmp_path / "ws", "--num-parts", "2") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "covnet_predict: error: --num-parts 2 needs --part-id (0 .. 1): the part this run does; start one run per part"]
    assert not (tmp_path / "out").exists()


def test_case_names(tmp_path):
    (tmp_path / "in" / "deep" / "er").mkdir(parents=True)
    for name in ("a_0000.nii.gz", "b_0000.mhd", "deep/er/c_0000.nrrd", "d.nii"):
        (tmp_path / "in" / name).write_bytes(b"x")
    cases = {case.case: case.output.name for case in find_cohort(tmp_path / "in", tmp_path / "out")}
    assert cases == {"a": "a.nii.gz", "b": "b.mha", "c": "c.nrrd", "d": "d.nii"}
    with pytest.raises(CovnetError, match="is the input folder"):
        find_cohort(tmp_path / "in", tmp_path / "in")


def test_lateral_fix_is_on_by_default_and_changes_only_lung_sides(trained, tmp_path):
    inputs = tmp_path / "in"
    image, geometry = phantom_image(trained, 1)
    flipped = Geometry(geometry.spacing, geometry.origin, FLIPPED, geometry.shape)
    write_image(image, flipped, inputs / "case.mha")
    assert run_predict("-i", inputs, "-o", tmp_path / "fixed", "--workspace", trained.root, "-f", "0",
                       "--disable-tta") == 0
    assert run_predict("-i", inputs, "-o", tmp_path / "raw", "--workspace", trained.root, "-f", "0",
                       "--disable-tta", "--no-lateral-fix") == 0
    fixed, raw = (read_image(tmp_path / folder / "case.mha")[0] for folder in ("fixed", "raw"))
    assert np.isin(raw, (1, 2)).any()
    for label in (0, 3):
        np.testing.assert_array_equal(fixed == label, raw == label)
    plan = Checkpoint.load(trained.fold(0) / "checkpoint_final.pth").typed_plan
    _, _, properties = preprocess_case("case", [image], flipped, plan)
    np.testing.assert_array_equal(fixed, lungs_by_midline(raw, properties, plan.labels))


def test_larger_windows_keep_an_overlap_of_half_a_patch_and_fit_the_image(trained):
    checkpoint = trained.fold(0) / "checkpoint_final.pth"
    plain = Predictor.from_files([checkpoint])
    wide = Predictor.from_files([checkpoint], settings=InferenceSettings(window_scale=(1.0, 2.0, 2.0)))
    patch, stride = plain.plan.patch_size, plain.plan.network.total_stride
    large = [4 * size for size in patch]
    assert plain.window_layout(large) == (tuple(patch), (0.5, 0.5, 0.5))
    window, steps = wide.window_layout(large)
    assert window[0] == patch[0] and all(size >= 2 * each and size % step == 0
                                         for size, each, step in zip(window[1:], patch[1:], stride[1:]))
    for size, each, step in zip(window, patch, steps):
        assert size - step * size == pytest.approx(each / 2)     # neighbours overlap by half a patch
    # never larger than the image (rounded down to the stride), never smaller than the patch
    image = [patch[0], patch[1] + stride[1] + 1, patch[2] // 2]
    window, _ = wide.window_layout(image)
    assert window == (patch[0], patch[1] + stride[1], patch[2])


def test_results_record_the_software_that_made_them(trained, cohort):
    """plans.json, each checkpoint and a prediction folder's .run.json name covnet's, torch's, SimpleITK's and
    numpy's versions, as installed here."""
    import importlib.metadata

    import covnet

    expected = {"covnet": covnet.__version__, **{name: importlib.metadata.version(name)
                                                 for name in ("torch", "SimpleITK", "numpy")}}
    plan = json.loads(trained.plans_json.read_text())
    checkpoint = Checkpoint.load(trained.fold(0) / "checkpoint_final.pth")
    run = json.loads((cohort[1] / ".reports" / ".run.json").read_text())
    for record in (plan["environment"], checkpoint.environment, checkpoint.plan["environment"], run["environment"]):
        assert {name: record[name] for name in expected} == expected
    assert "openvino" not in run["environment"] and "openvino" not in plan["environment"]    # torch ran it


def test_a_run_with_openvino_records_its_version(trained, tmp_path):
    import importlib.metadata

    pytest.importorskip("openvino")
    write_image(*phantom_image(trained, 0), tmp_path / "in" / "c0_0000.nii.gz")
    assert run_predict("-i", tmp_path / "in", "-o", tmp_path / "out", "--workspace", trained.root, "-f", "0",
                       "--runtime", "openvino") == 0
    run = json.loads((tmp_path / "out" / ".reports" / ".run.json").read_text())
    assert run["environment"]["openvino"] == importlib.metadata.version("openvino")


@pytest.mark.parametrize("flags, named", [(["-f", "1"], "-f 1"), (["--checkpoint", "best"], "--checkpoint best")])
def test_choosing_folds_or_checkpoints_of_a_checkpoint_file_is_one_line(trained, tmp_path, capsys, flags, named):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 0), inputs / "case.nii.gz")
    model = trained.fold(0).checkpoint("final")
    assert run_predict("-i", inputs, "-o", tmp_path / "out", "--model", model, *flags) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"covnet_predict: error: {model}: is one checkpoint file, so {named} cannot choose among "
                     "models; leave them out, or pass the results folder (--model) to choose"]
    assert not (tmp_path / "out").exists()


def test_a_workspace_beside_a_model_is_ignored_with_a_warning(trained, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 0), inputs / "case.nii.gz")
    model = trained.fold(0).checkpoint("final")
    assert run_predict("-i", inputs, "-o", tmp_path / "out", "--model", model, "--workspace", tmp_path / "other",
                       "--disable-tta") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert f"warning: --workspace {tmp_path / 'other'} is ignored: --model {model} is the model" in warnings
    assert (tmp_path / "out" / "case.nii.gz").is_file()
