"""Add a folder of unlabelled CTs (files or DICOM series folders, at any depth) to ``raw/imagesUnlabelled``.

Each CT is read, checked (3D, finite) and written as int16 HU ``CASE_0000<file_ending>``, with the ending that
``raw/dataset.json`` declares (``.nii.gz`` while there is none), since preprocessing looks for that one. Which
source became which case is kept in ``raw/unlabelled_sources.json`` so that a rerun skips what is already there,
and a second source folder whose names collide with the first gets fresh case ids instead of being skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from covnet.dataset import find_cases, image_path
from covnet.image.discovery import find_ct_sources, next_free_case_id, propose_case_ids
from covnet.image.io import IMAGE_SUFFIXES, read_image, write_image
from covnet.importers.hu import to_hu_int16
from covnet.runtime.atomic import read_json, write_json
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.workspace import Workspace

log = logger(__name__)

SOURCES_FILE = "unlabelled_sources.json"
DEFAULT_FILE_ENDING = ".nii.gz"


@dataclass
class ImportSummary:
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


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
            case = next_free_case_id(case, taken)  # the proposed id belongs to a different source
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
