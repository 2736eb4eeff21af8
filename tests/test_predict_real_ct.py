"""covnet_predict on real CTs (../shared/data/real_ct): a real DICOM series and a clinical-size 512×512×141
NIfTI go through the tiny trained model; each label map must lie on exactly its input's grid and the report
must have a row per case. Skipped where the real CT folder is absent (a user's clone)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from kit.workspaces import run_predict, trained_workspace_once

from covnet.image.io import read_image

DICOM_SERIES = "dicom_abdomen_512x512x20"
CHEST_CT = "chest_ct_512x512x141.nii.gz"


@pytest.fixture(scope="module")
def real_ct_prediction(tmp_path_factory):
    """Two covnet_predict runs (fold 0 of the tiny model, no TTA): a copy of the real DICOM series folder with
    ``--output-type both`` (a series' default is its SEG alone; the grid check reads the label map), and a
    link to the real chest CT. Returns the output folder of each input."""
    from kit.images import REAL_CT_DIR
    if not REAL_CT_DIR.is_dir():
        pytest.skip("../shared/data/real_ct is not present")
    trained = trained_workspace_once(tmp_path_factory)
    base = tmp_path_factory.mktemp("real_ct")
    outputs = {}
    for source, extra in ((DICOM_SERIES, ("--output-type", "both")), (CHEST_CT, ())):
        inputs, outputs[source] = base / f"in_{source}", base / f"out_{source}"
        inputs.mkdir()
        # The series is copied (3 MB): the input walk does not follow symlinked folders. The 37 MB NIfTI is linked.
        if source == DICOM_SERIES:
            shutil.copytree(REAL_CT_DIR / source, inputs / source)
        else:
            (inputs / source).symlink_to(REAL_CT_DIR / source)
        assert run_predict("-i", inputs, "-o", outputs[source], "--workspace", trained.root, "-f", "0",
                           "--disable-tta", *extra) == 0
    assert (outputs[DICOM_SERIES] / f"{DICOM_SERIES}.seg.dcm").is_file()
    return REAL_CT_DIR, outputs


@pytest.mark.parametrize("source, output", [(DICOM_SERIES, f"{DICOM_SERIES}.nii.gz"),
                                            (CHEST_CT, CHEST_CT)])
def test_real_ct_label_maps_keep_the_input_grid(real_ct_dir, real_ct_prediction, source, output):
    _, outputs = real_ct_prediction
    _, geometry = read_image(real_ct_dir / source)
    labels, written = read_image(outputs[source] / output)
    assert labels.dtype == np.uint8 and set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
    assert labels.shape == geometry.shape == written.shape
    assert np.allclose(written.spacing, geometry.spacing, rtol=0, atol=1e-5)
    assert np.allclose(written.origin, geometry.origin, rtol=0, atol=1e-4)
    assert np.allclose(written.direction, geometry.direction, rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", [DICOM_SERIES, CHEST_CT])
def test_real_ct_report_has_a_row_per_case(real_ct_prediction, source):
    _, outputs = real_ct_prediction
    case = source.removesuffix(".nii.gz")
    rows = json.loads((outputs[source] / "report.json").read_text())["cases"]
    assert [row["case"] for row in rows] == [case]
    csv_rows = (outputs[source] / "report.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in csv_rows] == [case]
    for row in rows:
        assert row["left_lung_ml"] >= 0 and row["right_lung_ml"] >= 0 and row["infection_ml"] >= 0
