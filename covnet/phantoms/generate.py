"""Synthetic chest-CT phantoms with lung and COVID-19 infection labels, written in the raw dataset format.

A case is a random patient (``phantom_anatomy.draw_anatomy``) scanned once: a spacing, a field of view, an
origin, an infection burden and a noise level. Arrays are int16 HU and uint8 labels (0 background,
1 left lung, 2 right lung, 3 infection), axis order (z, y, x), identity direction (LPS).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from covnet.dataset import DatasetDescription, covid_description, image_path, label_path
from covnet.image.io import Geometry, write_image
from covnet.phantoms.acquisition import DEFAULT_PROFILE, AcquisitionProfile
from covnet.phantoms.anatomy import (
    Anatomy,
    Block,
    SmoothField,
    body_and_bone_hu,
    draw_anatomy,
    lung_labels,
    vessel_weight,
)
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.workspace import Workspace

SIZES = ("small", "clinical")
SPACING_MODES = ("mixed", "isotropic", "anisotropic")
INFECTION = 3
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SMALL_MAX_VOXELS = 300_000
SLAB = 16  # slices rendered at once; fixed, so the per-slab noise streams do not depend on the volume size


def draw_spacing(rng: np.random.Generator, size: str, mode: str,
                 coarse: bool | None = None) -> tuple[float, float, float]:
    """(z, y, x) spacing in mm. ``mixed``: fine or coarse slices (``coarse`` forces which);
    ``isotropic``: all axes within 10 %; ``anisotropic``: z at least 4× the in-plane spacing."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")
    if mode not in SPACING_MODES:
        raise ValueError(f"spacing mode must be one of {SPACING_MODES}, not {mode!r}")
    in_plane = rng.uniform(4.5, 5.5) if size == "small" else rng.uniform(0.7, 0.8)
    if mode == "isotropic":
        z = in_plane * rng.uniform(0.96, 1.04)
    elif mode == "anisotropic":
        top_ratio = 5.0 if size == "small" else min(6.5, 5.0 / in_plane)
        z = in_plane * rng.uniform(4.2, top_ratio)
    else:
        coarse = bool(rng.random() < 0.5) if coarse is None else coarse
        fine_range, coarse_range = ((4.0, 6.0), (12.0, 16.0)) if size == "small" else ((1.0, 1.5), (3.0, 5.0))
        z = rng.uniform(*(coarse_range if coarse else fine_range))
    return round(float(z), 4), round(float(in_plane), 4), round(float(in_plane), 4)


@dataclass(frozen=True)
class Blob:
    centre: np.ndarray  # (z, y, x) mm
    radii: np.ndarray  # (z, y, x) mm
    base_hu: float  # ground glass near -650, consolidation near -200
    core_hu: float  # extra density towards the centre


@dataclass(frozen=True)
class Infection:
    blobs: tuple[Blob, ...]
    field: SmoothField
    floor_hu: float = DEFAULT_PROFILE.lesion_floor_hu  # the faintest a lesion voxel may be


def draw_infection(rng: np.random.Generator, anatomy: Anatomy, burden: float,
                   profile: AcquisitionProfile = DEFAULT_PROFILE) -> Infection:
    """Blobs whose total volume is ``burden`` of the lungs, mostly peripheral and posterior; their number and
    density follow the acquisition ``profile``."""
    field = SmoothField.draw(rng, 15.0)
    if burden <= 0:
        return Infection((), field)
    lung_volume = sum(lung.volume_mm3() for lung in anatomy.lungs) * 0.75  # carving removes about a quarter
    count = int(min(8 * profile.lesion_count_scale, 1 + rng.poisson(burden * 15 * profile.lesion_count_scale)))
    shares = rng.dirichlet(np.ones(count))
    stage = profile.lesion_stage(rng)
    blobs = []
    for share in shares:
        lung = anatomy.lungs[int(rng.integers(2))]
        side = 1.0 if lung.centre_yx[1] > 0 else -1.0
        t = rng.uniform(0.05, 0.6)
        angle = rng.uniform(-0.25, 1.1) * np.pi / 2  # 0 lateral, pi/2 posterior
        rho = rng.uniform(0.5, 0.85) * np.sqrt(1 - t ** 2)
        centre = np.array([lung.base_z + t * (lung.apex_z - lung.base_z) + 15.0,
                           lung.centre_yx[0] + lung.radii_yx[0] * rho * np.sin(angle),
                           lung.centre_yx[1] + side * lung.radii_yx[1] * rho * np.cos(angle)])
        aspect = rng.uniform(0.7, 1.3, 3)
        aspect /= np.cbrt(aspect.prod())
        # Part of each blob falls outside the lung and is cut away, hence the 1.3 volume margin.
        radius = np.cbrt(3.0 * 1.3 * share * burden * lung_volume / (4.0 * np.pi))
        blobs.append(Blob(centre, radius * aspect, profile.lesion_density(rng, stage), rng.uniform(0.0, 200.0)))
    return Infection(tuple(blobs), field, profile.lesion_floor_hu)


