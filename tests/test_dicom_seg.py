"""DICOM-SEG output: every segment read back lands on the right source slice and pixel, checked in patient space.

The label maps are drawn from patient coordinates (LPS mm, see ``physical_labels``), never from array indices,
and each SEG frame is checked against the physical position of every pixel of the source image it references.
A writer that mirrored rows or columns, or put a frame on the wrong slice, would fail whatever the series'
orientation, storage order or the grid the label map comes on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from kit.images import write_dicom_series
from kit.seg import check_seg_frames, source_pixel_points

import covnet
from covnet.dataset import COVID_LABELS
from covnet.export.dicom_seg import read_segment_masks, segment_volumes_ml, write_dicom_seg
from covnet.image.io import Geometry, read_image
from covnet.inference.report import case_report
from covnet.runtime.errors import CovnetError

FLIPPED_ROWS_AND_COLUMNS = (-1, 0, 0, 0, -1, 0)
AXIAL = (1, 0, 0, 0, 1, 0)
SERIES_SHAPE = (6, 10, 12)               # z, y, x
SERIES_SPACING = (2.5, 0.8, 0.7)
SERIES_ORIGIN = (-100.0, -120.0, 30.0)
MODEL_ID = "f" * 64


def physical_labels(points_xyz: np.ndarray, centre_xyz: np.ndarray) -> np.ndarray:
    """A label for each LPS point (..., 3): left lung on the patient's left (+x), right lung on the right, and
    infection in front (-y) of the left lung on the lower slices only; the left lung's border moves with z so that
    a frame on the wrong slice differs too."""
    x, y, z = (points_xyz[..., axis] - centre_xyz[axis] for axis in range(3))
    labels = np.zeros(points_xyz.shape[:-1], np.uint8)
    labels[x > 0.5 + 0.12 * z] = COVID_LABELS["left_lung"]
    labels[x < -1.0] = COVID_LABELS["right_lung"]
    labels[(x > 0.5 + 0.12 * z) & (y < -1.0) & (z < 0)] = COVID_LABELS["infection"]
    return labels


def grid_points(geometry: Geometry) -> np.ndarray:
    """The LPS position of every voxel of a grid, (z, y, x, 3)."""
    k, j, i = np.meshgrid(*(np.arange(size) for size in geometry.shape), indexing="ij")
    index_xyz = np.stack([i, j, k], axis=-1) * np.asarray(geometry.spacing[::-1])
    direction = np.asarray(geometry.direction).reshape(3, 3)
    return np.asarray(geometry.origin) + index_xyz @ direction.T


def grid_centre(geometry: Geometry) -> np.ndarray:
    points = grid_points(geometry)
    return (points.reshape(-1, 3).min(axis=0) + points.reshape(-1, 3).max(axis=0)) / 2


def flipped(geometry: Geometry, labels_zyx: np.ndarray, axis_xyz: int) -> tuple[Geometry, np.ndarray]:
    """The same voxels on a grid whose index axis ``axis_xyz`` runs the other way (what reorienting to RAS does)."""
    direction = np.asarray(geometry.direction).reshape(3, 3).copy()
    size = geometry.shape[::-1][axis_xyz]
    origin = np.asarray(geometry.origin) + direction[:, axis_xyz] * geometry.spacing[::-1][axis_xyz] * (size - 1)
    direction[:, axis_xyz] *= -1
    return Geometry(geometry.spacing, tuple(origin), tuple(direction.ravel()), geometry.shape), \
        np.flip(labels_zyx, axis=2 - axis_xyz)


def write_series(folder: Path, orientation, descending: bool) -> tuple[np.ndarray, Geometry]:
    volume = np.arange(np.prod(SERIES_SHAPE), dtype=np.int16).reshape(SERIES_SHAPE)
    write_dicom_series(volume, folder, spacing_zyx=SERIES_SPACING, origin_xyz=SERIES_ORIGIN, orientation=orientation,
                       descending_storage=descending)
    return read_image(folder)


def check_seg_against_sources(seg_path: Path, series_dir: Path, centre_xyz: np.ndarray) -> int:
    """Every frame equals the physical labels at its source image's pixels, and no non-empty (label, slice) pair
    is missing; returns the number of frames checked."""
    return check_seg_frames(seg_path, series_dir, lambda source: physical_labels(source_pixel_points(source),
                                                                                 centre_xyz), COVID_LABELS)


@pytest.mark.parametrize("orientation", [AXIAL, FLIPPED_ROWS_AND_COLUMNS], ids=["axial", "flipped_rows_columns"])
@pytest.mark.parametrize("descending", [False, True], ids=["ascending_files", "descending_files"])
def test_segments_land_on_the_right_slice_and_pixel(tmp_path, orientation, descending):
    series_dir = tmp_path / "series"
    _, geometry = write_series(series_dir, orientation, descending)
    centre = grid_centre(geometry)
    labels = physical_labels(grid_points(geometry), centre)
    assert {int(value) for value in np.unique(labels)} == {0, 1, 2, 3}
    seg_path = write_dicom_seg(labels, geometry, series_dir, tmp_path / "case.seg.dcm", COVID_LABELS,
                               model_id=MODEL_ID)
    assert check_seg_against_sources(seg_path, series_dir, centre) >= SERIES_SHAPE[0]


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1), (2,)], ids=["x", "y", "x_and_y", "z"])
def test_a_label_map_on_a_reoriented_grid_lands_on_the_same_pixels(tmp_path, axes):
    """The TotalSegmentator case (PR #598): the label map comes back on a grid flipped from the series' own."""
    series_dir = tmp_path / "series"
    _, geometry = write_series(series_dir, FLIPPED_ROWS_AND_COLUMNS, descending=True)
    centre = grid_centre(geometry)
    labels = physical_labels(grid_points(geometry), centre)
    for axis in axes:
        geometry, labels = flipped(geometry, labels, axis)
    np.testing.assert_array_equal(labels, physical_labels(grid_points(geometry), centre))
    seg_path = write_dicom_seg(labels, geometry, series_dir, tmp_path / "case.seg.dcm", COVID_LABELS,
                               model_id=MODEL_ID)
    check_seg_against_sources(seg_path, series_dir, centre)


def test_seg_identifies_algorithm_and_references_the_series(tmp_path):
    series_dir = tmp_path / "series"
    _, geometry = write_series(series_dir, AXIAL, descending=False)
    labels = physical_labels(grid_points(geometry), grid_centre(geometry))
    seg_path = write_dicom_seg(labels, geometry, series_dir, tmp_path / "case.seg.dcm", COVID_LABELS,
                               model_id=MODEL_ID)
    seg = pydicom.dcmread(seg_path)
    source = pydicom.dcmread(next(series_dir.iterdir()), stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == SERIES_SHAPE[0]
    coded = {}
    for segment in seg.SegmentSequence:
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("covnet", covnet.__version__)
        assert MODEL_ID in algorithm.AlgorithmParameters
        coded[segment.SegmentLabel] = (segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
                                       segment.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                                       segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator)
    assert coded == {"Left lung": ("91723000", "44029006", "SCT"), "Right lung": ("91723000", "3341006", "SCT"),
                     "COVID-19 infection": ("49755003", "409774005", "SCT")}
    assert seg.SoftwareVersions == covnet.__version__


def test_segment_volumes_match_the_label_map_and_the_report(tmp_path):
    series_dir = tmp_path / "series"
    _, geometry = write_series(series_dir, FLIPPED_ROWS_AND_COLUMNS, descending=True)
    labels = physical_labels(grid_points(geometry), grid_centre(geometry))
    volumes = segment_volumes_ml(write_dicom_seg(labels, geometry, series_dir, tmp_path / "case.seg.dcm",
                                                 COVID_LABELS, model_id=MODEL_ID))
    voxel_ml = np.prod(SERIES_SPACING) / 1000
    for name in ("left_lung", "right_lung", "infection"):
        assert volumes[name] == pytest.approx(np.count_nonzero(labels == COVID_LABELS[name]) * voxel_ml, rel=1e-9)
    report = case_report(labels, geometry.spacing)
    assert volumes["infection"] == pytest.approx(report["infection_ml"], rel=1e-9)
    assert sum(volumes.values()) == pytest.approx(report["left_lung_ml"] + report["right_lung_ml"], rel=1e-9)


def test_an_empty_label_map_gives_empty_segments(tmp_path):
    series_dir = tmp_path / "series"
    _, geometry = write_series(series_dir, AXIAL, descending=False)
    seg_path = write_dicom_seg(np.zeros(geometry.shape, np.uint8), geometry, series_dir, tmp_path / "case.seg.dcm",
                               COVID_LABELS, model_id=MODEL_ID)
    assert segment_volumes_ml(seg_path) == {"left_lung": 0.0, "right_lung": 0.0, "infection": 0.0}


def test_a_label_map_off_the_series_grid_is_refused_and_nothing_is_written(tmp_path):
    series_dir = tmp_path / "series"
    _, geometry = write_series(series_dir, AXIAL, descending=False)
    labels = np.zeros(geometry.shape, np.uint8)
    shifted = Geometry(geometry.spacing, (geometry.origin[0] + 0.35, *geometry.origin[1:]), geometry.direction,
                       geometry.shape)
    output = tmp_path / "case.seg.dcm"
    with pytest.raises(CovnetError, match="lies between the label map's voxels"):
        write_dicom_seg(labels, shifted, series_dir, output, COVID_LABELS, model_id=MODEL_ID)
    fewer_slices = Geometry(geometry.spacing, geometry.origin, geometry.direction, (geometry.shape[0] - 1,
                                                                                    *geometry.shape[1:]))
    with pytest.raises(CovnetError, match="outside the label map's grid"):
        write_dicom_seg(labels[1:], fewer_slices, series_dir, output, COVID_LABELS, model_id=MODEL_ID)
    labels[0, 0, 0] = 7
    with pytest.raises(CovnetError, match=r"values \[7\]"):
        write_dicom_seg(labels, geometry, series_dir, output, COVID_LABELS, model_id=MODEL_ID)
    with pytest.raises(CovnetError, match="no DICOM image slices"):
        write_dicom_seg(labels, geometry, tmp_path / "empty", output, COVID_LABELS, model_id=MODEL_ID)
    assert list(tmp_path.iterdir()) == [series_dir]


def slice_pattern(index: int, shape_yx: tuple[int, int]) -> np.ndarray:
    """A rectangle whose place, size and label differ on every slice."""
    pattern = np.zeros(shape_yx, np.uint8)
    pattern[10 + 20 * index: 25 + 20 * index, 30 + 9 * index: 90 + 13 * index] = 1 + index % 3
    return pattern


def test_a_real_dicom_series_gets_each_slice_pattern_back_on_its_slice(tmp_path, real_ct_dir):
    """The real series stores its slices with InstanceNumber rising while z falls, and de-identification
    blanked its study and series UIDs."""
    series_dir = real_ct_dir / "dicom_abdomen_512x512x20"
    _, geometry = read_image(series_dir)
    assert geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    labels = np.stack([slice_pattern(index, geometry.shape[1:]) for index in range(geometry.shape[0])])
    seg_path = write_dicom_seg(labels, geometry, series_dir, tmp_path / "real.seg.dcm", COVID_LABELS,
                               model_id=MODEL_ID)
    slice_of_source = {}
    for path in series_dir.iterdir():
        source = pydicom.dcmread(path, stop_before_pixels=True)
        offset = (float(source.ImagePositionPatient[2]) - geometry.origin[2]) / geometry.spacing[0]
        slice_of_source[str(source.file_meta.MediaStorageSOPInstanceUID)] = int(round(offset))
    assert sorted(slice_of_source.values()) == list(range(geometry.shape[0]))
    seen = set()
    for name, frames in read_segment_masks(seg_path).items():
        for uid, mask in frames.items():
            index = slice_of_source[uid]
            expected = slice_pattern(index, geometry.shape[1:]) == COVID_LABELS[name]
            np.testing.assert_array_equal(mask, expected, err_msg=f"{name} on slice {index}")
            seen.add(index)
    assert seen == set(range(geometry.shape[0]))
