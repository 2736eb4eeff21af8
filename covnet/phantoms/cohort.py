"""The ``cohort`` profile: a multi-site COVID-19 CT cohort whose variation a few labelled cases cannot cover.

Per patient: body size and inspiration level (the anatomy is scaled), a disease (``lesions.draw_disease``) and
confounders. Per scan: the site (a hospital's protocol: reconstruction kernel, slice thickness, dose, contrast,
raw HU or images stored pre-windowed to 0-255 as in COVID-19-CT-Seg's Radiopaedia half, written back in HU the
way ``covnet_import_covid19ctseg`` restores them: 256 grey levels, everything outside the window saturated, and
a wrong calibration where the site's window was not Radiopaedia's) and the field of view (a
fraction of cases show one lung, a body cropped at the image edge, or lungs touching the border). Every draw
is recorded per case (``CaseRecord``) so tests and benchmarks need not re-derive it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from covnet.image.io import Geometry
from covnet.importers.covid19ctseg import RADIOPAEDIA_WINDOW_HU, STORED_GREY_LEVELS, windowed_to_hu
from covnet.phantoms.anatomy import (Anatomy, Block, Segment, body_and_bone_hu, draw_anatomy, lung_labels,
                                     vessel_weight)
from covnet.phantoms.lesions import INFECTION, Disease, draw_disease, paint_confounders, paint_disease

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SMALL_MAX_VOXELS = 300_000
FIELDS_OF_VIEW = ("full", "one_lung", "cropped_body", "lung_at_border")
PARTIAL_CHANCE = 0.3


@dataclass(frozen=True)
class Site:
    """One hospital's protocol."""
    name: str
    kernel: str                           # "soft" or "sharp"
    thickness_mm: tuple[float, ...]       # slice thicknesses it reconstructs
    noise_hu: tuple[float, float]
    contrast_chance: float
    window: tuple[float, float] | None    # (low, high) HU stored as 0-255 grey levels; None: raw HU
    hu_offset: float = 0.0


SITES = (
    Site("thin_sharp", "sharp", (1.0, 1.25, 1.5), (15.0, 35.0), 0.1, None),
    Site("routine_soft", "soft", (5.0,), (8.0, 15.0), 0.3, None),
    Site("radiopaedia_png", "soft", (1.5, 3.0, 5.0), (8.0, 25.0), 0.2, RADIOPAEDIA_WINDOW_HU),
    Site("low_dose_sharp", "sharp", (2.5, 3.0), (35.0, 60.0), 0.0, None, 40.0),
    Site("contrast_thick", "soft", (7.5, 10.0), (10.0, 20.0), 0.9, None, -20.0),
    Site("lung_window_png", "sharp", (2.0, 5.0, 10.0), (10.0, 30.0), 0.1, (-1200.0, 0.0)),
)


@dataclass(frozen=True)
class CohortScan:
    site: Site
    thickness_mm: float
    noise_hu: float
    contrast: bool
    kernel_strength: float
    fov: str
    scale_yx: float       # patient size
    scale_z: float        # inspiration level
    effusion_mm: float
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    geometry: Geometry
    noise_seed: int


def site_choices(seed: int, labelled_strata: int | None) -> list[int]:
    """The sites labelled cases come from: all, or ``labelled_strata`` of them (fixed per dataset seed)."""
    if labelled_strata is None or labelled_strata >= len(SITES):
        return list(range(len(SITES)))
    return sorted(int(s) for s in np.random.default_rng([seed, 77]).permutation(len(SITES))[:labelled_strata])


def _axis(count: int, spacing: float, centre: float) -> np.ndarray:
    return centre + spacing * (np.arange(count) - (count - 1) / 2.0)


