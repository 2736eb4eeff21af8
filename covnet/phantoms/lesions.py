"""COVID-19 lesions and look-alike confounders for the ``cohort`` profile (sources: docs/phantoms_cohort.md).

A patient draws one disease stage; the stage sets the mix of lesion patterns and the range of severity (the
infected fraction of the lungs). Lesions lie mostly peripheral, posterior and in the lower lobes, bilateral in
most patients, multifocal or (at high severity) diffuse. Confounders look like disease but are never labelled
infection: pleural effusion (fluid outside the lung label), dependent atelectasis, emphysema, fibrotic bands.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covnet.phantoms.anatomy import Anatomy, Block, SmoothField

INFECTION = 3
PATTERNS = ("ground_glass", "crazy_paving", "consolidation", "reticulation", "reverse_halo")
# Stage: (pattern probabilities in PATTERNS order, severity range). After Pan et al. 2020 (early, progressive,
# peak, absorption) and Bernheim et al. 2020 (early scans often clean or unilateral ground glass).
STAGES = {
    "early": ((0.75, 0.1, 0.1, 0.0, 0.05), (0.005, 0.12)),
    "progressive": ((0.4, 0.35, 0.2, 0.0, 0.05), (0.03, 0.5)),
    "peak": ((0.2, 0.25, 0.5, 0.0, 0.05), (0.1, 0.85)),
    "absorption": ((0.4, 0.05, 0.15, 0.3, 0.1), (0.02, 0.4)),
}
CONFOUNDERS = ("pleural_effusion", "dependent_atelectasis", "emphysema", "fibrotic_bands")
CONFOUNDER_CHANCE = (0.15, 0.25, 0.15, 0.15)


@dataclass(frozen=True)
class Lesion:
    centre: np.ndarray  # (z, y, x) mm, patient frame
    radii: np.ndarray
    pattern: str
    base_hu: float


@dataclass(frozen=True)
class Disease:
    stage: str
    severity: float  # target infected fraction of the lungs
    bilateral: bool
    diffuse: bool
    lesions: tuple[Lesion, ...]
    field: SmoothField
    confounders: tuple[str, ...]

    @property
    def patterns(self) -> list[str]:
        return sorted({lesion.pattern for lesion in self.lesions})


def _lesion_hu(rng: np.random.Generator, pattern: str) -> float:
    return float(rng.uniform(*{"ground_glass": (-720.0, -480.0), "crazy_paving": (-650.0, -450.0),
                               "consolidation": (-200.0, 20.0), "reticulation": (-650.0, -450.0),
                               "reverse_halo": (-700.0, -550.0)}[pattern]))


def draw_disease(rng: np.random.Generator, anatomy: Anatomy, *, stage: str | None = None) -> Disease:
    """One patient's disease: stage, severity, lesions (pattern, place, size) and confounders."""
    stage = stage or str(rng.choice(list(STAGES), p=(0.2, 0.3, 0.3, 0.2)))
    pattern_p, (low, high) = STAGES[stage]
    severity = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    bilateral = bool(rng.random() < (0.55 if stage == "early" else 0.85))
    diffuse = severity > 0.35
    lung_volume = sum(lung.volume_mm3() for lung in anatomy.lungs) * 0.75
    count = int(np.clip(rng.poisson(3 + 25 * severity), 1, 24))
    shares = rng.dirichlet(np.full(count, 2.0))
    first_side = int(rng.integers(2))
    lesions = []
    for share in shares:
        lung = anatomy.lungs[int(rng.integers(2)) if bilateral else first_side]
        side = 1.0 if lung.centre_yx[1] > 0 else -1.0
        t = rng.beta(1.3, 2.2) if not diffuse else rng.uniform(0.0, 0.85)  # lower lobes first
        angle = rng.uniform(-0.4, 1.2) * np.pi / 2 if not diffuse else rng.uniform(-1.0, 1.2) * np.pi / 2
        rho = (rng.uniform(0.65, 0.95) if not diffuse else rng.uniform(0.2, 0.9)) * np.sqrt(1 - t ** 2)
        centre = np.array([lung.base_z + t * (lung.apex_z - lung.base_z) + 10.0,
                           lung.centre_yx[0] + lung.radii_yx[0] * rho * np.sin(angle),
                           lung.centre_yx[1] + side * lung.radii_yx[1] * rho * np.cos(angle)])
        aspect = rng.uniform(0.6, 1.4, 3)
        aspect /= np.cbrt(aspect.prod())
        # Peripheral lesions are cut by the pleura and diffuse ones overlap: hence the volume margin.
        radius = np.cbrt(3.0 * (1.6 + 1.5 * severity) * share * severity * lung_volume / (4.0 * np.pi))
        pattern = str(rng.choice(PATTERNS, p=pattern_p))
        lesions.append(Lesion(centre, radius * aspect, pattern, _lesion_hu(rng, pattern)))
    confounders = tuple(name for name, chance in zip(CONFOUNDERS, CONFOUNDER_CHANCE) if rng.random() < chance)
    return Disease(stage, severity, bilateral, diffuse, tuple(lesions), SmoothField.draw(rng, 12.0), confounders)


