"""Fixtures every test module can ask for; the helpers themselves live in tests/kit/."""
from __future__ import annotations

from pathlib import Path

import pytest
from kit.images import REAL_CT_DIR, make_tiny_case, write_dicom_series
from kit.workspaces import trained_workspace_once

from covnet.dataset import covid_description
from covnet.image.io import write_image


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """covnet's cache ($XDG_CACHE_HOME/covnet: installed models, OpenVINO conversions) in the session's temporary
    folder, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The tiny phantom workspace with folds 0 and 1 trained, made once per session (read only: copy to change
    it)."""
    return trained_workspace_once(tmp_path_factory)


@pytest.fixture
def dicom_series_writer():
    return write_dicom_series


@pytest.fixture
def real_ct_dir() -> Path:
    if not REAL_CT_DIR.is_dir():
        pytest.skip("../shared/data/real_ct is not present")
    return REAL_CT_DIR


@pytest.fixture
def tiny_workspace(tmp_path):
    """A valid raw dataset of three tiny labelled cases and two unlabelled ones."""
    raw = tmp_path / "raw"
    for index in range(3):
        image, label, geometry = make_tiny_case(index)
        write_image(image, geometry, raw / "imagesTr" / f"case_{index}_0000.nii.gz")
        write_image(label, geometry, raw / "labelsTr" / f"case_{index}.nii.gz")
    for index in range(2):
        image, _, geometry = make_tiny_case(10 + index)
        write_image(image, geometry, raw / "imagesUnlabelled" / f"pool_{index}_0000.nii.gz")
    covid_description("tiny", 3).save(raw / "dataset.json")
    return tmp_path