def paint_infection(infection: Infection, block: Block, labels: np.ndarray, hu: np.ndarray) -> None:
    """Label 3 and infection HU (the profile's floor … -90) where a blob meets a lung; the blob edge is
    irregular."""
    for blob in infection.blobs:
        found = block.ellipsoid(blob.centre, blob.radii)
        if found is None:
            continue
        index, sub, distance = found
        noise = infection.field.sample(sub)
        inside = (distance < 1.0 + 0.3 * noise) & (labels[index] > 0)
        value = blob.base_hu + blob.core_hu * np.clip(1.0 - distance, 0.0, 1.0) + 40.0 * noise
        labels[index][inside] = INFECTION
        hu[index][inside] = np.clip(value, infection.floor_hu, -90.0)[inside]


@dataclass(frozen=True)
class Scan:
    """How one anatomy is imaged: grid in the patient frame, geometry, noise and infection."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    geometry: Geometry
    noise_hu: float
    noise_seed: int
    infection: Infection
    profile: AcquisitionProfile = DEFAULT_PROFILE


def draw_scan(rng: np.random.Generator, anatomy: Anatomy, size: str, spacing_zyx, burden: float,
              profile: AcquisitionProfile = DEFAULT_PROFILE) -> Scan:
    spacing_z, spacing_y, spacing_x = (float(s) for s in spacing_zyx)
    if size == "clinical":
        rows = cols = 512
    else:  # field of view a little wider than the body
        field_of_view = 2.0 * anatomy.body_yx[1] * rng.uniform(1.04, 1.12)
        rows, cols = int(round(field_of_view / spacing_y)), int(round(field_of_view / spacing_x))
    shift_y, shift_x = rng.uniform(-5.0, 15.0), rng.uniform(-10.0, 10.0)
    low, high = -rng.uniform(20.0, 60.0), anatomy.height() + rng.uniform(5.0, 30.0)
    slices = max(int(round((high - low) / spacing_z)) + 1, 8)
    if size == "small":  # keep tiny cases tiny: trim the scan range around the lungs
        slices = min(slices, max(8, SMALL_MAX_VOXELS // (rows * cols)))
    centre_z = 0.5 * (low + high)
    z = centre_z + spacing_z * (np.arange(slices) - (slices - 1) / 2.0)
    y = spacing_y * (np.arange(rows) - (rows - 1) / 2.0) - shift_y
    x = spacing_x * (np.arange(cols) - (cols - 1) / 2.0) - shift_x
    origin = (float(x[0] + rng.uniform(-30.0, 30.0)), float(y[0] + rng.uniform(-30.0, 30.0)),
              float(rng.uniform(-450.0, -50.0)))
    geometry = Geometry((spacing_z, spacing_y, spacing_x), tuple(round(o, 3) for o in origin), IDENTITY,
                        (slices, rows, cols))
    return Scan(z, y, x, geometry, float(rng.uniform(*profile.noise_hu)), int(rng.integers(2 ** 31)),
                draw_infection(rng, anatomy, burden, profile), profile)


def render(anatomy: Anatomy, scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    """The int16 HU image and uint8 label of ``anatomy`` seen through ``scan``, slab by slab."""
    image = np.empty(scan.geometry.shape, np.int16)
    label = np.empty(scan.geometry.shape, np.uint8)
    voxel_mm = float(np.mean(scan.geometry.spacing[1:]))
    for slab_index, start in enumerate(range(0, len(scan.z), SLAB)):
        block = Block(scan.z[start:start + SLAB], scan.y, scan.x, voxel_mm)
        texture = anatomy.texture_field.sample(block)
        hu = body_and_bone_hu(anatomy, block, texture)
        labels = lung_labels(anatomy, block, anatomy.shape_field.sample(block))
        lung = labels > 0
        # Parenchyma near -850 HU, denser towards the back (dependent lung), with vessels blended in.
        parenchyma = -860.0 + 25.0 * texture + 20.0 * (block.y[None, :, None] / 100.0)
        vessels = vessel_weight(anatomy, block)
        parenchyma += vessels * (40.0 + 20.0 * texture - parenchyma)
        hu[lung] = parenchyma[lung]
        paint_infection(scan.infection, block, labels, hu)
        hu = scan.profile.reconstruct(hu)
        noise_rng = np.random.default_rng([scan.noise_seed, slab_index])
        hu += scan.noise_hu * scan.profile.noise(noise_rng.standard_normal(hu.shape, dtype=np.float32))
        hu += scan.profile.hu_offset
        image[start:start + SLAB] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
        label[start:start + SLAB] = labels
    return image, label


def as_rng(rng_or_seed) -> np.random.Generator:
    return rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)


def make_phantom_case(rng_or_seed, size: str = "small", spacing_zyx=None, infection_burden: float | None = None,
                      anatomy: Anatomy | None = None, profile: AcquisitionProfile = DEFAULT_PROFILE
                      ) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One phantom: (image int16 HU, label uint8, Geometry). ``infection_burden`` is the infected fraction of
    the lungs (None: random); pass ``anatomy`` to rescan the same patient, ``profile`` to scan it with another
    scanner or protocol."""
    rng = as_rng(rng_or_seed)
    anatomy = draw_anatomy(rng) if anatomy is None else anatomy
    spacing_zyx = draw_spacing(rng, size, "mixed") if spacing_zyx is None else spacing_zyx
    burden = draw_burden(rng) if infection_burden is None else float(infection_burden)
    scan = draw_scan(rng, anatomy, size, spacing_zyx, burden, profile)
    image, label = render(anatomy, scan)
    return image, label, scan.geometry


