"""Preprocessed cases on disk: ``<case>.npy`` (image, C×z×y×x float32), ``<case>_seg.npy`` (uint8) and
``<case>.json`` (properties + the plan key they were made under).

Plain ``.npy`` opened with ``mmap_mode="r"``: a training loader reads one random patch without loading
the case (see BENCHMARKS.md, "Preprocessed storage", for the measured comparison with blosc2 chunks).
The JSON is removed first and written last, after both arrays are complete, so a case without its JSON is
unfinished; one whose JSON records another plan key or other raw files (``source``) is stale. Both get redone.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from covnet.preprocessing.case import PREPROCESSING_VERSION, CaseProperties
from covnet.runtime.atomic import atomic_path, write_json

# What a case's JSON records about how it was made: another value for any of them makes the case stale.
STAMP_KEYS = ("plan_key", "source", "preprocessing_version")


def image_file(folder: Path, case: str) -> Path:
    return folder / f"{case}.npy"


def segmentation_file(folder: Path, case: str) -> Path:
    return folder / f"{case}_seg.npy"


def properties_file(folder: Path, case: str) -> Path:
    return folder / f"{case}.json"


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as temporary:
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


def is_case_done(folder: Path, case: str, plan_key: dict, source: list, labelled: bool) -> bool:
    path = properties_file(folder, case)
    if not path.is_file() or not image_file(folder, case).is_file():
        return False
    if labelled and not segmentation_file(folder, case).is_file():
        return False
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return {key: stored.get(key) for key in STAMP_KEYS} == _stamp(plan_key, source)


def load_properties(folder: Path, case: str) -> CaseProperties:
    data = json.loads(properties_file(folder, case).read_text())
    for key in STAMP_KEYS:
        data.pop(key, None)
    return CaseProperties.from_json(data)


def load_case(folder: Path, case: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Image and segmentation memory-mapped (read-only) unless ``mmap=False``; segmentation None if absent."""
    mode = "r" if mmap else None
    image = np.load(image_file(folder, case), mmap_mode=mode)
    seg_path = segmentation_file(folder, case)
    segmentation = np.load(seg_path, mmap_mode=mode) if seg_path.is_file() else None
    return image, segmentation, load_properties(folder, case)

