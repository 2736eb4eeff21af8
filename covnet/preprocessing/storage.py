"""Preprocessed cases on disk: ``<case>.npy`` (image, C×z×y×x float32), ``<case>_seg.npy`` (uint8) and
``<case>.json`` (properties + the plan key they were made under).

Plain ``.npy`` opened with ``mmap_mode="r"``: a training loader reads one random patch without loading
the case (see BENCHMARKS.md, "Preprocessed storage", for the measured comparison with blosc2 chunks).
The JSON is removed first and written last, after both arrays are complete, so a case without its JSON is
unfinished; one whose JSON records another plan key or other raw files (``source``) is stale, and one whose
arrays are shorter than their headers declare, or disagree with each other or with the JSON, is damaged. All
three get redone. Loading checks the same (from the headers and file sizes, without reading the arrays), so
that a damaged case is a one-line error naming the file instead of a traceback from numpy.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from covnet.preprocessing.case import PREPROCESSING_VERSION, CaseProperties
from covnet.runtime.atomic import atomic_path, not_empty, read_json, write_json
from covnet.runtime.errors import CovnetError

# What a case's JSON records about how it was made: another value for any of them makes the case stale.
STAMP_KEYS = ("plan_key", "source", "preprocessing_version")


def image_file(folder: Path, case: str) -> Path:
    return folder / f"{case}.npy"


def segmentation_file(folder: Path, case: str) -> Path:
    return folder / f"{case}_seg.npy"


def properties_file(folder: Path, case: str) -> Path:
    return folder / f"{case}.json"


REDO_HINT = "re-run covnet_plan_and_preprocess to redo it"


def array_shape(path: Path) -> tuple[int, ...]:
    """Shape of a ``.npy`` file from its header, after checking that the file holds every byte the header
    declares (cheap: the data is not read); ``CovnetError`` naming the file otherwise."""
    problem = _npy_problem(path)
    if problem:
        raise CovnetError(path, f"{problem}; {REDO_HINT}")
    return _npy_header(path)[0]


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset from the header; ValueError when there is no readable header."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
        return tuple(int(size) for size in shape), dtype, handle.tell()


def _npy_problem(path: Path) -> str | None:
    if not path.is_file():
        return "is missing"
    try:
        shape, dtype, offset = _npy_header(path)
    except (ValueError, EOFError, OSError) as error:
        return f"is not a readable .npy array ({error})"
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    return None if size == expected else f"is truncated: {size} bytes where its header declares {expected}"


def save_array(path: Path, array: np.ndarray) -> None:
    """Write a ``.npy`` atomically, verified against its header before the rename (a full disk is an error)."""
    def verify(temporary: Path) -> str | None:
        return not_empty(temporary) or _npy_problem(temporary)

    with atomic_path(path, verify=verify) as temporary:
        with open(temporary, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array))


def _stamp(plan_key: dict, source: list) -> dict:
    # Through JSON once, so that tuples and lists compare equal with what is read back.
    return json.loads(json.dumps({"plan_key": plan_key, "source": source,
                                  "preprocessing_version": PREPROCESSING_VERSION}))


def save_case(folder: Path, image: np.ndarray, segmentation: np.ndarray | None, properties: CaseProperties,
              plan_key: dict, source: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    properties_file(folder, properties.case).unlink(missing_ok=True)
    save_array(image_file(folder, properties.case), image)
    if segmentation is not None:
        save_array(segmentation_file(folder, properties.case), segmentation)
    write_json(properties_file(folder, properties.case), {**_stamp(plan_key, source), **properties.to_json()},
               indent=None)


def check_case_arrays(folder: Path, case: str, *, labelled: bool,
                      spatial_shape: list[int] | None = None) -> None:
    """The case's arrays are whole (file sizes against their headers), the segmentation (required when
    ``labelled``, checked when present) has the image's spatial shape, and both have ``spatial_shape`` when
    given (the properties' ``shape_after_resampling``); ``CovnetError`` naming the first bad file otherwise."""
    image_path, segmentation_path = image_file(folder, case), segmentation_file(folder, case)
    image_shape = array_shape(image_path)
    if len(image_shape) != 4:
        raise CovnetError(image_path, f"has shape {list(image_shape)}, not (channels, z, y, x); {REDO_HINT}")
    if spatial_shape is not None and list(image_shape[1:]) != [int(size) for size in spatial_shape]:
        raise CovnetError(image_path, f"has shape {list(image_shape)} where its properties record "
                                      f"{[int(size) for size in spatial_shape]} voxels; {REDO_HINT}")
    if labelled or segmentation_path.exists():
        segmentation_shape = array_shape(segmentation_path)
        if segmentation_shape != image_shape[1:]:
            raise CovnetError(segmentation_path, f"has shape {list(segmentation_shape)} where its image has "
                                                 f"{list(image_shape[1:])}; {REDO_HINT}")


def is_case_done(folder: Path, case: str, plan_key: dict, source: list, labelled: bool) -> bool:
    """Finished under this plan and these raw files, and its arrays whole (see ``check_case_arrays``)."""
    path = properties_file(folder, case)
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())
        if {key: stored.get(key) for key in STAMP_KEYS} != _stamp(plan_key, source):
            return False
        check_case_arrays(folder, case, labelled=labelled, spatial_shape=stored["shape_after_resampling"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, CovnetError):
        return False
    return True


def load_properties(folder: Path, case: str) -> CaseProperties:
    data = read_json(properties_file(folder, case), REDO_HINT)
    for key in STAMP_KEYS:
        data.pop(key, None)
    return CaseProperties.from_json(data)


def load_case(folder: Path, case: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Image and segmentation memory-mapped (read-only) unless ``mmap=False``; segmentation None if absent. A
    missing, truncated or inconsistent array is a one-line ``CovnetError`` naming it."""
    properties = load_properties(folder, case)
    check_case_arrays(folder, case, labelled=False, spatial_shape=properties.shape_after_resampling)
    mode = "r" if mmap else None
    image = np.load(image_file(folder, case), mmap_mode=mode)
    seg_path = segmentation_file(folder, case)
    segmentation = np.load(seg_path, mmap_mode=mode) if seg_path.is_file() else None
    return image, segmentation, properties

