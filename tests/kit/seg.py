"""Reading a DICOM-SEG back against its source series: where each source pixel lies in the patient, and a frame by
frame comparison of the SEG's segments with a label map on any grid (e.g. covnet_predict's NIfTI of the case)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pydicom

from covnet.export.dicom_seg import read_segment_masks
from covnet.image.io import Geometry


def source_pixel_points(dataset: pydicom.Dataset) -> np.ndarray:
    """The LPS position of every pixel of a source image, (rows, columns, 3), from its own header."""
    orientation = np.asarray(dataset.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(value) for value in dataset.PixelSpacing)
    rows, columns = np.meshgrid(np.arange(int(dataset.Rows)), np.arange(int(dataset.Columns)), indexing="ij")
    return (np.asarray(dataset.ImagePositionPatient, float) + columns[..., None] * column_spacing * orientation[:3]
            + rows[..., None] * row_spacing * orientation[3:])


def labels_at_points(labels_zyx: np.ndarray, geometry: Geometry, points_xyz: np.ndarray) -> np.ndarray:
    """The label of the voxel at each LPS point (..., 3); every point must be a voxel centre of the grid."""
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(np.asarray(geometry.spacing[::-1], float)))
    index_xyz = (points_xyz - np.asarray(geometry.origin, float)) @ to_index.T
    rounded = np.round(index_xyz).astype(int)
    assert np.abs(index_xyz - rounded).max() < 0.05, "a source pixel lies between the label map's voxels"
    assert (rounded >= 0).all() and (rounded < np.asarray(geometry.shape[::-1])).all(), "a pixel is off the grid"
    return labels_zyx[rounded[..., 2], rounded[..., 1], rounded[..., 0]]


def check_seg_frames(seg_path: Path, series_dir: Path, expected_labels: Callable[[pydicom.Dataset], np.ndarray],
                     label_names: Mapping[str, int]) -> int:
    """Every frame of the SEG equals, pixel for pixel, ``expected_labels(source)`` (the labels of its source
    image's (rows, columns) pixels) == its segment's label, a frame sits at its source's position, no empty frame
    is stored and no (segment, source image) pair that holds labels is missing; every image the SEG references
    must be in ``series_dir`` (which may hold other series). Returns the number of non-empty pairs checked."""
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    sources = {}
    for path in sorted(series_dir.iterdir()):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        uid = str(dataset.get("SOPInstanceUID") or dataset.file_meta.MediaStorageSOPInstanceUID)
        if uid in referenced:
            sources[uid] = dataset
    assert len(sources) == len(referenced), "the SEG references images that are not in the folder"
    masks = read_segment_masks(seg_path)
    positions = {str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID):
                 [float(value) for value in frame.PlanePositionSequence[0].ImagePositionPatient]
                 for frame in seg.PerFrameFunctionalGroupsSequence}
    foreground = {name: value for name, value in label_names.items() if value != 0}
    assert set(masks) == set(foreground)
    checked = 0
    for uid, source in sources.items():
        labels = expected_labels(source)
        for name, frames in masks.items():
            expected = labels == foreground[name]
            if not expected.any():
                assert uid not in frames, f"{name}: a frame on {uid}, which holds none of it"
                continue
            assert uid in frames, f"{name}: no frame for source image {uid}"
            np.testing.assert_array_equal(frames[uid], expected, err_msg=f"{name} on source image {uid}")
            np.testing.assert_allclose(positions[uid], [float(v) for v in source.ImagePositionPatient], atol=1e-3)
            checked += 1
    return checked


def check_seg_against_label_map(seg_path: Path, series_dir: Path, labels_zyx: np.ndarray, geometry: Geometry,
                                label_names: Mapping[str, int]) -> int:
    """:func:`check_seg_frames` against a label map on any grid (e.g. covnet_predict's NIfTI of the series)."""
    return check_seg_frames(seg_path, series_dir,
                            lambda source: labels_at_points(labels_zyx, geometry, source_pixel_points(source)),
                            label_names)