def draw_cohort_scan(rng: np.random.Generator, anatomy: Anatomy, size: str, site: Site) -> CohortScan:
    scale_yx, scale_z = float(rng.uniform(0.8, 1.2)), float(rng.uniform(0.82, 1.12))
    thickness = float(rng.choice(site.thickness_mm))
    in_plane = float(rng.uniform(4.5, 5.5) if size == "small" else rng.uniform(0.6, 0.9))
    spacing_z = max(thickness, in_plane) if size == "small" else thickness
    fov = "full" if rng.random() >= PARTIAL_CHANCE else str(rng.choice(FIELDS_OF_VIEW[1:]))
    body_y, body_x = (scale_yx * b for b in anatomy.body_yx)
    cavity_y, cavity_x = (scale_yx * c for c in anatomy.cavity_yx)
    width, height, centre_x, centre_y = 2.0 * body_x * rng.uniform(1.04, 1.12), None, 0.0, 0.0
    if fov == "one_lung":
        side = 1.0 if rng.random() < 0.5 else -1.0
        width, height = cavity_x * rng.uniform(0.95, 1.1), 2.0 * cavity_y * rng.uniform(0.95, 1.1)
        centre_x = side * cavity_x * 0.55
    elif fov == "cropped_body":
        width = 2.0 * cavity_x * rng.uniform(0.92, 1.02)
        height = 2.0 * cavity_y * rng.uniform(0.95, 1.05)
    elif fov == "lung_at_border":
        centre_x = (1.0 if rng.random() < 0.5 else -1.0) * rng.uniform(0.3, 0.45) * width
        centre_y = rng.uniform(-0.2, 0.2) * body_y
    height = width if height is None else height
    if size == "clinical":
        rows = cols = 512
        in_plane = max(width, height) / 512
    else:
        rows, cols = int(round(height / in_plane)), int(round(width / in_plane))
    low, high = -rng.uniform(15.0, 40.0), anatomy.height() * scale_z + rng.uniform(5.0, 25.0)
    slices = max(int(round((high - low) / spacing_z)) + 1, 8)
    if size == "small":
        slices = min(slices, max(8, SMALL_MAX_VOXELS // (rows * cols)))
    z = _axis(slices, spacing_z, 0.5 * (low + high))
    y, x = _axis(rows, in_plane, centre_y + rng.uniform(-5.0, 10.0)), _axis(cols, in_plane, centre_x)
    origin = (float(x[0] + rng.uniform(-30.0, 30.0)), float(y[0] + rng.uniform(-30.0, 30.0)),
              float(rng.uniform(-450.0, -50.0)))
    geometry = Geometry((round(spacing_z, 4), round(in_plane, 4), round(in_plane, 4)),
                        tuple(round(o, 3) for o in origin), IDENTITY, (slices, rows, cols))
    return CohortScan(site, thickness, float(rng.uniform(*site.noise_hu)), bool(rng.random() < site.contrast_chance),
                      float(rng.uniform(0.5, 1.2)), fov, scale_yx, scale_z, float(rng.uniform(20.0, 45.0)),
                      z, y, x, geometry, int(rng.integers(2 ** 31)))


def _airways(anatomy: Anatomy) -> tuple[Anatomy, Anatomy]:
    """Bronchi beside the large vessels (bronchovascular bundles): air lumens with a soft-tissue wall, drawn with
    the vessels' own partial-volume rule."""
    walls, lumens = [], []
    for segment in anatomy.vessels:
        if segment.radius < 3.0:
            continue
        offset = np.array([0.0, 1.6 * segment.radius, 0.0])
        walls.append(Segment(segment.start + offset, segment.end + offset, 0.9 * segment.radius))
        lumens.append(Segment(segment.start + offset, segment.end + offset, 0.6 * segment.radius))
    return (dataclasses.replace(anatomy, vessels=tuple(walls)), dataclasses.replace(anatomy, vessels=tuple(lumens)))


def _reconstruct(scan: CohortScan, hu: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Slice profile (z blur of the slice thickness), kernel texture and noise of the site."""
    spacing_z = scan.geometry.spacing[0]
    hu = gaussian_filter(hu, sigma=(0.35 * scan.thickness_mm / spacing_z, 0.0, 0.0))
    if scan.site.kernel == "soft":
        hu = gaussian_filter(hu, sigma=(0.0, scan.kernel_strength, scan.kernel_strength))
        noise = gaussian_filter(noise, sigma=(0.0, 1.0, 1.0))
    else:  # a sharp kernel enhances edges (unsharp masking) and leaves the noise white
        hu = hu + scan.kernel_strength * (hu - gaussian_filter(hu, sigma=(0.0, 1.0, 1.0)))
    noise /= max(float(noise.std()), 1e-6)
    # Thin slices at the same dose are noisier: noise scales with 1/sqrt(thickness) around 5 mm.
    return hu + scan.noise_hu * np.sqrt(5.0 / scan.thickness_mm) * 0.6 * noise


def render_cohort(anatomy: Anatomy, disease: Disease, scan: CohortScan) -> tuple[np.ndarray, np.ndarray]:
    """The whole volume at once (the slice profile needs neighbouring slices): int16 image, uint8 label."""
    block = Block(scan.z / scan.scale_z, scan.y / scan.scale_yx, scan.x / scan.scale_yx,
                  float(scan.geometry.spacing[1]) / scan.scale_yx)
    texture = anatomy.texture_field.sample(block)
    hu = body_and_bone_hu(anatomy, block, texture)
    labels = lung_labels(anatomy, block, anatomy.shape_field.sample(block))
    lung = labels > 0
    parenchyma = -860.0 + 25.0 * texture + 25.0 * (block.y[None, :, None] / 100.0)
    vessel_hu = 180.0 if scan.contrast else 40.0
    parenchyma += vessel_weight(anatomy, block) * (vessel_hu + 20.0 * texture - parenchyma)
    walls, lumens = _airways(anatomy)
    parenchyma += vessel_weight(walls, block) * (-100.0 - parenchyma)
    parenchyma += vessel_weight(lumens, block) * (-990.0 - parenchyma)
    hu[lung] = parenchyma[lung]
    if scan.contrast:
        z, y, x = block.grids()
        hz, hy, hx = anatomy.heart_centre
        rz, ry, rx = anatomy.heart_radii
        heart = ((z - hz) / rz) ** 2 + ((y - hy) / ry) ** 2 + ((x - hx) / rx) ** 2 < 0.8
        hu[heart] += 150.0
    paint_disease(disease, block, labels, hu)
    paint_confounders(disease, anatomy, block, labels, hu, texture, scan.effusion_mm)
    noise = np.random.default_rng(scan.noise_seed).standard_normal(hu.shape, dtype=np.float32)
    hu = _reconstruct(scan, hu, noise) + scan.site.hu_offset
    if scan.site.window is None:
        image = np.clip(np.rint(hu), -1024, 3071)
    else:
        low, high = scan.site.window
        grey = np.clip(np.rint((hu - low) / (high - low) * STORED_GREY_LEVELS), 0, STORED_GREY_LEVELS)
        image = np.rint(windowed_to_hu(grey))
    return image.astype(np.int16), labels


@dataclass(frozen=True)
class CaseRecord:
    """What was drawn for one case, written to the dataset's phantom_cases.json."""
    case: str
    site: str
    intensity: str
    kernel: str
    thickness_mm: float
    noise_hu: float
    contrast: bool
    fov: str
    patient_scale: float
    inspiration_scale: float
    stage: str
    patterns: list[str]
    bilateral: bool
    diffuse: bool
    target_severity: float
    severity: float          # infected fraction of the labelled lung, measured on the label
    confounders: list[str]
    lungs_present: list[int]

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def make_cohort_case(rng: np.random.Generator, anatomy: Anatomy, size: str, site: Site, case: str
                     ) -> tuple[np.ndarray, np.ndarray, Geometry, CaseRecord]:
    disease = draw_disease(rng, anatomy)
    scan = draw_cohort_scan(rng, anatomy, size, site)
    image, label = render_cohort(anatomy, disease, scan)
    lungs = int(np.count_nonzero(label))
    record = CaseRecord(case, site.name, "hu" if site.window is None else "windowed_0_255", site.kernel,
                        scan.thickness_mm, round(scan.noise_hu, 2), scan.contrast, scan.fov,
                        round(scan.scale_yx, 3), round(scan.scale_z, 3), disease.stage,
                        sorted({lesion.pattern for lesion in disease.lesions}), disease.bilateral, disease.diffuse,
                        round(disease.severity, 4),
                        round(float(np.count_nonzero(label == INFECTION)) / lungs, 4) if lungs else 0.0,
                        list(disease.confounders), sorted(int(v) for v in np.unique(label) if v in (1, 2)))
    return image, label, scan.geometry, record


def generate_cohort_split(seed: int, split: int, count: int, size: str, prefix: str, *,
                          labelled_strata: int | None = None):
    """Yield (index, image, label, geometry, record) per case; every case is another patient. The labelled
    split (0) draws its sites from ``site_choices(seed, labelled_strata)``, the others from every site."""
    sites = site_choices(seed, labelled_strata if split == 0 else None)
    for index in range(count):
        anatomy = draw_anatomy(np.random.default_rng([seed, split, index, 0]))
        rng = np.random.default_rng([seed, split, index, 11])
        site = SITES[sites[int(rng.integers(len(sites)))]]
        yield (index, *make_cohort_case(rng, anatomy, size, site, f"{prefix}_{index:03d}"))
