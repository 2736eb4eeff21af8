"""Finding CTs in a folder tree (image files and DICOM series folders, at any depth) and naming them as cases.

The unlabelled-pool importer and ``covnet_predict`` both use it, so a folder means the same cases to both.
"""
from __future__ import annotations

import os
import re
import unicodedata
from collections import defaultdict
from pathlib import Path

from covnet.image.io import is_dicom_series_dir, is_image_file, strip_image_suffix
from covnet.runtime.errors import CovnetError

SKIPPED_FOLDERS = {"__MACOSX"}
# Latin letters that Unicode does not decompose into an ASCII letter and an accent.
_LATIN_LETTERS = {"ß": "ss", "Æ": "AE", "æ": "ae", "Ø": "O", "ø": "o", "Œ": "OE", "œ": "oe", "Ł": "L", "ł": "l",
                  "Đ": "D", "đ": "d", "Þ": "Th", "þ": "th", "ı": "i"}


def _case_id_character(char: str) -> str:
    """One character of a name as it stands in a case id: an ASCII letter, digit, ``_`` or ``-`` as it is; a Latin
    letter as its ASCII letter(s) (NFKD without the accents: ü → u, é → e, ﬁ → fi; ß → ss, ø → o); a letter or
    digit of another script (Cyrillic, Han, ...) as it is; anything else (spaces, punctuation, path characters) as
    ``\0``, a gap."""
    if char.isascii():
        return char if char.isalnum() or char in "_-" else "\0"
    if char in _LATIN_LETTERS:
        return _LATIN_LETTERS[char]
    base = "".join(part for part in unicodedata.normalize("NFKD", char) if not unicodedata.combining(part))
    if base and all(part.isascii() and (part.isalnum() or part in "_-") for part in base):
        return base
    return char if char.isalnum() else "\0"


def sanitize_case_id(text: str) -> str:
    """A case id (also a file name) from a file or folder name: Latin letters become ASCII, their accents dropped
    (``Müller`` → ``Muller``, so that ``Müller`` and ``Mäller`` stay two cases), letters of other scripts stay as
    they are; each run of other characters becomes one ``_``; ``case`` when nothing is left."""
    mapped = "".join(_case_id_character(char) for char in unicodedata.normalize("NFC", text))
    cleaned = re.sub("\0+", "_", mapped).strip("_-")
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


def _stem(name: str, is_file: bool, strip_suffix: str) -> str:
    stem = strip_image_suffix(name) if is_file else name
    if is_file and strip_suffix and stem.endswith(strip_suffix) and len(stem) > len(strip_suffix):
        stem = stem[: -len(strip_suffix)]
    return stem


def _base_id(source: Path, source_dir: Path, strip_suffix: str) -> str:
    name = source_dir.resolve().name if source == source_dir else source.name
    return sanitize_case_id(_stem(name, source.is_file(), strip_suffix))


def _path_id(source: Path, source_dir: Path, strip_suffix: str) -> str:
    relative = source.relative_to(source_dir)
    parts = list(relative.parts[:-1]) + [_stem(relative.name, source.is_file(), strip_suffix)]
    return sanitize_case_id("_".join(parts) or source_dir.resolve().name)


def group_by_base_id(sources: list[Path], source_dir: Path, *, strip_suffix: str = "") -> dict[str, list[Path]]:
    """The sources under their plain case id: the file name without its image suffix (and without
    ``strip_suffix``, e.g. nnU-Net's ``_0000``), or the folder name."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for source in sources:
        groups[_base_id(source, source_dir, strip_suffix)].append(source)
    return dict(groups)


def propose_case_ids(sources: list[Path], source_dir: Path, *, strip_suffix: str = "") -> dict[Path, str]:
    """One case id per source: its plain id (``group_by_base_id``); where two share it, their paths relative to
    ``source_dir`` (``a/scan.nii.gz`` and ``b/scan.nii`` become ``a_scan`` and ``b_scan``).

    Two sources that still get one id are two inputs for one case (``scan.nii`` and ``scan.nii.gz``, or
    ``scan_0000.nii.gz`` and ``scan.nii.gz`` when ``strip_suffix`` is ``_0000``): an error naming both, never a
    silent rename, since which file a case's results belong to would otherwise depend on the order of a listing."""
    proposed = {}
    for base, group in group_by_base_id(sources, source_dir, strip_suffix=strip_suffix).items():
        for source in group:
            proposed[source] = base if len(group) == 1 else _path_id(source, source_dir, strip_suffix)
    owner: dict[str, Path] = {}
    for source in sorted(proposed):
        case = proposed[source]
        if case in owner:
            raise CovnetError(owner[case], f"and {source} would both be case {case!r}: two inputs for one case; "
                                           f"rename or remove one of them")
        owner[case] = source
    return proposed


def next_free_case_id(case: str, taken: set[str]) -> str:
    candidate, number = case, 2
    while candidate in taken:
        candidate, number = f"{case}_{number}", number + 1
    return candidate
