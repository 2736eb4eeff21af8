"""Add a folder of unlabelled CTs (files or DICOM series folders, at any depth) to ``raw/imagesUnlabelled``.

Each CT is read, checked (3D, finite) and written as int16 HU ``CASE_0000<file_ending>``, with the ending that
``raw/dataset.json`` declares (``.nii.gz`` while there is none), since preprocessing looks for that one. Which
source became which case is kept in ``raw/unlabelled_sources.json`` so that a rerun skips what is already there,
and a second source folder whose names collide with the first gets fresh case ids instead of being skipped.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from covnet.atomic import read_json, write_json
from covnet.dataset import find_cases, image_path
from covnet.errors import CovnetError
from covnet.importers.hu import to_hu_int16
from covnet.io import (IMAGE_SUFFIXES, is_dicom_series_dir, is_image_file, read_image, strip_image_suffix,
                       write_image)
from covnet.log import logger
from covnet.workspace import Workspace

log = logger(__name__)

SOURCES_FILE = "unlabelled_sources.json"
DEFAULT_FILE_ENDING = ".nii.gz"
SKIPPED_FOLDERS = {"__MACOSX"}


@dataclass
class ImportSummary:
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def sanitize_case_id(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")
    return cleaned or "case"


def find_ct_sources(source_dir: Path) -> list[Path]:
    """Image files and DICOM series folders under ``source_dir``, sorted."""
    sources = []
    for folder, subfolders, files in os.walk(source_dir):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS)
        folder = Path(folder)
        others = []
        for path in (folder / name for name in sorted(files) if not name.startswith(".")):
            (sources if is_image_file(path) else others).append(path)
        if others and is_dicom_series_dir(folder):
            sources.append(folder)
        elif any(path.suffix.lower() == ".dcm" for path in others):
            raise CovnetError(folder, "holds .dcm files but no readable DICOM series")
    return sorted(sources)


def _base_id(source: Path, source_dir: Path) -> str:
    name = source_dir.resolve().name if source == source_dir else source.name
    return sanitize_case_id(strip_image_suffix(name) if source.is_file() else name)


def _path_id(source: Path, source_dir: Path) -> str:
    relative = source.relative_to(source_dir)
    parts = list(relative.parts[:-1]) + [strip_image_suffix(relative.name) if source.is_file() else relative.name]
    return sanitize_case_id("_".join(parts) or source_dir.resolve().name)


def propose_case_ids(sources: list[Path], source_dir: Path) -> dict[Path, str]:
    """File stem / folder name; where two collide, their relative paths; a number where even those collide."""
    by_base: dict[str, list[Path]] = defaultdict(list)
    for source in sources:
        by_base[_base_id(source, source_dir)].append(source)
    proposed = {}
    for base, group in by_base.items():
        for source in group:
            proposed[source] = base if len(group) == 1 else _path_id(source, source_dir)
    used: set[str] = set()
    for source in sorted(proposed):
        proposed[source] = _next_free(proposed[source], used)
        used.add(proposed[source])
    return proposed


def _next_free(case: str, taken: set[str]) -> str:
    candidate, number = case, 2
    while candidate in taken:
        candidate, number = f"{case}_{number}", number + 1
    return candidate


def _load_sources(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    data = read_json(path, "")
    if not isinstance(data, dict):
        raise CovnetError(path, "must map case ids to source paths")
    return {str(case): str(source) for case, source in data.items()}


def pool_file_ending(workspace: Workspace) -> str:
    """The ``file_ending`` of ``raw/dataset.json``, or ``.nii.gz`` while there is none.

    Only that one entry is read: the unlabelled pool may be imported before the labelled data is complete.
    """
    path = workspace.dataset_json
    if not path.is_file():
        return DEFAULT_FILE_ENDING
    data = read_json(path, "")
    if not isinstance(data, dict):
        raise CovnetError(path, "must be a JSON object")
    ending = data.get("file_ending", DEFAULT_FILE_ENDING)
    if not isinstance(ending, str) or ending.lower() not in IMAGE_SUFFIXES:
        raise CovnetError(path, f"file_ending {ending!r} is not one of {', '.join(IMAGE_SUFFIXES)}")
    return ending


def import_unlabelled(source_dir: str | os.PathLike, workspace: Workspace) -> ImportSummary:
    """Convert every CT under ``source_dir`` not imported before; ``dataset.json`` is left alone."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise CovnetError(source_dir, "is not a folder")
    sources = find_ct_sources(source_dir)
    if not sources:
        raise CovnetError(source_dir, "holds no CT images (NIfTI/MHA/NRRD files or DICOM series folders)")
    target_dir, sources_file = workspace.images_unlabelled, workspace.raw / SOURCES_FILE
    recorded = _load_sources(sources_file)
    file_ending = pool_file_ending(workspace)
    case_of_source = {source: case for case, source in recorded.items()}
    taken = set(find_cases(target_dir, file_ending)) | set(recorded)
    summary = ImportSummary()
    for source, proposed in propose_case_ids(sources, source_dir).items():
        key = str(source.resolve())
        case = case_of_source.get(key, proposed)
        target = image_path(target_dir, case, file_ending)
        if target.is_file() and (key in case_of_source or case not in recorded):
            # imported before (an image without a record is one whose record write was interrupted)
            summary.skipped.append(case)
            if case not in recorded:
                recorded[case] = key
                write_json(sources_file, recorded)
            continue
        if key not in case_of_source:
            case = _next_free(case, taken)  # the proposed id belongs to a different source
        image, geometry = read_image(source)
        write_image(to_hu_int16(image, source), geometry, image_path(target_dir, case, file_ending))
        recorded[case], case_of_source[key] = key, case
        taken.add(case)
        write_json(sources_file, recorded)
        summary.added.append(case)
        log.info(f"added {case} from {source}")
    log.info(f"{len(summary.added)} CT(s) added, {len(summary.skipped)} already imported and skipped "
          f"({target_dir})")
    return summary
