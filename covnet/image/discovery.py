"""Finding CTs in a folder tree (image files and DICOM series folders, at any depth) and naming them as cases.

The unlabelled-pool importer and ``covnet_predict`` both use it, so a folder means the same cases to both.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from covnet.image.io import is_dicom_series_dir, is_image_file, strip_image_suffix
from covnet.runtime.errors import CovnetError

SKIPPED_FOLDERS = {"__MACOSX"}


def sanitize_case_id(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")
    return cleaned or "case"


def find_ct_sources(source_dir: Path) -> list[Path]:
    """Image files and DICOM series folders under ``source_dir``, sorted."""
    sources, visited = [], set()
    # Symbolic links are followed (a linked DICOM folder is a case too), each real folder once (no loops).
    for folder, subfolders, files in os.walk(source_dir, followlinks=True):
        folder = Path(folder)
        real = folder.resolve()
        if real in visited:
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS)
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
        proposed[source] = next_free_case_id(proposed[source], used)
        used.add(proposed[source])
    return proposed


def next_free_case_id(case: str, taken: set[str]) -> str:
    candidate, number = case, 2
    while candidate in taken:
        candidate, number = f"{case}_{number}", number + 1
    return candidate
