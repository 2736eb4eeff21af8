import numpy as np
import pytest
import SimpleITK as sitk
from kit.images import write_dicom_series

from covnet.cli.common import run_command
from covnet.cli.import_unlabelled import main as import_main
from covnet.dataset import COVID_LABELS, DatasetDescription, find_cases
from covnet.image.discovery import sanitize_case_id
from covnet.image.io import Geometry, read_image, write_image
from covnet.importers.unlabelled import import_unlabelled
from covnet.runtime.errors import CovnetError
from covnet.workspace import Workspace

SHAPE = (6, 20, 18)
GEOMETRY = Geometry((2.0, 0.75, 0.75), (-50.0, 12.0, 100.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), SHAPE)


def ct_volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 1200, SHAPE).astype(np.int16)


@pytest.fixture()
def mosmed_like(tmp_path):
    """studies/CT-0/study_0001.nii.gz (float HU), studies/CT-1/study_0002/ (DICOM series), and clutter."""
    source = tmp_path / "MosMedData"
    volumes = {"study_0001": ct_volume(1), "study_0002": ct_volume(2)}
    write_image(volumes["study_0001"].astype(np.float32), GEOMETRY, source / "studies" / "CT-0" / "study_0001.nii.gz")
    write_dicom_series(volumes["study_0002"], source / "studies" / "CT-1" / "study_0002",
                       spacing_zyx=GEOMETRY.spacing, origin_xyz=GEOMETRY.origin)
    (source / "README.txt").write_text("not an image")
    return source, volumes


def assert_imported(workspace: Workspace, volumes: dict) -> None:
    written = sorted(p.name for p in workspace.images_unlabelled.iterdir())
    assert written == sorted(f"{case}_0000.nii.gz" for case in volumes)
    for case, volume in volumes.items():
        image, geometry = read_image(workspace.images_unlabelled / f"{case}_0000.nii.gz")
        assert image.dtype == np.int16 and np.array_equal(image, volume), case
        assert geometry.matches(GEOMETRY, tolerance=1e-4), case


def test_nifti_and_dicom_series_are_imported_as_int16_hu(mosmed_like, tmp_path):
    source, volumes = mosmed_like
    workspace = Workspace(tmp_path / "ws")
    summary = import_unlabelled(source, workspace)
    assert sorted(summary.added) == sorted(volumes) and summary.skipped == []
    assert_imported(workspace, volumes)
    assert not workspace.dataset_json.exists()


def test_rerun_skips_what_is_there_and_adds_only_new_cts(mosmed_like, tmp_path, capsys):
    source, volumes = mosmed_like
    workspace = Workspace(tmp_path / "ws")
    workspace.raw.mkdir(parents=True)
    workspace.dataset_json.write_text('{"untouched": true}\n')
    import_unlabelled(source, workspace)
    before = {p.name: p.stat().st_mtime_ns for p in workspace.images_unlabelled.iterdir()}
    capsys.readouterr()
    summary = import_unlabelled(source, workspace)
    assert summary.added == [] and sorted(summary.skipped) == sorted(volumes)
    assert "0 CT(s) added, 2 already imported" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in workspace.images_unlabelled.iterdir()} == before
    volumes["study_0003"] = ct_volume(3)
    write_image(volumes["study_0003"], GEOMETRY, source / "studies" / "CT-2" / "study_0003.mha")
    assert import_unlabelled(source, workspace).added == ["study_0003"]
    assert_imported(workspace, volumes)
    assert workspace.dataset_json.read_text() == '{"untouched": true}\n'



def test_pool_takes_the_file_ending_of_dataset_json(mosmed_like, tmp_path):
    source, volumes = mosmed_like
    workspace = Workspace(tmp_path / "ws")
    workspace.raw.mkdir(parents=True)
    DatasetDescription(channel_names={"0": "CT"}, labels=dict(COVID_LABELS), num_training=0,
                       file_ending=".mha").save(workspace.dataset_json)
    assert sorted(import_unlabelled(source, workspace).added) == sorted(volumes)
    assert sorted(p.name for p in workspace.images_unlabelled.iterdir()) == sorted(f"{c}_0000.mha" for c in volumes)
    # what preprocessing looks for
    assert find_cases(workspace.images_unlabelled, DatasetDescription.load(workspace.dataset_json).file_ending) \
        == sorted(volumes)
    image, geometry = read_image(workspace.images_unlabelled / "study_0001_0000.mha")
    assert image.dtype == np.int16 and np.array_equal(image, volumes["study_0001"])
    assert geometry.matches(GEOMETRY, tolerance=1e-4)
    summary = import_unlabelled(source, workspace)
    assert summary.added == [] and sorted(summary.skipped) == sorted(volumes)


