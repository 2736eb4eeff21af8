"""The Python API: load a model once and segment many CTs (files, a SimpleITK image, a DICOM series) with the
same labels, geometry, report rows and probabilities as covnet_predict's files, which come through the same
objects; a model zip; one-line errors; ``import covnet`` stays cheap."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from kit.images import write_dicom_series
from kit.workspaces import phantom_image, run_predict

import covnet
import covnet.api
from covnet.checkpoint import Checkpoint
from covnet.cli import export_model
from covnet.cli.common import run_command
from covnet.image.io import Geometry, read_image, write_image
from covnet.inference.inputs import LabelMapInput
from covnet.runtime.errors import CovnetError

REPOSITORY = Path(__file__).resolve().parents[1]
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
# torch runs the network, as in the covnet_predict runs (run_predict) these results are compared with
SETTINGS = dataclasses.replace(covnet.api.PREDICT_SETTINGS, use_mirroring=False, runtime="torch")
# name in the report, input, covnet_predict's label map
CASES = (("case", "case_0000.nii.gz", "case.nii.gz"), ("flipped", "flipped.mha", "flipped.mha"),
         ("series", "series", "series.nii.gz"))


@pytest.fixture(scope="module")
def predicted(trained, tmp_path_factory):
    """covnet_predict over a NIfTI, a flipped MHA and a DICOM series, with the ensemble of folds 0 and 1."""
    base = tmp_path_factory.mktemp("api")
    inputs, outputs = base / "in", base / "out"
    write_image(*phantom_image(trained, 0), inputs / "case_0000.nii.gz")
    image, geometry = phantom_image(trained, 1)
    write_image(image, Geometry(geometry.spacing, (150.0, 90.5, -75.0), FLIPPED, geometry.shape),
                inputs / "flipped.mha")
    image, geometry = phantom_image(trained, 2)
    write_dicom_series(image[:20], inputs / "series", spacing_zyx=geometry.spacing)
    assert run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, "--disable-tta",
                       "--save-probabilities", "--output-type", "nifti") == 0
    return inputs, outputs


@pytest.fixture
def weight_reads(monkeypatch) -> dict:
    """How often checkpoints are loaded (``Checkpoint.load``) and how often ``torch.load`` runs."""
    counts = {"Checkpoint.load": 0, "torch.load": 0}
    checkpoint_load, torch_load = Checkpoint.load.__func__, torch.load

    def counted_checkpoint_load(cls, *args, **kwargs):
        counts["Checkpoint.load"] += 1
        return checkpoint_load(cls, *args, **kwargs)

    def counted_torch_load(*args, **kwargs):
        counts["torch.load"] += 1
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(Checkpoint, "load", classmethod(counted_checkpoint_load))
    monkeypatch.setattr(torch, "load", counted_torch_load)
    return counts


def test_load_once_segment_many_gives_covnet_predicts_files(trained, predicted, weight_reads):
    inputs, outputs = predicted
    model = covnet.load_model(trained.root, settings=SETTINGS, device="cpu")
    assert weight_reads == {"Checkpoint.load": 2, "torch.load": 2}          # folds 0 and 1, once each
    assert model.description == "the ensemble of folds 0, 1 (checkpoint_final)"
    rows = {row["case"]: row for row in json.loads((outputs / "report.json").read_text())["cases"]}
    for _ in range(2):
        for name, source, output in CASES:
            # the MHA goes in as a SimpleITK image, the others as paths (the report name from the file or folder)
            image = sitk.ReadImage(str(inputs / source)) if source.endswith(".mha") else inputs / source
            result = model.segment(image, name="flipped" if source.endswith(".mha") else None, probabilities=True)
            labels, geometry = read_image(outputs / output)
            np.testing.assert_array_equal(result.labels, labels, err_msg=name)
            label_image = result.label_image
            np.testing.assert_array_equal(sitk.GetArrayFromImage(label_image), labels)
            assert np.allclose(label_image.GetSpacing(), geometry.spacing[::-1], atol=1e-5)
            assert np.allclose(label_image.GetOrigin(), geometry.origin, atol=1e-4)
            assert np.allclose(label_image.GetDirection(), geometry.direction, atol=1e-6)
            assert result.report.keys() == rows[name].keys()
            for key, value in rows[name].items():
                assert result.report[key] == (value if isinstance(value, str) or value is None
                                              else pytest.approx(value, rel=1e-9)), (name, key)
            saved = np.load(outputs / f"{name}.npz")["probabilities"].astype(np.float32)
            assert result.probabilities.shape == saved.shape
            assert np.abs(result.probabilities - saved).max() < 2e-3      # float16 in the file
    assert weight_reads == {"Checkpoint.load": 2, "torch.load": 2}          # nothing read again
    assert model.segment(inputs / "case_0000.nii.gz").probabilities is None


def test_covnet_predict_loads_once_and_segments_each_case_through_the_api(trained, predicted, tmp_path,
                                                                          weight_reads, monkeypatch):
    inputs, _ = predicted
    calls = {"load_model": 0, "segment": []}
    load_model, segment = covnet.api.load_model, covnet.api.Model.segment

    def counted_load_model(*args, **kwargs):
        calls["load_model"] += 1
        return load_model(*args, **kwargs)

    def counted_segment(self, image, **kwargs):
        calls["segment"].append(image.image.name)
        return segment(self, image, **kwargs)

    monkeypatch.setattr("covnet.cli.predict.load_model", counted_load_model)
    monkeypatch.setattr(covnet.api.Model, "segment", counted_segment)
    assert run_predict("-i", inputs, "-o", tmp_path / "out", "--workspace", trained.root, "--disable-tta",
                       "--output-type", "nifti") == 0
    assert calls == {"load_model": 1, "segment": ["case", "flipped", "series"]}
    assert weight_reads == {"Checkpoint.load": 2, "torch.load": 2}


def test_imports_are_cheap_and_covnet_names_the_api():
    probe = "import sys, covnet; print(sorted(name for name in ('torch', 'SimpleITK') if name in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, encoding="utf-8", check=True).stdout
    assert loaded.strip() == "[]"
    # covnet_predict starts without the DICOM libraries (the GPU check's machine has none): only a SEG needs them
    probe = ("import sys, covnet.cli.predict; "
             "print(sorted(name for name in ('highdicom', 'pydicom') if name in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, encoding="utf-8", check=True).stdout
    assert loaded.strip() == "[]"
    assert covnet.load_model is covnet.api.load_model and covnet.Model is covnet.api.Model
    assert "load_model" in dir(covnet)
    with pytest.raises(AttributeError, match="no attribute 'segment'"):
        covnet.segment


def test_what_is_not_a_ct_is_a_one_line_error(trained, tmp_path):
    model = covnet.load_model(trained.fold(0) / "checkpoint_final.pth", settings=SETTINGS, device="cpu")
    assert model.description.startswith("checkpoint ")
    with pytest.raises(CovnetError, match=r"^image: is not a 3D volume"):
        model.segment(sitk.Image(40, 30, sitk.sitkInt16))
    with pytest.raises(LabelMapInput, match="skipped"):
        model.segment(trained.labels_tr / "phantom_000.nii.gz")
    image, _ = phantom_image(trained, 0)
    scaled = sitk.GetImageFromArray(((image - image.min()) // 10).astype(np.uint8))
    with pytest.raises(CovnetError, match=r"^scan: .*not segmented"):
        model.segment(scaled, name="scan")
    result = model.segment(sitk.ReadImage(str(trained.images_tr / "phantom_000_0000.nii.gz")))
    assert result.name == "image" and result.report["case"] == "image"
    with pytest.raises(CovnetError, match="a DICOM-SEG needs the DICOM series"):
        model.write_dicom_seg(result, tmp_path / "image.seg.dcm")
    assert not (tmp_path / "image.seg.dcm").exists()


def test_an_array_is_refused_with_how_to_wrap_it(trained):
    model = covnet.load_model(trained.fold(0) / "checkpoint_final.pth", settings=SETTINGS, device="cpu")
    image, _ = phantom_image(trained, 0)
    for wrong in (image, torch.from_numpy(image), 3):
        with pytest.raises(TypeError) as raised:
            model.segment(wrong)
        assert isinstance(raised.value, CovnetError) and "\n" not in str(raised.value)
        assert "give a SimpleITK image, the path of a NIfTI/MHA/NRRD file, or a DICOM series folder" in str(raised.value)
        assert "sitk.GetImageFromArray(array), then image.SetSpacing((x_mm, y_mm, z_mm))" in str(raised.value)
    assert str(raised.value).startswith("cannot segment an object of type int:")
    with pytest.raises(TypeError, match="^cannot segment a numpy array: "):
        model.prepare(image)


def test_a_model_zip_is_installed_once_and_its_own_folds_and_checkpoint_are_used(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    archive = tmp_path / "fold1_best.zip"
    assert run_command("covnet_export_model", export_model.main,
                       ["--workspace", str(trained.root), "-o", str(archive), "-f", "1", "--checkpoint", "best"]) == 0
    model = covnet.load_model(archive, settings=SETTINGS, device="cpu")
    (installed,) = (tmp_path / "cache" / "covnet" / "models").iterdir()
    assert model.checkpoints == [installed / "fold_1" / "checkpoint_best.pth"]
    assert model.model_id == installed.name
    assert model.description == f"model {installed.name[:12]}: fold 1 (checkpoint_best)"
    with zipfile.ZipFile(archive) as opened:
        assert "fold_1/checkpoint_best.pth" in opened.namelist()
    reference = covnet.load_model(trained.root, folds=["1"], checkpoint="best", settings=SETTINGS, device="cpu")
    image = trained.images_tr / "phantom_003_0000.nii.gz"
    np.testing.assert_array_equal(model.segment(image).labels, reference.segment(image).labels)
    with pytest.raises(CovnetError, match=rf"^{archive}: holds fold 1 \(checkpoint_best\) only, not checkpoint_final: "
                                          "leave out --checkpoint"):
        covnet.load_model(archive, checkpoint="final", device="cpu")
    with pytest.raises(CovnetError, match=rf"^{archive}: holds fold 1 \(checkpoint_best\) only, not -f 0: leave out -f"):
        covnet.load_model(archive, folds=["0"], device="cpu")


def readme_python_example() -> str:
    text = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_runs(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert run_command("covnet_export_model", export_model.main,
                       ["--workspace", str(trained.root), "-o", "lungs_covid.zip"]) == 0
    for index in (0, 1):
        write_image(*phantom_image(trained, index), tmp_path / "scans" / f"scan_{index}.nii.gz")
    capsys.readouterr()
    exec(compile(readme_python_example(), "README.md", "exec"), {})
    # what the example prints (the log's "installed model ..." line aside, which run_command's logging set up)
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("installed model ")]
    assert len(printed) == 3 and printed[0].startswith("model ")
    for index, line in zip((0, 1), printed[1:]):
        scan = tmp_path / "scans" / f"scan_{index}.nii.gz"
        labels, geometry = read_image(tmp_path / "labels" / scan.name)
        assert geometry.matches(read_image(scan)[1]) and labels.dtype == np.uint8
        assert line.startswith(f"scan_{index}: lungs ")
    # The written labels are the model's (the workspace's own folds, with covnet_predict's settings).
    result = covnet.load_model(trained.root, device="cpu").segment(tmp_path / "scans" / "scan_1.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "labels" / "scan_1.nii.gz")[0], result.labels)
    assert printed[2].endswith(f"infection {result.report['infection_ml']:.1f} mL")