def _septal_lines(block: Block, period_mm: float) -> np.ndarray:
    """Partial-volume weight (0…1) of a 3D lattice of thin walls: interlobular septa, seen as a reticular net."""
    z, y, x = block.grids()
    width = 1.5 / max(block.voxel_mm, 1.0)
    walls = [np.clip(1.0 - np.abs(np.mod(c, period_mm) - period_mm / 2) / (period_mm / 2) * 4.0 + width, 0, 1)
             for c in (z, y + 0.37 * x, x - 0.29 * y)]
    return np.maximum(np.maximum(walls[0], walls[1]), walls[2])


def paint_disease(disease: Disease, block: Block, labels: np.ndarray, hu: np.ndarray) -> None:
    """Label 3 and lesion HU where a lesion meets a lung (``labels`` 1 or 2). Ground glass keeps the vessels
    visible (the denser of lesion and parenchyma wins); consolidation hides them."""
    for lesion in disease.lesions:
        found = block.ellipsoid(lesion.centre, lesion.radii)
        if found is None:
            continue
        index, sub, distance = found
        noise = disease.field.sample(sub)
        inside = (distance < 1.0 + 0.3 * noise) & np.isin(labels[index], (1, 2, INFECTION))
        value = lesion.base_hu + 50.0 * noise
        if lesion.pattern == "crazy_paving":
            value = value + 220.0 * _septal_lines(sub, 9.0)
        elif lesion.pattern == "reticulation":
            value = value + 350.0 * _septal_lines(sub, 6.0)
        elif lesion.pattern == "reverse_halo":  # ground glass inside a ring of consolidation
            value = np.where(distance > 0.7, -120.0 + 40.0 * noise, value)
        elif lesion.pattern == "consolidation":
            value = value + 60.0 * np.clip(1.0 - distance, 0.0, 1.0)
        region = hu[index]
        value = np.clip(value, -750.0, 60.0)
        painted = np.maximum(region, value) if lesion.pattern != "consolidation" else value
        region[inside] = np.broadcast_to(painted, region.shape)[inside]
        labels[index][inside] = INFECTION


def effusion_mask(anatomy: Anatomy, block: Block, depth_mm: float) -> np.ndarray:
    """The dependent (posterior) part of the lower thoracic cavity that fluid fills, ``depth_mm`` thick."""
    z, y, x = block.grids()
    cavity_y, _ = anatomy.cavity_yx
    height = anatomy.height()
    fluid_top = cavity_y - depth_mm * np.clip(1.2 - z / (0.6 * height), 0.0, 1.0)
    return np.broadcast_to((y > fluid_top) & (z < 0.6 * height), block.shape)


def paint_confounders(disease: Disease, anatomy: Anatomy, block: Block, labels: np.ndarray, hu: np.ndarray,
                      texture: np.ndarray, depth_mm: float) -> None:
    """Effusion takes lung voxels away (fluid is not lung); the others change lung voxels' HU and keep their
    lung label. None of them is labelled infection."""
    z, y, x = block.grids()
    lung = np.isin(labels, (1, 2))
    cavity_y, _ = anatomy.cavity_yx
    height = anatomy.height()
    if "pleural_effusion" in disease.confounders:
        fluid = effusion_mask(anatomy, block, depth_mm) & (labels > 0)
        hu[fluid] = 10.0 + 8.0 * texture[fluid]
        labels[fluid] = 0
        lung &= ~fluid
    if "dependent_atelectasis" in disease.confounders:
        band = np.broadcast_to(y > cavity_y * 0.82 - 6.0 * texture, block.shape) & lung
        hu[band] = -250.0 + 80.0 * texture[band]
    if "emphysema" in disease.confounders:
        holes = np.broadcast_to((texture > 1.0) & (z > 0.5 * height), block.shape) & lung
        hu[holes] = -975.0
    if "fibrotic_bands" in disease.confounders:
        stripe = np.abs(np.mod(0.8 * z + 0.6 * y + 2.0 * texture, 45.0) - 22.5) < 1.5 + block.voxel_mm / 4
        bands = np.broadcast_to(stripe & (np.abs(x) > 60.0), block.shape) & lung
        hu[bands] = np.maximum(hu[bands], -300.0)