def draw_burden(rng: np.random.Generator, burden_range: tuple[float, float] | None = None) -> float:
    """Infected fraction of the lungs: none in about one case in eight, otherwise 0.3 % … 30 %, log-uniform; with
    ``burden_range`` (a cohort of confirmed cases) always infected, log-uniform within it."""
    if burden_range is not None:
        return float(np.exp(rng.uniform(np.log(burden_range[0]), np.log(burden_range[1]))))
    return 0.0 if rng.random() < 0.125 else float(np.exp(rng.uniform(np.log(0.003), np.log(0.3))))


# --- Writing a whole dataset ---------------------------------------------------------------------------

SPLITS = (("labelled", "phantom"), ("unlabelled", "unlabelled"), ("test", "test"))
PAIRED_PATIENT_CHANCE = 0.3


def _rng(seed: int, split: int, index: int, stream: int) -> np.random.Generator:
    """Independent streams per (split, case, purpose), so changing one split's count leaves the others alone."""
    return np.random.default_rng([seed, split, index, stream])


def patient_indices(seed: int, num_labelled: int) -> list[int]:
    """Patient of each labelled case: cases 2k and 2k+1 are sometimes (always for k = 0) the same patient
    scanned twice, when there are at least 4 labelled cases."""
    patients = list(range(num_labelled))
    if num_labelled >= 4:
        for first in range(0, num_labelled - 1, 2):
            if first == 0 or _rng(seed, 0, first // 2, 2).random() < PAIRED_PATIENT_CHANCE:
                patients[first + 1] = first
    return patients


def case_plan(seed: int, split: int, index: int, size: str, spacing_mode: str,
              profile: AcquisitionProfile = DEFAULT_PROFILE, burden_range: tuple[float, float] | None = None):
    """Scan RNG, spacing and burden of one case. Case 1 of each split is heavily infected, case 3 is clean (unless
    a ``burden_range`` says every case is infected), and in ``mixed`` mode case 0 has fine and case 1 coarse
    slices, so small datasets cover the extremes (a profile with thin or thick slices overrides that)."""
    rng = _rng(seed, split, index, 1)
    coarse = {0: False, 1: True}.get(index) if profile.forced_coarse is None else profile.forced_coarse
    spacing = draw_spacing(rng, size, "mixed" if profile.forced_coarse is not None else spacing_mode, coarse=coarse)
    burden = {1: float(rng.uniform(0.22, 0.32)), 3: 0.0}.get(index)
    return rng, spacing, draw_burden(rng, burden_range) if burden is None or burden_range else burden


def generate_split(seed: int, split: int, count: int, size: str, spacing_mode: str, patients: list[int] | None = None,
                   profile: AcquisitionProfile = DEFAULT_PROFILE, burden_range: tuple[float, float] | None = None):
    """Yield (index, image, label, geometry) for each case of one split."""
    for index in range(count):
        patient = index if patients is None else patients[index]
        anatomy = draw_anatomy(_rng(seed, split, patient, 0))
        rng, spacing, burden = case_plan(seed, split, index, size, spacing_mode, profile, burden_range)
        yield (index, *make_phantom_case(rng, size, spacing, burden, anatomy=anatomy, profile=profile))


def infection_fraction(label: np.ndarray) -> float:
    lungs = np.count_nonzero(label)
    return float(np.count_nonzero(label == INFECTION) / lungs) if lungs else 0.0


def split_summary(name: str, geometries: list[Geometry], burdens: list[float]) -> str:
    if not geometries:
        return f"{name}: 0 cases"
    z = [g.spacing[0] for g in geometries]
    xy = [s for g in geometries for s in g.spacing[1:]]
    slices = [g.shape[0] for g in geometries]
    line = (f"{name}: {len(geometries)} cases, spacing z {min(z):.2f}-{max(z):.2f} mm, in-plane {min(xy):.2f}-"
            f"{max(xy):.2f} mm, {min(slices)}-{max(slices)} slices of up to {max(g.shape[1] for g in geometries)}"
            f"x{max(g.shape[2] for g in geometries)}")
    if burdens:
        line += (f", infection {100 * min(burdens):.1f}-{100 * max(burdens):.1f} % of the lungs "
                 f"({sum(b == 0 for b in burdens)} without)")
    return line


def _prepare_raw(workspace: Workspace, overwrite: bool) -> None:
    folders = (workspace.images_tr, workspace.labels_tr, workspace.images_unlabelled, workspace.labels_unlabelled,
               workspace.images_ts, workspace.labels_ts)
    if workspace.dataset_json.exists():
        if not overwrite:
            raise CovnetError(workspace.dataset_json, "already holds a dataset; pass --overwrite to replace it")
        workspace.dataset_json.unlink()
    if cases_json(workspace).is_file():
        cases_json(workspace).unlink()
    # Old phantom files (or those of an interrupted run) would mix with the new ones. Only phantom-named
    # files go: imagesUnlabelled may also hold real CTs added by covnet_import_unlabelled.
    for folder in folders:
        for stale in folder.glob("*.nii.gz") if folder.is_dir() else []:
            if STALE_NAME.match(stale.name):
                stale.unlink()


CASES_JSON = "phantom_cases.json"  # per-case draws of the cohort profile, beside dataset.json


def cases_json(workspace: Workspace):
    return workspace.raw / CASES_JSON


STALE_NAME = re.compile(r"^(phantom|unlabelled|test)_\d+(_0000)?\.nii\.gz$")


def make_phantom_dataset(workspace, num_labelled: int = 20, num_unlabelled: int = 20, num_test: int = 4,
                         seed: int = 0, size: str = "small", spacing_mode: str = "mixed", overwrite: bool = False,
                         report: Callable[[str], None] | None = None, *,
                         profile: AcquisitionProfile = DEFAULT_PROFILE,
                         unlabelled_profile: AcquisitionProfile | None = None,
                         test_profile: AcquisitionProfile | None = None,
                         pool_truth: bool = False, distinct_patients: bool = False,
                         burden_range: tuple[float, float] | None = None,
                         labelled_strata: int | None = None) -> DatasetDescription:
    """Write phantoms into ``<workspace>/raw`` (imagesTr/labelsTr, imagesUnlabelled, imagesTs/labelsTs) and
    dataset.json last, so an interrupted run leaves no dataset that looks complete. ``profile`` scans every
    split; ``unlabelled_profile`` and ``test_profile`` scan those splits with another scanner (domain shift).
    ``pool_truth`` also writes the pool's true labels to ``labelsUnlabelled/`` (diagnostics, oracle runs).
    ``distinct_patients``: every labelled case is another patient (by default some are rescans of one).
    ``burden_range``: every case infected, with an infected fraction of the lungs log-uniform in this range (a
    cohort of confirmed COVID-19 cases, as COVID-19-CT-Seg is); by default some cases are clean and most
    infections small. ``labelled_strata`` (cohort profile): the labelled cases come from that many of the
    cohort's sites, the pool and test cases from all of them. Cohort splits record their cases' draws in
    ``raw/phantom_cases.json``."""
    workspace = workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)
    for name, count in (("num_labelled", num_labelled), ("num_unlabelled", num_unlabelled), ("num_test", num_test)):
        if count < 0:
            raise CovnetError(None, f"{name} must be >= 0, not {count}")
    if num_labelled < 1:
        raise CovnetError(None, "at least one labelled case is needed")
    if size not in SIZES or spacing_mode not in SPACING_MODES:
        raise CovnetError(None, f"size must be one of {SIZES} and spacing mode one of {SPACING_MODES}")
    if labelled_strata is not None and (labelled_strata < 1 or not profile.cohort):
        raise CovnetError(None, "labelled_strata must be >= 1 and needs the cohort profile for the labelled cases")
    if burden_range is not None and profile.cohort:
        logger(__name__).warning("burden_range is ignored for cohort splits: their severity follows "
                                 "each patient's disease stage")
    _prepare_raw(workspace, overwrite)
    patients = list(range(num_labelled)) if distinct_patients else patient_indices(seed, num_labelled)
    groups, records = {}, {}
    outputs = ((workspace.images_tr, workspace.labels_tr),
               (workspace.images_unlabelled, workspace.labels_unlabelled if pool_truth else None),
               (workspace.images_ts, workspace.labels_ts))
    profiles = (profile, unlabelled_profile or profile, test_profile or profile)
    for split, ((split_name, prefix), count, (images_dir, labels_dir), split_profile) in enumerate(
            zip(SPLITS, (num_labelled, num_unlabelled, num_test), outputs, profiles)):
        geometries, burdens = [], []
        if split_profile.cohort:
            from covnet.phantoms.cohort import generate_cohort_split
            cases = generate_cohort_split(seed, split, count, size, prefix, labelled_strata=labelled_strata)
            if split == 0:
                patients = list(range(num_labelled))
        else:
            cases = ((*case, None) for case in generate_split(seed, split, count, size, spacing_mode,
                                                              patients if split == 0 else None, split_profile,
                                                              burden_range))
        for index, image, label, geometry, record in cases:
            case = f"{prefix}_{index:03d}"
            if record is not None:
                records[case] = dict(record.as_json(), split=split_name)
            write_image(image, geometry, image_path(images_dir, case))
            if labels_dir is not None:
                write_image(label, geometry, label_path(labels_dir, case))
                burdens.append(infection_fraction(label))
            if split == 0:
                groups[case] = f"patient_{patients[index]:03d}"
            geometries.append(geometry)
        if report is not None:
            report(f"{split_summary(f'{split_name} ({images_dir.name})', geometries, burdens)}; "
                   f"{split_profile.name} acquisition")
    if records:
        cases_json(workspace).write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    description = covid_description("covnet_phantoms", num_labelled, groups)
    description.save(workspace.dataset_json)
    return description