def test_unusable_file_ending_in_dataset_json_is_an_error(mosmed_like, tmp_path):
    source, _ = mosmed_like
    workspace = Workspace(tmp_path / "ws")
    workspace.raw.mkdir(parents=True)
    workspace.dataset_json.write_text('{"file_ending": ".png"}\n')
    with pytest.raises(CovnetError, match="file_ending '.png'") as raised:
        import_unlabelled(source, workspace)
    assert raised.value.path == str(workspace.dataset_json)
    assert not workspace.images_unlabelled.exists()


def test_image_that_is_not_hu_is_written_with_a_warning(tmp_path, capsys):
    source = tmp_path / "source"
    stored = np.random.default_rng(7).integers(0, 4096, SHAPE).astype(np.uint16)  # e.g. raw detector values
    write_image(stored, GEOMETRY, source / "scan.nii.gz")
    workspace = Workspace(tmp_path / "ws")
    assert import_unlabelled(source, workspace).added == ["scan"]
    assert "this does not look like HU" in capsys.readouterr().err
    image, _ = read_image(workspace.images_unlabelled / "scan_0000.nii.gz")
    assert image.dtype == np.int16 and np.array_equal(image, stored)
    write_image(ct_volume(1), GEOMETRY, source / "hu.nii.gz")
    assert import_unlabelled(source, workspace).added == ["hu"]
    assert "does not look like HU" not in capsys.readouterr().err

def test_colliding_names_get_distinct_ids_within_and_across_sources(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    write_image(ct_volume(1), GEOMETRY, first / "a" / "scan.nii.gz")
    write_image(ct_volume(2), GEOMETRY, first / "b" / "scan.nii")
    write_image(ct_volume(3), GEOMETRY, second / "scan.nii.gz")
    workspace = Workspace(tmp_path / "ws")
    assert sorted(import_unlabelled(first, workspace).added) == ["a_scan", "b_scan"]
    write_image(ct_volume(4), GEOMETRY, second / "weird name (1).nii.gz")
    assert sorted(import_unlabelled(second, workspace).added) == ["scan", "weird_name_1"]
    write_image(ct_volume(5), GEOMETRY, tmp_path / "third" / "a_scan.nii.gz")
    assert import_unlabelled(tmp_path / "third", workspace).added == ["a_scan_2"]  # a_scan is another CT
    image, _ = read_image(workspace.images_unlabelled / "a_scan_2_0000.nii.gz")
    assert np.array_equal(image, ct_volume(5))


def test_sanitize_case_id():
    assert sanitize_case_id("CT 0/study.01") == "CT_0_study_01"
    assert sanitize_case_id("__") == "case"


@pytest.mark.parametrize("clutter", [None, "notes.txt"])
def test_folder_without_cts_is_an_error(tmp_path, clutter):
    source = tmp_path / "empty"
    source.mkdir()
    if clutter:
        (source / clutter).write_text("nothing to import")
    with pytest.raises(CovnetError, match="holds no CT images") as raised:
        import_unlabelled(source, Workspace(tmp_path / "ws"))
    assert raised.value.path == str(source)


def test_unreadable_and_2d_files_are_errors_naming_them(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    broken = source / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really a nifti")
    with pytest.raises(CovnetError) as raised:
        import_unlabelled(source, Workspace(tmp_path / "ws"))
    assert raised.value.path == str(broken) and "truncated or unreadable" in raised.value.problem
    broken.unlink()
    flat = source / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(flat))
    with pytest.raises(CovnetError, match="not a 3D volume") as raised:
        import_unlabelled(source, Workspace(tmp_path / "ws"))
    assert raised.value.path == str(flat)


def test_cli_exit_codes(mosmed_like, tmp_path, capsys):
    source, _ = mosmed_like
    argv = ["--source", str(source), "--workspace", str(tmp_path / "ws")]
    assert run_command("covnet_import_unlabelled", import_main, argv) == 0
    (tmp_path / "nothing").mkdir()
    capsys.readouterr()
    assert run_command("covnet_import_unlabelled", import_main, ["--source", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("covnet_import_unlabelled: error:")


def test_real_dicom_series(real_ct_dir, tmp_path):
    series = real_ct_dir / "dicom_abdomen_512x512x20"
    if not series.is_dir():
        pytest.skip(f"{series} is not present")
    workspace = Workspace(tmp_path / "ws")
    assert import_unlabelled(series, workspace).added == [series.name]
    image, geometry = read_image(workspace.images_unlabelled / f"{series.name}_0000.nii.gz")
    original, original_geometry = read_image(series)
    assert image.dtype == np.int16 and geometry.matches(original_geometry)
    assert np.abs(image.astype(np.float64) - original).max() <= 0.5


def test_discovery_follows_linked_folders_once(tmp_path, dicom_series_writer):
    from covnet.image.discovery import find_ct_sources
    series = tmp_path / "elsewhere" / "series"
    dicom_series_writer(np.zeros((3, 8, 8), np.int16), series)
    source = tmp_path / "source"
    source.mkdir()
    (source / "linked").symlink_to(series, target_is_directory=True)
    (source / "loop").symlink_to(source, target_is_directory=True)     # must not recurse forever
    assert find_ct_sources(source) == [source / "linked"]
