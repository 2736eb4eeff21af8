"""Convert the public COVID-19-CT-Seg release (Ma et al., Zenodo record 3757476) into ``<workspace>/raw``.

The release ships images in ``COVID-19-CT-Seg_20cases`` and labels (0 background, 1 left lung, 2 right lung,
3 infection) in ``Lung_and_Infection_Mask``, each as a folder or a zip. Images and masks are named differently
(``coronacases_org_001`` ↔ ``coronacases_001``, ``radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm`` ↔
``radiopaedia_10_85902_1``), so they are paired by source and numeric ids. The ten Radiopaedia images are
stored windowed to [-1250, 250] HU and rescaled to 0–255; they are brought back to HU.

All cases are converted into a hidden staging folder first and moved into ``imagesTr``/``labelsTr`` only when
every one of them passed, so a failed import leaves no partial dataset behind.
"""
from __future__ import annotations

import os
import re
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covnet.dataset import (
    DatasetDescription,
    check_label_values,
    check_same_grid,
    covid_description,
    image_path,
    label_path,
)
from covnet.image.io import read_image, strip_image_suffix, write_image
from covnet.importers import warn
from covnet.importers.hu import to_hu_int16
from covnet.runtime.atomic import temporary_folder, write_text
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.workspace import Workspace

log = logger(__name__)

IMAGES_PART = "COVID-19-CT-Seg_20cases"
LABELS_PART = "Lung_and_Infection_Mask"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
RADIOPAEDIA_WINDOW_HU = (-1250.0, 250.0)
STORED_GREY_LEVELS = 255.0
RELEASE_CASE_COUNT = 20
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# ---------------------------------------------------------------------------------------------------- names

def case_key(file_name: str) -> tuple[str, tuple[int, ...]] | None:
    """``("coronacases", (1,))`` for both ``coronacases_org_001.nii.gz`` and ``coronacases_001.nii``."""
    stem = strip_image_suffix(Path(file_name).name).lower()
    source = next((s for s in ("coronacases", "radiopaedia") if stem.startswith(s)), None)
    # "covid-19" in the Radiopaedia image names is a word, not an id
    numbers = tuple(int(n) for n in re.findall(r"\d+", stem.replace("covid-19", "")))
    return (source, numbers) if source and numbers else None


def is_radiopaedia(case: str) -> bool:
    key = case_key(case)
    return key is not None and key[0] == "radiopaedia"


def patient_groups(cases: list[str]) -> dict[str, str]:
    """Case → patient. Radiopaedia scans of one Radiopaedia case (``radiopaedia_<case>_<study>_<series>``) share
    a patient: 10_85902_1 and 10_85902_3 are two series of one study, and 29_86490_1 and 29_86491_1 are two
    studies of case 29, most likely the same patient too; grouping them keeps a patient out of both sides of
    a cross-validation split."""
    study_of = {}
    for case in cases:
        key = case_key(case)
        study_of[case] = f"radiopaedia_{key[1][0]}" if key and key[0] == "radiopaedia" \
            and len(key[1]) == 3 else case
    shared = {study for study, count in Counter(study_of.values()).items() if count > 1}
    return {case: study if study in shared else case for case, study in sorted(study_of.items())}


@dataclass(frozen=True)
class CasePair:
    case: str
    image_name: str
    mask_name: str


def _keyed(names: list[str], where: Path, kind: str) -> dict[tuple, str]:
    keyed: dict[tuple, str] = {}
    for name in sorted(names):
        key = case_key(name)
        if key is None:
            raise CovnetError(where / name, f"{kind} is not named like a COVID-19-CT-Seg case "
                                            "(coronacases_… or radiopaedia_…)")
        if key in keyed:
            raise CovnetError(where / name, f"{kind} is the same case as {keyed[key]}")
        keyed[key] = name
    return keyed


