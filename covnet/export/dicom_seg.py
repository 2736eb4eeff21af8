"""A label map written as a DICOM Segmentation (DICOM-SEG) of the series it was predicted from, so that a PACS,
OHIF or 3D Slicer overlays it on that series; and the per-segment volumes read back from such a SEG.

**Which pixel goes where.** The label map is (z, y, x) on a grid (:class:`~covnet.image.io.Geometry`): the one
``covnet.image.io`` read the series onto. Each source image is placed on that grid by geometry alone: its
ImagePositionPatient gives the grid index of its pixel (0, 0), its ImageOrientationPatient and PixelSpacing the
grid step of one column and of one row. Those steps must be whole grid steps along two grid axes (either sign)
and the position a whole grid index, else the image is not on the grid and nothing is written. The frame of an
image is then read from the label map along those axes. File names, InstanceNumber and the order a reader
sorted the slices in play no part, and a grid that was flipped or reordered after reading (e.g. to RAS) still
lands on the right pixels: the rows/columns of a frame always follow the source image's own orientation, which
is where TotalSegmentator's SEGs came out mirrored front-to-back (its PR #598).

**What is written.** One BINARY segment per foreground label of ``label_names`` (empty ones included, so that
a reader sees every structure the model looks for), coded with SNOMED CT (:data:`SEGMENT_CONCEPTS`), each
carrying the algorithm identification (covnet, its version, the model id); frames reference their source image
(SOP instance), and the SEG references the source series and shares its frame of reference, patient and study.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from covnet import __version__
from covnet.image.io import Geometry
from covnet.runtime.atomic import atomic_path
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger

log = logger(__name__)

# How far (in grid voxels) a source pixel may lie from a grid voxel centre, over a whole frame: DICOM's decimal
# strings round positions and spacings, nothing more.
GRID_TOLERANCE_VOXELS = 0.1
SEG_SERIES_DESCRIPTION = "covnet segmentation"
SEG_CONTENT_LABEL = "COVNET"         # Code String: upper case, at most 16 characters


@dataclass(frozen=True)
class SegmentConcept:
    """How a label is named and coded in a SEG."""
    label: str                       # SegmentLabel, what viewers list
    category: Code                   # SegmentedPropertyCategory (DICOM CID 7150)
    type: Code                       # SegmentedPropertyType
    anatomic_region: Code | None = None


# Categories: DICOM CID 7150 "Segmentation Property Categories" as pydicom ships it (Anatomical Structure SCT
# 91723000, Morphologically Abnormal Structure SCT 49755003). Types: SCT 44029006 "Left lung structure" and SCT
# 3341006 "Right lung structure" (SNOMED CT's exact matches of RadLex RID1326 and the right lung); the infection
# label (ground-glass opacity and consolidation, COVID-19-CT-Seg's "infection") as SCT 409774005 "Inflammation" of
# CID 7159 "Lesion Segmentation Types" in the lung (SCT 39607008): DICOM's own "Infiltrate" and "Ground glass
# opacity" (DCM 112121/112120, CID 6104) are not SNOMED CT and not segmentation property types.
SEGMENT_CONCEPTS: dict[str, SegmentConcept] = {
    "left_lung": SegmentConcept("Left lung", codes.SCT.AnatomicalStructure,
                                Code("44029006", "SCT", "Left lung structure")),
    "right_lung": SegmentConcept("Right lung", codes.SCT.AnatomicalStructure,
                                 Code("3341006", "SCT", "Right lung structure")),
    "infection": SegmentConcept("COVID-19 infection", codes.SCT.MorphologicallyAbnormalStructure,
                                codes.SCT.Inflammation, anatomic_region=codes.SCT.Lung),
}


def segment_concept(label_name: str) -> SegmentConcept:
    """The coding of a label; a label covnet does not know is named as it is and coded as tissue."""
    return SEGMENT_CONCEPTS.get(label_name) or SegmentConcept(label_name, codes.SCT.Tissue, codes.SCT.Tissue)


# ---------------------------------------------------------------------------------------------- source series
def _is_image_slice(dataset: pydicom.Dataset) -> bool:
    return all(keyword in dataset for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "ImagePositionPatient",
                                                  "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"))


def read_source_series(source: str | os.PathLike) -> list[pydicom.Dataset]:
    """The headers of the image slices of a series: ``source`` is its folder (not its subfolders; of several
    series there, the one with the most slices, which is the one ``covnet.image.io`` reads) or one of its files
    (that file's series in its folder). Identifiers that de-identification blanked are filled in
    (:func:`_fill_blank_identifiers`)."""
    source = Path(source)
    series_dir, member = (source.parent, source) if source.is_file() else (source, None)
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for path in sorted(series_dir.iterdir()) if series_dir.is_dir() else []:
        if not path.is_file():
            continue
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if _is_image_slice(dataset):
            by_series.setdefault(str(dataset.SeriesInstanceUID), []).append(dataset)
    if not by_series:
        raise CovnetError(series_dir, "holds no DICOM image slices to reference in a DICOM-SEG")
    if member is None:
        datasets = max(by_series.values(), key=len)
    else:
        datasets = next((series for series in by_series.values()
                         if any(Path(dataset.filename).resolve() == member.resolve() for dataset in series)), None)
        if datasets is None:
            raise CovnetError(member, "is no DICOM image slice to reference in a DICOM-SEG")
    _fill_blank_identifiers(datasets, series_dir)
    return datasets


def _fill_blank_identifiers(datasets: list[pydicom.Dataset], series_dir: Path) -> None:
    """Some de-identifiers blank the UIDs a SEG needs. A blank SOP class or instance UID is taken from the
    file's meta header, where DICOM keeps the same values; a blank study, series or frame-of-reference UID is
    replaced, in these in-memory headers only, by one derived from the instance UIDs (the same for every run),
    with a warning, since a viewer can then pair the SEG with the series only through its per-frame references."""
    for dataset in datasets:
        meta = getattr(dataset, "file_meta", None) or pydicom.Dataset()
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(dataset.get(keyword) or "") and str(meta.get(meta_keyword) or ""):
                setattr(dataset, keyword, meta.get(meta_keyword))
        if not str(dataset.get("SOPInstanceUID") or ""):
            raise CovnetError(_source_name(dataset), "has no SOP instance UID: a DICOM-SEG cannot reference it")
    instances = sorted(str(dataset.SOPInstanceUID) for dataset in datasets)
    blank = [keyword for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
             if any(not str(dataset.get(keyword) or "") for dataset in datasets)]
    for keyword in blank:
        derived = generate_uid(entropy_srcs=[keyword, *instances])
        for dataset in datasets:
            setattr(dataset, keyword, derived)
    if blank:
        log.warning(f"{series_dir}: the series has no {', '.join(blank)} (de-identified?); its DICOM-SEG uses "
                    "derived ones and reaches the images through their SOP instance UIDs")


def _source_name(dataset: pydicom.Dataset) -> str:
    return str(getattr(dataset, "filename", None) or f"SOP instance {dataset.SOPInstanceUID}")


def _along_normal(dataset: pydicom.Dataset) -> float:
    orientation = np.asarray(dataset.ImageOrientationPatient, float)
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), np.asarray(dataset.ImagePositionPatient, float)))


# ---------------------------------------------------------------------------------------------- source image → grid
@dataclass(frozen=True)
class FramePlacement:
    """Where a source image lies on the label grid: the (x, y, z) grid index of its pixel (0, 0), the grid axis
    and direction (+1/-1) of its rows (moving down one row) and of its columns (moving right one column)."""
    start_xyz: tuple[int, int, int]
    row_axis: int
    row_sign: int
    column_axis: int
    column_sign: int

    @property
    def slice_axis(self) -> int:
        return 3 - self.row_axis - self.column_axis

    def frame(self, labels_zyx: np.ndarray, rows: int, columns: int) -> np.ndarray:
        """The (rows, columns) frame of this source image, read from the label map."""
        labels_xyz = labels_zyx.transpose(2, 1, 0)
        index: list = [None, None, None]
        index[self.slice_axis] = self.start_xyz[self.slice_axis]
        index[self.row_axis] = (self.start_xyz[self.row_axis] + self.row_sign * np.arange(rows))[:, None]
        index[self.column_axis] = (self.start_xyz[self.column_axis] + self.column_sign * np.arange(columns))[None, :]
        return labels_xyz[tuple(index)]


def _whole_step(step: np.ndarray, count: int) -> tuple[int, int] | None:
    """(axis, sign) when ``step`` (grid voxels) is one whole step along one grid axis, to within the tolerance
    over ``count`` steps; else None."""
    axis = int(np.argmax(np.abs(step)))
    sign = 1 if step[axis] > 0 else -1
    expected = np.zeros(3)
    expected[axis] = sign
    return (axis, sign) if np.abs(step - expected).max() * max(count - 1, 1) <= GRID_TOLERANCE_VOXELS else None


def place_on_grid(dataset: pydicom.Dataset, geometry: Geometry) -> FramePlacement:
    """Where ``dataset``'s image lies on ``geometry``'s grid; ``CovnetError`` naming the file when it is not on
    it (another orientation or spacing, between slices, or outside)."""
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    index_of_mm = np.linalg.inv(direction @ np.diag(np.asarray(geometry.spacing[::-1], float)))
    orientation = np.asarray(dataset.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(value) for value in dataset.PixelSpacing)
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    # ImageOrientationPatient: first the direction along a row (one column to the right), then down a column.
    column_step = index_of_mm @ (orientation[:3] * column_spacing)
    row_step = index_of_mm @ (orientation[3:] * row_spacing)
    start = index_of_mm @ (np.asarray(dataset.ImagePositionPatient, float) - np.asarray(geometry.origin, float))
    columns_along, rows_along = _whole_step(column_step, columns), _whole_step(row_step, rows)
    source = _source_name(dataset)
    if columns_along is None or rows_along is None or columns_along[0] == rows_along[0]:
        raise CovnetError(source, f"its orientation {list(orientation)} and pixel spacing "
                                  f"{[row_spacing, column_spacing]} do not follow the label map's grid")
    rounded = np.round(start)
    if np.abs(start - rounded).max() > GRID_TOLERANCE_VOXELS:
        raise CovnetError(source, f"its position {list(dataset.ImagePositionPatient)} lies between the label map's "
                                  f"voxels (grid index {np.round(start, 2).tolist()}); are its slices evenly spaced?")
    placement = FramePlacement(tuple(int(value) for value in rounded), rows_along[0], rows_along[1],
                               columns_along[0], columns_along[1])
    size_xyz = geometry.shape[::-1]
    corners = [placement.start_xyz[placement.row_axis] + placement.row_sign * (rows - 1),
               placement.start_xyz[placement.column_axis] + placement.column_sign * (columns - 1)]
    inside = all(0 <= placement.start_xyz[axis] < size_xyz[axis] for axis in range(3)) and \
        0 <= corners[0] < size_xyz[placement.row_axis] and 0 <= corners[1] < size_xyz[placement.column_axis]
    if not inside:
        raise CovnetError(source, f"its image lies outside the label map's grid (shape z, y, x {list(geometry.shape)})")
    return placement


@dataclass(frozen=True)
class SourceStack:
    """The source images sorted along their slice normal, the label frame of each (n, rows, columns), and the
    distance between neighbouring slices (mm) on the grid."""
    datasets: list[pydicom.Dataset]
    frames: np.ndarray
    slice_spacing_mm: float


def _placed(geometry: Geometry, datasets: Sequence[pydicom.Dataset]
            ) -> tuple[list[pydicom.Dataset], list[FramePlacement]]:
    """The source images sorted along their slice normal, and where each lies on the grid; every slice of the grid
    must come from exactly one source image (else ``CovnetError`` naming one)."""
    ordered = sorted(datasets, key=_along_normal)
    placements = [place_on_grid(dataset, geometry) for dataset in ordered]
    slice_axes = {placement.slice_axis for placement in placements}
    if len(slice_axes) != 1:
        raise CovnetError(_source_name(ordered[0]), "the series' images do not share one slice direction")
    slice_axis = slice_axes.pop()
    covered: dict[int, pydicom.Dataset] = {}
    for dataset, placement in zip(ordered, placements):
        index = placement.start_xyz[slice_axis]
        if index in covered:
            raise CovnetError(_source_name(dataset), f"lies on the same slice as {_source_name(covered[index])}")
        covered[index] = dataset
    expected = geometry.shape[::-1][slice_axis]
    if len(covered) != expected:
        raise CovnetError(_source_name(ordered[0]), f"its series has {len(covered)} slices for a label map of "
                                                    f"{expected}: the label map was not predicted from this series")
    return ordered, placements


def series_on_grid(source: str | os.PathLike, geometry: Geometry) -> list[pydicom.Dataset]:
    """The headers of the series ``source`` (:func:`read_source_series`), once each of its images is known to lie on
    ``geometry``'s grid: a SEG of a label map on that grid can then be written (``CovnetError`` naming the image that
    cannot). Cheap, headers only: a caller checks before it spends time on the labels."""
    datasets = read_source_series(source)
    _placed(geometry, datasets)
    return datasets


def source_stack(labels_zyx: np.ndarray, geometry: Geometry, datasets: Sequence[pydicom.Dataset]) -> SourceStack:
    """Place every source image on the grid and read its frame."""
    ordered, placements = _placed(geometry, datasets)
    slice_axis = placements[0].slice_axis
    frames = np.stack([placement.frame(labels_zyx, int(dataset.Rows), int(dataset.Columns))
                       for dataset, placement in zip(ordered, placements)])
    return SourceStack(ordered, frames, float(geometry.spacing[::-1][slice_axis]))


# ---------------------------------------------------------------------------------------------- writing
def _segment_numbers(labels_zyx: np.ndarray, label_names: Mapping[str, int]) -> tuple[list[str], np.ndarray]:
    """The foreground label names in segment order (by label value) and a table from label value to segment
    number (1, 2, ...; 0 for background)."""
    foreground = sorted(((value, name) for name, value in label_names.items() if value != 0))
    present = np.flatnonzero(np.bincount(labels_zyx.ravel().astype(np.int64)))
    undeclared = sorted(set(int(value) for value in present) - {value for value, _ in foreground} - {0})
    if undeclared:
        raise CovnetError(None, f"the label map holds values {undeclared} that the label names "
                                f"{dict(label_names)} do not declare")
    table = np.zeros(max([value for value, _ in foreground] + [int(present.max())]) + 1, np.uint8)
    for number, (value, _) in enumerate(foreground, start=1):
        table[value] = number
    return [name for _, name in foreground], table


def _segment_description(number: int, name: str, algorithm: hd.AlgorithmIdentificationSequence
                         ) -> hd.seg.SegmentDescription:
    concept = segment_concept(name)
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=concept.label, segmented_property_category=concept.category,
        segmented_property_type=concept.type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=None if concept.anatomic_region is None else [concept.anatomic_region])


def write_dicom_seg(labels_zyx: np.ndarray, geometry: Geometry, source: str | os.PathLike | Sequence[pydicom.Dataset],
                    output_path: str | os.PathLike, label_names: Mapping[str, int], *, model_id: str) -> Path:
    """Write ``labels_zyx`` (on ``geometry``, the grid the series was read onto) as a DICOM-SEG of ``source`` (the
    series folder, or its slices' headers) to ``output_path``, atomically; return the path.

    ``label_names`` maps each label name to its value (background 0); ``model_id`` identifies the model that
    made the labels (written as an algorithm parameter and the device serial number)."""
    labels_zyx = np.asarray(labels_zyx)
    if labels_zyx.shape != tuple(geometry.shape):
        raise ValueError(f"label map of shape {labels_zyx.shape} on a grid of shape {geometry.shape}")
    datasets = read_source_series(source) if isinstance(source, (str, os.PathLike)) else list(source)
    names, segment_of_label = _segment_numbers(labels_zyx, label_names)
    stack = source_stack(labels_zyx, geometry, datasets)
    algorithm = hd.AlgorithmIdentificationSequence(name="covnet", family=codes.cid7162.ArtificialIntelligence,
                                                   version=__version__, parameters={"model": model_id})
    first = stack.datasets[0]
    try:
        seg = hd.seg.Segmentation(
            source_images=stack.datasets, pixel_array=segment_of_label[stack.frames],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_segment_description(number, name, algorithm)
                                  for number, name in enumerate(names, start=1)],
            series_instance_uid=hd.UID(), series_number=int(first.get("SeriesNumber") or 0) + 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="covnet", manufacturer_model_name="covnet",
            software_versions=__version__, device_serial_number=model_id[:64], content_label=SEG_CONTENT_LABEL,
            content_description=SEG_SERIES_DESCRIPTION, series_description=SEG_SERIES_DESCRIPTION)
    except (ValueError, TypeError, AttributeError) as error:
        raise CovnetError(_source_name(first), f"cannot be referenced by a DICOM-SEG ({error})") from None
    # The spacing between slices is the grid's: highdicom copies a source header's value when there is one, and
    # scanners and writers fill that wrongly at times; segment volumes read back from the SEG then match the label
    # map's.
    seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices = \
        format_number_as_ds(stack.slice_spacing_mm)
    output_path = Path(output_path)
    with atomic_path(output_path) as temporary:
        seg.save_as(temporary)
    return output_path


# ---------------------------------------------------------------------------------------------- reading back
def _label_name(segment_label: str) -> str:
    return next((name for name, concept in SEGMENT_CONCEPTS.items() if concept.label == segment_label),
                segment_label)


def read_segment_masks(seg_path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Per label name (decoded from the segment labels), the mask of each source image it covers:
    ``{label_name: {referenced SOP instance UID: (rows, columns) bool mask}}``."""
    seg_path = Path(seg_path)
    try:
        seg = pydicom.dcmread(seg_path)
        pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    except (InvalidDicomError, OSError, ValueError, AttributeError, EOFError) as error:
        raise CovnetError(seg_path, f"is not a readable DICOM-SEG ({error})") from None
    names = {int(item.SegmentNumber): _label_name(str(item.SegmentLabel)) for item in seg.SegmentSequence}
    masks: dict[str, dict[str, np.ndarray]] = {name: {} for name in names.values()}
    for frame, groups in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        number = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        masks[names[number]][uid] = frame.astype(bool)
    return masks


def segment_volumes_ml(seg_path: str | os.PathLike) -> dict[str, float]:
    """The volume of each segment (mL) by label name: its pixels times the SEG's pixel spacing and spacing between
    slices (the source series' own)."""
    seg_path = Path(seg_path)
    measures = pydicom.dcmread(seg_path, stop_before_pixels=True).SharedFunctionalGroupsSequence[0] \
        .PixelMeasuresSequence[0]
    if "SpacingBetweenSlices" not in measures:
        raise CovnetError(seg_path, "has no spacing between slices (its source slices are not evenly spaced)")
    voxel_ml = float(np.prod([float(value) for value in measures.PixelSpacing])) * \
        float(measures.SpacingBetweenSlices) / 1000.0
    return {name: sum(int(mask.sum()) for mask in frames.values()) * voxel_ml
            for name, frames in read_segment_masks(seg_path).items()}
