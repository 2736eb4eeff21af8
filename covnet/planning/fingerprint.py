"""What the labelled data is: per-case spacing, shapes and foreground intensities, then dataset-wide stats.

Written to ``preprocessed/dataset_fingerprint.json``. The intensity statistics come from a fixed-size
random sample of foreground (label > 0) voxels per case, so every case weighs the same regardless of its
size (nnU-Net v2 samples 10,000 per case for the same reason).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from covnet.atomic import write_json
from covnet.cropping import body_bounding_box
from covnet.dataset import DatasetDescription, check_label_values, check_same_grid, image_path, label_path
from covnet.errors import CovnetError
from covnet.io import read_image

SAMPLES_PER_CASE = 10_000


@dataclass
class CaseFingerprint:
    case: str
    spacing: list[float]             # (z, y, x) mm
    shape_before_crop: list[int]     # (z, y, x)
    shape_after_crop: list[int]
    foreground_sample: list[float]   # HU of up to SAMPLES_PER_CASE random voxels with label > 0
    foreground_voxels: int


@dataclass
class DatasetFingerprint:
    cases: list[CaseFingerprint]
    foreground_intensity: dict[str, float]   # mean, std, median, percentile_00_5, percentile_99_5, min, max

    @property
    def spacings(self) -> np.ndarray:
        return np.array([case.spacing for case in self.cases], dtype=float)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        return np.array([case.shape_after_crop for case in self.cases], dtype=float)

    def to_json(self) -> dict:
        return {"foreground_intensity": self.foreground_intensity, "cases": [asdict(case) for case in self.cases]}

    @classmethod
    def from_json(cls, data: dict) -> "DatasetFingerprint":
        return cls([CaseFingerprint(**case) for case in data["cases"]], data["foreground_intensity"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DatasetFingerprint":
        return cls.from_json(json.loads(Path(path).read_text()))

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())


def fingerprint_case(images_dir: Path, labels_dir: Path, case: str, description: DatasetDescription,
                     seed: int = 1234) -> CaseFingerprint:
    """Read one labelled case (validating it on the way) and describe it."""
    label_file = label_path(labels_dir, case, description.file_ending)
    image, image_geometry = read_image(image_path(images_dir, case, description.file_ending), dtype=np.float32)
    if not label_file.is_file():
        raise CovnetError(image_path(images_dir, case, description.file_ending),
                          f"has no label (expected {label_file})")
    label, label_geometry = read_image(label_file)
    check_same_grid(image_geometry, label_geometry, label_file)
    check_label_values(label, description, label_file)
    box = body_bounding_box(image, label)
    foreground = image[label > 0]
    rng = np.random.default_rng(seed)
    sample = foreground if foreground.size <= SAMPLES_PER_CASE else rng.choice(foreground, SAMPLES_PER_CASE, replace=False)
    return CaseFingerprint(case=case, spacing=list(image_geometry.spacing), shape_before_crop=list(image.shape),
                           shape_after_crop=[stop - start for start, stop in box],
                           foreground_sample=[round(float(v), 2) for v in sample],
                           foreground_voxels=int(foreground.size))


def aggregate_intensities(samples: np.ndarray) -> dict[str, float]:
    if samples.size == 0:
        raise CovnetError(None, "no labelled foreground voxel in any training case: cannot plan normalization")
    return {"mean": float(np.mean(samples)), "std": float(np.std(samples)), "median": float(np.median(samples)),
            "percentile_00_5": float(np.percentile(samples, 0.5)),
            "percentile_99_5": float(np.percentile(samples, 99.5)),
            "min": float(np.min(samples)), "max": float(np.max(samples))}


def _fingerprint_job(arguments) -> CaseFingerprint:
    images_dir, labels_dir, case, description, seed = arguments
    return fingerprint_case(images_dir, labels_dir, case, description, seed)


def extract_fingerprint(raw_dir: Path, cases: list[str], description: DatasetDescription,
                        num_processes: int = 1) -> DatasetFingerprint:
    jobs = [(raw_dir / "imagesTr", raw_dir / "labelsTr", case, description, 1234 + index)
            for index, case in enumerate(cases)]
    progress = dict(total=len(jobs), desc="fingerprint", unit="case", leave=False)
    if num_processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=num_processes) as pool:
            fingerprints = list(tqdm(pool.map(_fingerprint_job, jobs), **progress))
    else:
        fingerprints = [_fingerprint_job(job) for job in tqdm(jobs, **progress)]
    samples = np.concatenate([np.asarray(f.foreground_sample, dtype=np.float64) for f in fingerprints])
    return DatasetFingerprint(fingerprints, aggregate_intensities(samples))
