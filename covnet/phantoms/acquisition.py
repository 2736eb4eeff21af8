"""How a phantom is scanned: acquisition profiles, so that one dataset can mix scanners and protocols.

A profile changes how the anatomy is imaged, never the anatomy itself: slice spacing, the reconstruction
kernel's blur, the noise level and its grain, the HU calibration and how infection looks (density and number
of lesions). ``standard`` reproduces covnet's original phantoms byte for byte. ``low_dose_soft`` is a second
scanner for domain-shift experiments: thick slices, a soft kernel, more and coarser-grained noise, a +50 HU
calibration offset and fainter, more numerous ground-glass lesions. ``varied_lesions`` is a cohort seen at
every stage of the disease: each patient's lesions share one stage, from faint early ground glass to dense
consolidation, so that a few labelled cases cover only a few stages (label scarcity with room to gain).
``cohort`` is a multi-site COVID-19 cohort drawn by ``covnet.phantoms.cohort`` (its own anatomy scaling, lesion
patterns by disease stage, confounders, sites, fields of view); the other fields do not apply to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from covnet.runtime.errors import CovnetError

SLICE_CHOICES = ("mode", "thin", "thick")


@dataclass(frozen=True)
class AcquisitionProfile:
    name: str
    slices: str = "mode"                        # "mode": as the dataset's spacing mode says; "thin"/"thick": always
    kernel_blur_voxels: float = 0.0             # in-plane Gaussian sigma of a soft reconstruction kernel
    noise_hu: tuple[float, float] = (10.0, 20.0)    # range of the per-scan noise standard deviation
    noise_grain_voxels: float = 0.0             # in-plane correlation of the noise (0: white)
    hu_offset: float = 0.0                      # calibration error added to every voxel
    lesion_hu: tuple[float, float] = (-680.0, -250.0)   # range of a lesion's base density
    lesion_count_scale: float = 1.0             # multiplies the expected number of lesions
    # None: every lesion draws its density from lesion_hu. A number: the case draws one disease stage (a density
    # in lesion_hu) and each of its lesions stays within this many HU of it.
    lesion_stage_spread_hu: float | None = None
    lesion_floor_hu: float = -720.0             # the faintest a lesion voxel may be
    cohort: bool = False                        # drawn by covnet.phantoms.cohort instead

    def __post_init__(self):
        if self.slices not in SLICE_CHOICES:
            raise CovnetError(None, f"profile {self.name}: slices must be one of {SLICE_CHOICES}")

    @property
    def forced_coarse(self) -> bool | None:
        """Whether every scan has coarse slices (True), fine ones (False), or the spacing mode decides (None)."""
        return {"mode": None, "thin": False, "thick": True}[self.slices]

    def reconstruct(self, hu: np.ndarray) -> np.ndarray:
        """The kernel's blur, slice by slice (in-plane only, so slabs can be rendered one at a time)."""
        if self.kernel_blur_voxels <= 0:
            return hu
        return gaussian_filter(hu, sigma=(0.0, self.kernel_blur_voxels, self.kernel_blur_voxels))

    def lesion_stage(self, rng: np.random.Generator) -> float | None:
        """A case's disease stage (a density in ``lesion_hu``), or None where lesions draw densities independently."""
        return None if self.lesion_stage_spread_hu is None else float(rng.uniform(*self.lesion_hu))

    def lesion_density(self, rng: np.random.Generator, stage: float | None) -> float:
        """The base density of one lesion of a case at ``stage``."""
        if stage is None:
            return float(rng.uniform(*self.lesion_hu))
        return float(np.clip(stage + rng.uniform(-1.0, 1.0) * self.lesion_stage_spread_hu, *self.lesion_hu))

    def noise(self, white: np.ndarray) -> np.ndarray:
        """Unit-variance noise of this profile's grain from unit-variance white noise."""
        if self.noise_grain_voxels <= 0:
            return white
        grained = gaussian_filter(white, sigma=(0.0, self.noise_grain_voxels, self.noise_grain_voxels))
        return grained / max(float(grained.std()), 1e-6)


PROFILES = {
    "standard": AcquisitionProfile("standard"),
    "low_dose_soft": AcquisitionProfile("low_dose_soft", slices="thick", kernel_blur_voxels=0.8,
                                        noise_hu=(30.0, 45.0), noise_grain_voxels=1.0, hu_offset=50.0,
                                        lesion_hu=(-760.0, -450.0), lesion_count_scale=2.0),
    "varied_lesions": AcquisitionProfile("varied_lesions", lesion_hu=(-790.0, -150.0), lesion_stage_spread_hu=60.0,
                                         lesion_floor_hu=-800.0, lesion_count_scale=2.0),
    "cohort": AcquisitionProfile("cohort", cohort=True),
}
DEFAULT_PROFILE = PROFILES["standard"]


def profile_named(name: str) -> AcquisitionProfile:
    if name not in PROFILES:
        raise CovnetError(None, f"unknown acquisition profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]