def pair_cases(image_names: list[str], mask_names: list[str], images_where: Path, masks_where: Path) -> list[CasePair]:
    """Match every image to exactly one mask; any file left over is an error naming it."""
    images = _keyed(image_names, images_where, "image")
    masks = _keyed(mask_names, masks_where, "mask")
    for key, name in images.items():
        if key not in masks:
            raise CovnetError(images_where / name, f"image has no mask in {masks_where} "
                                                   f"({len(set(images) - set(masks))} unmatched image(s) in all)")
    for key, name in masks.items():
        if key not in images:
            raise CovnetError(masks_where / name, f"mask has no image in {images_where} "
                                                  f"({len(set(masks) - set(images))} unmatched mask(s) in all)")
    pairs = []
    for key, mask_name in masks.items():
        case = strip_image_suffix(mask_name)
        if not CASE_ID_PATTERN.match(case):
            raise CovnetError(masks_where / mask_name, "mask name is not usable as a case id")
        pairs.append(CasePair(case, images[key], mask_name))
    return sorted(pairs, key=lambda pair: pair.case)


# ---------------------------------------------------------------------------------------------------- sources

def _is_release_file(relative: str) -> bool:
    parts = Path(relative).parts
    return (bool(parts) and relative.lower().endswith(NIFTI_SUFFIXES) and not parts[-1].startswith(".")
            and "__MACOSX" not in parts)


class ReleasePart:
    """One part of the release (images or masks), as an extracted folder or as a zip, files at any depth."""

    def __init__(self, location: Path):
        self.location = location
        self.is_zip = location.is_file()
        if self.is_zip:
            try:
                with zipfile.ZipFile(location) as archive:
                    relatives = [name for name in archive.namelist() if not name.endswith("/")]
            except (zipfile.BadZipFile, OSError) as error:
                raise CovnetError(location, f"is not a readable zip file ({error}); an incomplete download?") from None
        else:
            relatives = [p.relative_to(location).as_posix() for p in location.rglob("*") if p.is_file()]
        self.members: dict[str, str] = {}
        for relative in sorted(r for r in relatives if _is_release_file(r)):
            name = Path(relative).name
            if name in self.members:
                raise CovnetError(location / relative, f"file name also used by {location / self.members[name]}")
            self.members[name] = relative

    def display_path(self, name: str) -> Path:
        return self.location / self.members[name]

    def local_file(self, name: str, scratch: Path) -> Path:
        """A readable path for ``name``: the file itself, or the zip member extracted into ``scratch``."""
        if not self.is_zip:
            return self.location / self.members[name]
        target = scratch / name
        with zipfile.ZipFile(self.location) as archive, archive.open(self.members[name]) as source, \
                open(target, "wb") as stream:
            shutil.copyfileobj(source, stream, 1 << 20)
        return target


def locate_part(source_dir: Path, part: str) -> ReleasePart:
    folder, archive = source_dir / part, source_dir / f"{part}.zip"
    if folder.is_dir():
        found = ReleasePart(folder)
    elif archive.is_file():
        found = ReleasePart(archive)
    else:
        raise CovnetError(source_dir, f"has neither {part}/ nor {part}.zip (use --download to fetch the release)")
    if not found.members:
        raise CovnetError(found.location, "holds no .nii or .nii.gz files")
    return found


# ---------------------------------------------------------------------------------------------------- intensities

def windowed_to_hu(values: np.ndarray) -> np.ndarray:
    """Undo the Radiopaedia storage: grey level 0–255 → HU in [-1250, 250]."""
    low, high = RADIOPAEDIA_WINDOW_HU
    return values.astype(np.float64) / STORED_GREY_LEVELS * (high - low) + low


def image_to_hu(image: np.ndarray, case: str, source: Path) -> np.ndarray:
    if not is_radiopaedia(case):
        return to_hu_int16(image, source)
    low, high = float(image.min()), float(image.max())
    if 0.0 <= low and high <= STORED_GREY_LEVELS:
        return to_hu_int16(windowed_to_hu(image), source, check_range=False)
    warn(f"{source}: Radiopaedia image spans [{low:g}, {high:g}], not 0–255; taken as already in HU")
    return to_hu_int16(image, source, check_range=False)


def mask_to_labels(mask: np.ndarray, source: Path) -> np.ndarray:
    if mask.dtype.kind == "f":
        rounded = np.rint(mask)
        if not np.array_equal(mask, rounded):
            raise CovnetError(source, "mask holds non-integer values; expected 0, 1, 2, 3")
        mask = rounded
    low, high = mask.min(), mask.max()
    if low < 0 or high > np.iinfo(np.uint8).max:
        raise CovnetError(source, f"mask values span [{low:g}, {high:g}]; expected 0, 1, 2, 3")
    return mask.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- import

