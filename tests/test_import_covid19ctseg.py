import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from covnet.cli.common import run_command
from covnet.cli.import_covid19ctseg import main as import_main
from covnet.dataset import COVID_LABELS, COVID_REGIONS, DatasetDescription, validate_raw_dataset
from covnet.image.io import Geometry, read_image, write_image
from covnet.importers.covid19ctseg import case_key, import_covid19ctseg, patient_groups, windowed_to_hu
from covnet.runtime.errors import CovnetError
from covnet.workspace import Workspace

SHAPE = (8, 24, 24)
# mask-style case id → (image stem as released, image suffix, mask suffix, geometry)
RELEASE = {
    "coronacases_001": ("coronacases_org_001", ".nii.gz", ".nii",
                        Geometry((5.0, 0.7, 0.7), (-170.0, -160.0, -300.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), SHAPE)),
    "coronacases_002": ("coronacases_org_002", ".nii", ".nii.gz",
                        Geometry((1.0, 0.6, 0.6), (10.0, 20.0, 30.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), SHAPE)),
    "radiopaedia_10_85902_1": ("radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm", ".nii.gz", ".nii.gz",
                               Geometry((2.5, 0.8, 0.8), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), SHAPE)),
    "radiopaedia_10_85902_3": ("radiopaedia_org_covid-19-pneumonia-10_85902_3-dcm", ".nii", ".nii.gz",
                               Geometry((2.5, 0.8, 0.8), (0.0, 0.0, -5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), SHAPE)),
    "radiopaedia_4_85506_1": ("radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm", ".nii.gz", ".nii",
                              Geometry((3.0, 0.9, 0.9), (5.0, 5.0, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), SHAPE)),
}


def make_mask(seed: int) -> np.ndarray:
    mask = np.zeros(SHAPE, np.float32)
    mask[1:7, 4:20, 2:11] = 1
    mask[1:7, 4:20, 13:22] = 2
    mask[3:5, 8:12 + seed % 3, 4:8] = 3
    return mask


