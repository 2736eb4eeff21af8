"""What the labelled data is: per-case spacing, shapes and foreground intensities, then dataset-wide stats.

Written to ``preprocessed/dataset_fingerprint.json``, one line per case. The intensity statistics come from
a random sample of at most 10,000 foreground (label > 0) voxels per case, so every case weighs about the
same whatever its size (nnU-Net v2 samples 10^8 / number of cases per case; 10,000 keeps the file small and
moves the 0.5/99.5 percentiles by well under the HU noise). Each case records the size and modification
time of its raw files (``source``), so a rerun notices an edited case and fingerprints again.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from covnet.dataset import DatasetDescription, image_path, label_path, read_labelled_case
from covnet.image.cropping import body_bounding_box
from covnet.image.orientation import canonical_reorientation
from covnet.runtime.atomic import source_stamp, write_text
from covnet.runtime.errors import CovnetError
from covnet.runtime.parallel import map_cases

SAMPLES_PER_CASE = 10_000


@dataclass
class CaseFingerprint:
    case: str
    spacing: list[float]             # (z, y, x) mm
    shape_before_crop: list[int]     # (z, y, x)
    shape_after_crop: list[int]
    foreground_sample: list[float]   # HU of up to SAMPLES_PER_CASE random voxels with label > 0
    foreground_voxels: int
    source: list[list]               # covnet.runtime.atomic.source_stamp of the image and label files


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
        cases = ",\n".join("  " + json.dumps(asdict(case)) for case in self.cases)
        write_text(path, f'{{"foreground_intensity": {json.dumps(self.foreground_intensity)},\n'
                         f' "cases": [\n{cases}\n ]}}\n')


def fingerprint_case(images_dir: Path, labels_dir: Path, case: str, description: DatasetDescription,
                     seed: int = 1234) -> CaseFingerprint:
    """Read one labelled case (validating it on the way) and describe it."""
    image, label, geometry = read_labelled_case(images_dir, labels_dir, case, description, dtype=np.float32)
    box = body_bounding_box(image, label)
    foreground = image[label > 0]
    rng = np.random.default_rng(seed)
    sample = foreground if foreground.size <= SAMPLES_PER_CASE else rng.choice(foreground, SAMPLES_PER_CASE, replace=False)
    # Spacing and shapes along the LPS-canonical axes that preprocessing reorients every case to (a box's
    # extents only permute under reorientation).
    canonical = canonical_reorientation(geometry.direction)
    return CaseFingerprint(case=case, spacing=list(canonical.spacing(geometry.spacing)),
                           shape_before_crop=list(canonical.shape(image.shape)),
                           shape_after_crop=list(canonical.shape([stop - start for start, stop in box])),
                           foreground_sample=[round(float(v), 2) for v in sample],
                           foreground_voxels=int(foreground.size), source=case_source(images_dir, labels_dir, case, description))


def case_source(images_dir: Path, labels_dir: Path, case: str, description: DatasetDescription) -> list[list]:
    return source_stamp(image_path(images_dir, case, description.file_ending),
                        label_path(labels_dir, case, description.file_ending))


def aggregate_intensities(samples: np.ndarray) -> dict[str, float]:
    if samples.size == 0:
        raise CovnetError(None, "no labelled foreground voxel in any training case: cannot plan normalization")
    return {"mean": float(np.mean(samples)), "std": float(np.std(samples)), "median": float(np.median(samples)),
            "percentile_00_5": float(np.percentile(samples, 0.5)),
            "percentile_99_5": float(np.percentile(samples, 99.5)),
            "min": float(np.min(samples)), "max": float(np.max(samples))}


def _fingerprint_job(arguments) -> CaseFingerprint:
    images_dir, labels_dir, case, description, seed = arguments
    try:
        return fingerprint_case(images_dir, labels_dir, case, description, seed)
    except CovnetError:
        raise
    except Exception as error:  # name the case whatever went wrong inside it
        raise CovnetError(image_path(images_dir, case, description.file_ending),
                          f"fingerprinting failed: {type(error).__name__}: {error}") from error


def extract_fingerprint(raw_dir: Path, cases: list[str], description: DatasetDescription,
                        num_processes: int = 1) -> DatasetFingerprint:
    jobs = [(raw_dir / "imagesTr", raw_dir / "labelsTr", case, description, 1234 + index)
            for index, case in enumerate(cases)]
    fingerprints = map_cases(_fingerprint_job, jobs, num_processes, "fingerprint")
    samples = np.concatenate([np.asarray(f.foreground_sample, dtype=np.float64) for f in fingerprints])
    return DatasetFingerprint(fingerprints, aggregate_intensities(samples))