def _install_marker(workspace: Workspace) -> Path:
    """Present only while staged folders are being swapped in: a rerun may then replace them."""
    return workspace.raw / ".covid19ctseg-install-in-progress"


def _refuse_existing(workspace: Workspace, overwrite: bool) -> None:
    if overwrite or _install_marker(workspace).exists():
        return
    if workspace.dataset_json.exists():
        raise CovnetError(workspace.dataset_json, "already exists; pass --overwrite to replace the labelled data")
    for folder in (workspace.images_tr, workspace.labels_tr):
        if folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir()):
            raise CovnetError(folder, "already holds files; pass --overwrite to replace the labelled data")


def _read(part: ReleasePart, name: str, scratch: Path):
    try:
        return read_image(part.local_file(name, scratch))
    except CovnetError as error:  # name the file in the release, not its extracted copy
        raise CovnetError(part.display_path(name), error.problem) from None
    finally:
        for extracted in scratch.iterdir():
            extracted.unlink()


def _convert_case(pair: CasePair, images: ReleasePart, masks: ReleasePart, description: DatasetDescription,
                  staging: Path, scratch: Path) -> None:
    image_source, mask_source = images.display_path(pair.image_name), masks.display_path(pair.mask_name)
    image, image_geometry = _read(images, pair.image_name, scratch)
    mask, mask_geometry = _read(masks, pair.mask_name, scratch)
    check_same_grid(image_geometry, mask_geometry, mask_source)
    labels = mask_to_labels(mask, mask_source)
    check_label_values(labels, description, mask_source)
    write_image(image_to_hu(image, pair.case, image_source), image_geometry,
                image_path(staging / "imagesTr", pair.case, description.file_ending))
    # the label takes the image's exact grid (they were checked to agree within tolerance)
    write_image(labels, image_geometry, label_path(staging / "labelsTr", pair.case, description.file_ending))


def _install(staging: Path, workspace: Workspace) -> None:
    """Swap the staged folders in; replaced ones go into staging, which is deleted afterwards."""
    write_text(_install_marker(workspace), f"{os.getpid()}\n")
    if workspace.dataset_json.exists():
        workspace.dataset_json.unlink()  # no description of the old cases may outlive them
    for folder in (workspace.images_tr, workspace.labels_tr):
        if folder.exists():
            os.replace(folder, staging / f"replaced-{folder.name}")
        os.replace(staging / folder.name, folder)


def describe(cases: list[str]) -> DatasetDescription:
    return covid_description("COVID-19-CT-Seg", len(cases), patient_groups(cases))


def import_covid19ctseg(source_dir: str | os.PathLike, workspace: Workspace, overwrite: bool = False) -> list[str]:
    """Convert the release in ``source_dir`` into ``workspace.raw``; return the case ids."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise CovnetError(source_dir, "is not a folder")
    _refuse_existing(workspace, overwrite)
    images, masks = locate_part(source_dir, IMAGES_PART), locate_part(source_dir, LABELS_PART)
    pairs = pair_cases(list(images.members), list(masks.members), images.location, masks.location)
    if len(pairs) != RELEASE_CASE_COUNT:
        warn(f"{source_dir}: found {len(pairs)} cases; the public release has {RELEASE_CASE_COUNT}")
    description = describe([pair.case for pair in pairs])
    workspace.raw.mkdir(parents=True, exist_ok=True)
    staging = temporary_folder(workspace.raw, "covid19ctseg-staging")
    try:
        scratch = staging / "extracted"
        scratch.mkdir()
        for number, pair in enumerate(pairs, start=1):
            _convert_case(pair, images, masks, description, staging, scratch)
            log.info(f"[{number}/{len(pairs)}] {pair.case}")
        _install(staging, workspace)
        description.save(workspace.dataset_json)
        _install_marker(workspace).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(f"imported {len(pairs)} labelled cases into {workspace.raw}")
    return [pair.case for pair in pairs]