def make_hu(case: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if case.startswith("radiopaedia"):  # the release clips these to the [-1250, 250] window
        return rng.integers(-1250, 251, SHAPE).astype(np.int16)
    return rng.integers(-1024, 1500, SHAPE).astype(np.int16)


def stored_image(case: str, hu: np.ndarray) -> np.ndarray:
    if case.startswith("radiopaedia"):
        return ((hu.astype(np.float32) + 1250.0) / 1500.0 * 255.0).astype(np.float32)
    return hu


def build_release(root: Path) -> dict:
    """Folders COVID-19-CT-Seg_20cases/ and Lung_and_Infection_Mask/ like Zenodo's; returns the truth per case."""
    truth = {}
    for seed, (case, (image_stem, image_suffix, mask_suffix, geometry)) in enumerate(RELEASE.items()):
        hu, mask = make_hu(case, seed), make_mask(seed)
        write_image(stored_image(case, hu), geometry, root / "COVID-19-CT-Seg_20cases" / (image_stem + image_suffix))
        write_image(mask, geometry, root / "Lung_and_Infection_Mask" / (case + mask_suffix))
        truth[case] = (hu, mask, geometry)
    return truth


def zip_release(root: Path, target: Path) -> None:
    """Images zipped inside their folder, masks zipped at top level (both layouts occur)."""
    target.mkdir(parents=True)
    with zipfile.ZipFile(target / "COVID-19-CT-Seg_20cases.zip", "w") as archive:
        for path in sorted((root / "COVID-19-CT-Seg_20cases").iterdir()):
            archive.write(path, f"COVID-19-CT-Seg_20cases/{path.name}")
    with zipfile.ZipFile(target / "Lung_and_Infection_Mask.zip", "w") as archive:
        for path in sorted((root / "Lung_and_Infection_Mask").iterdir()):
            archive.write(path, path.name)


@pytest.fixture()
def release(tmp_path):
    root = tmp_path / "release"
    return root, build_release(root)


def assert_imported(workspace: Workspace, truth: dict) -> None:
    description, cases = validate_raw_dataset(workspace.raw)
    assert cases == sorted(truth)
    assert description.channel_names == {"0": "CT"}
    assert description.labels == COVID_LABELS and description.regions == COVID_REGIONS
    assert description.num_training == len(truth)
    assert description.group_of("radiopaedia_10_85902_1") == description.group_of("radiopaedia_10_85902_3")
    assert len({description.group_of(case) for case in cases}) == len(cases) - 1
    for case, (hu, mask, geometry) in truth.items():
        image, image_geometry = read_image(workspace.images_tr / f"{case}_0000.nii.gz")
        label, label_geometry = read_image(workspace.labels_tr / f"{case}.nii.gz")
        assert image.dtype == np.int16
        assert np.abs(image.astype(np.int32) - hu).max() <= 1, case
        assert np.array_equal(label, mask.astype(np.uint8)), case
        assert image_geometry.matches(geometry, tolerance=1e-5) and label_geometry.matches(geometry, tolerance=1e-5)


@pytest.mark.parametrize("image_stem, mask_stem", [
    ("coronacases_org_001", "coronacases_001"),
    ("radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm", "radiopaedia_10_85902_1"),
    ("radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm", "radiopaedia_14_85914_0"),
    ("radiopaedia_org_covid-19-pneumonia-40_86625_0-dcm", "radiopaedia_40_86625_0"),
    ("radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm", "radiopaedia_4_85506_1"),
    ("radiopaedia_org_covid-19-pneumonia-29_86491_1-dcm", "radiopaedia_29_86491_1"),
])
def test_release_names_pair_by_key(image_stem, mask_stem):
    assert case_key(image_stem + ".nii.gz") == case_key(mask_stem + ".nii") is not None


def test_keys_of_distinct_cases_differ():
    names = ["coronacases_001", "radiopaedia_10_85902_1", "radiopaedia_10_85902_3", "radiopaedia_29_86490_1",
             "radiopaedia_29_86491_1", "radiopaedia_1_85902_10", "coronacases_010"]
    assert len({case_key(name) for name in names}) == len(names)


def test_scans_of_one_radiopaedia_case_share_a_patient():
    cases = ["coronacases_001", "radiopaedia_10_85902_1", "radiopaedia_10_85902_3", "radiopaedia_29_86490_1",
             "radiopaedia_29_86491_1", "radiopaedia_36_86526_0"]
    groups = patient_groups(cases)
    assert groups["radiopaedia_10_85902_1"] == groups["radiopaedia_10_85902_3"] == "radiopaedia_10"
    assert groups["radiopaedia_29_86490_1"] == groups["radiopaedia_29_86491_1"] == "radiopaedia_29"
    assert groups["coronacases_001"] == "coronacases_001"
    assert groups["radiopaedia_36_86526_0"] == "radiopaedia_36_86526_0"


def test_windowed_grey_levels_map_to_window_ends():
    assert np.allclose(windowed_to_hu(np.array([0.0, 255.0, 127.5])), [-1250.0, 250.0, -500.0])


def test_import_from_folders(release, tmp_path):
    root, truth = release
    (root / "Lung_Mask").mkdir()  # the other mask folders may be present and are ignored
    workspace = Workspace(tmp_path / "ws")
    assert import_covid19ctseg(root, workspace) == sorted(truth)
    assert_imported(workspace, truth)
    assert not [p for p in workspace.raw.iterdir() if p.name.startswith(".")]  # staging cleaned up


def test_import_from_zips(release, tmp_path):
    root, truth = release
    zipped = tmp_path / "zipped"
    zip_release(root, zipped)
    workspace = Workspace(tmp_path / "ws")
    import_covid19ctseg(zipped, workspace)
    assert_imported(workspace, truth)


def test_radiopaedia_image_already_in_hu_is_kept_with_a_warning(release, tmp_path, capsys):
    root, truth = release
    hu, mask, geometry = truth["radiopaedia_4_85506_1"]
    hu = hu.copy()
    hu[0, 0, 0] = -1250  # make sure the range leaves 0..255
    truth["radiopaedia_4_85506_1"] = (hu, mask, geometry)
    write_image(hu, geometry, root / "COVID-19-CT-Seg_20cases" / "radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii.gz")
    import_covid19ctseg(root, Workspace(tmp_path / "ws"))
    assert "taken as already in HU" in capsys.readouterr().err
    assert_imported(Workspace(tmp_path / "ws"), truth)



def test_only_an_image_that_is_not_hu_gets_the_hu_warning(release, tmp_path, capsys):
    root, truth = release
    import_covid19ctseg(root, Workspace(tmp_path / "ws"))
    assert "does not look like HU" not in capsys.readouterr().err  # windowed Radiopaedia images included
    hu, mask, geometry = truth["coronacases_002"]
    shifted = (hu.astype(np.int32) + 1024).astype(np.int16)  # stored without the rescale intercept
    truth["coronacases_002"] = (shifted, mask, geometry)
    image_file = root / "COVID-19-CT-Seg_20cases" / "coronacases_org_002.nii"
    write_image(shifted, geometry, image_file)
    import_covid19ctseg(root, Workspace(tmp_path / "ws"), overwrite=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "does not look like HU" in line]
    assert len(warnings) == 1 and str(image_file) in warnings[0]
    assert_imported(Workspace(tmp_path / "ws"), truth)

def _extra_image(root: Path) -> Path:
    path = root / "COVID-19-CT-Seg_20cases" / "coronacases_org_003.nii.gz"
    write_image(make_hu("coronacases_003", 9), RELEASE["coronacases_001"][3], path)
    return path


def _extra_mask(root: Path) -> Path:
    path = root / "Lung_and_Infection_Mask" / "radiopaedia_14_85914_0.nii.gz"
    write_image(make_mask(0), RELEASE["coronacases_001"][3], path)
    return path


def _shifted_mask(root: Path) -> Path:
    path = root / "Lung_and_Infection_Mask" / "radiopaedia_10_85902_3.nii.gz"
    geometry = RELEASE["radiopaedia_10_85902_3"][3]
    write_image(make_mask(0), Geometry((2.5, 0.8, 1.6), geometry.origin, geometry.direction, SHAPE), path)
    return path


def _mask_with_value(value: float):
    def corrupt(root: Path) -> Path:
        path = root / "Lung_and_Infection_Mask" / "radiopaedia_4_85506_1.nii"  # the last case converted
        mask = make_mask(4)
        mask[0, 0, 0] = value
        write_image(mask, RELEASE["radiopaedia_4_85506_1"][3], path)
        return path
    return corrupt


@pytest.mark.parametrize("corrupt, problem", [
    (_extra_image, "has no mask"),
    (_extra_mask, "has no image"),
    (_shifted_mask, "geometry does not match"),
    (_mask_with_value(5.0), "not declared"),
    (_mask_with_value(2.5), "non-integer"),
])
def test_bad_release_fails_naming_the_file_and_writes_nothing(release, tmp_path, corrupt, problem):
    root, _ = release
    bad_file = corrupt(root)
    workspace = Workspace(tmp_path / "ws")
    with pytest.raises(CovnetError) as raised:
        import_covid19ctseg(root, workspace)
    assert raised.value.path == str(bad_file) and problem in raised.value.problem
    assert not workspace.images_tr.exists() and not workspace.labels_tr.exists()
    assert not workspace.dataset_json.exists()
    assert not workspace.raw.exists() or not list(workspace.raw.iterdir())


def test_mismatch_inside_zip_names_the_member(release, tmp_path):
    root, _ = release
    _extra_mask(root)
    zipped = tmp_path / "zipped"
    zip_release(root, zipped)
    with pytest.raises(CovnetError) as raised:
        import_covid19ctseg(zipped, Workspace(tmp_path / "ws"))
    assert raised.value.path == str(zipped / "Lung_and_Infection_Mask.zip" / "radiopaedia_14_85914_0.nii.gz")


def test_missing_masks_part_is_named(release, tmp_path):
    root, _ = release
    shutil.rmtree(root / "Lung_and_Infection_Mask")
    with pytest.raises(CovnetError, match="Lung_and_Infection_Mask.zip"):
        import_covid19ctseg(root, Workspace(tmp_path / "ws"))


def test_existing_dataset_needs_overwrite_and_overwrite_replaces_all_labelled_cases(release, tmp_path):
    root, truth = release
    workspace = Workspace(tmp_path / "ws")
    import_covid19ctseg(root, workspace)
    with pytest.raises(CovnetError) as raised:
        import_covid19ctseg(root, workspace)
    assert raised.value.path == str(workspace.dataset_json)
    for part, name in (("COVID-19-CT-Seg_20cases", "coronacases_org_002.nii"),
                       ("Lung_and_Infection_Mask", "coronacases_002.nii.gz")):
        (root / part / name).unlink()
    del truth["coronacases_002"]
    import_covid19ctseg(root, workspace, overwrite=True)
    assert_imported(workspace, truth)  # the dropped case is gone from imagesTr/labelsTr too
    assert json.loads(workspace.dataset_json.read_text())["numTraining"] == len(truth)


def test_cli_returns_0_then_2_with_one_line_error(release, tmp_path, capsys):
    root, truth = release
    argv = ["--source", str(root), "--workspace", str(tmp_path / "ws")]
    assert run_command("covnet_import_covid19ctseg", import_main, argv) == 0
    capsys.readouterr()
    assert run_command("covnet_import_covid19ctseg", import_main, argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "dataset.json" in error and "--overwrite" in error
    assert run_command("covnet_import_covid19ctseg", import_main, argv + ["--overwrite"]) == 0
    assert DatasetDescription.load(tmp_path / "ws" / "raw" / "dataset.json").num_training == len(truth)
