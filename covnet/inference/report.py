"""Per-case volumes and infection burden of a lung/infection segmentation, and the report files.

Volumes are voxel counts times the voxel volume (``prod(spacing_zyx)`` in mm³, / 1000 for mL).

Infection carries no side of its own, so each infection voxel is assigned to the lung whose voxels
(labels ``left_lung`` / ``right_lung``) are nearest to it in millimetres (a Euclidean distance transform
with the image spacing; a voxel exactly between the two lungs goes to the one the transform meets first).
Lung L's region is then "label L ∪ infection assigned to L":

* ``left_lung_ml`` / ``right_lung_ml``: volume of that region (the whole lung, infected part included);
* ``left_lung_infection_ml`` / ``right_lung_infection_ml``: the infection assigned to it;
* ``infection_ml``: all infection voxels;
* ``infection_percent_left_lung`` = 100 · left infection / left lung region (likewise right), and
  ``infection_percent_lungs`` = 100 · all infection / (left region + right region).

When there is no lung label voxel at all the infection cannot be assigned: the per-lung numbers count no
infection and ``infection_percent_lungs`` uses the infection volume alone. Any percentage whose lung
volume is 0 is ``None``.

``confidence`` is the mean, over voxels predicted as lung or infection, of the largest class probability at
that voxel; ``None`` without probabilities or when nothing is predicted as lung or infection.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from covnet.dataset import COVID_LABELS, INFECTION, LEFT_LUNG, RIGHT_LUNG
from covnet.image.boxed import BoxedProbabilities
from covnet.runtime.atomic import write_json, write_text

REPORT_CSV = "report.csv"
REPORT_JSON = "report.json"
REQUIRED_LABELS = (LEFT_LUNG, RIGHT_LUNG, INFECTION)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(other for other in range(mask.ndim) if other != axis)
        present = np.flatnonzero(mask.any(axis=other_axes))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def assign_infection_to_lungs(segmentation: np.ndarray, spacing_zyx: Sequence[float], left_label: int,
                              right_label: int, infection_label: int) -> tuple[int, int]:
    """Infection voxel counts (left, right), each infection voxel going to the nearest lung label voxel."""
    infection = segmentation == infection_label
    lungs = (segmentation == left_label) | (segmentation == right_label)
    if not infection.any() or not lungs.any():
        return 0, 0
    if not (segmentation == right_label).any():
        return int(infection.sum()), 0
    if not (segmentation == left_label).any():
        return 0, int(infection.sum())
    box = _bounding_box(lungs | infection)  # the nearest lung voxel of any infection voxel lies inside it
    lungs_in_box = lungs[box]
    nearest_lung_index = ndimage.distance_transform_edt(~lungs_in_box, sampling=spacing_zyx,
                                                        return_distances=False, return_indices=True)
    nearest_label = segmentation[box][tuple(nearest_lung_index)]
    labels_of_infection = nearest_label[infection[box]]
    return int(np.count_nonzero(labels_of_infection == left_label)), \
        int(np.count_nonzero(labels_of_infection == right_label))


def _percent(part_ml: float, whole_ml: float) -> float | None:
    return 100.0 * part_ml / whole_ml if whole_ml > 0 else None


def prediction_confidence(segmentation: np.ndarray, probabilities, foreground_labels: Sequence[int]) -> float | None:
    """Mean over voxels predicted as one of ``foreground_labels`` of the largest class probability there;
    ``probabilities`` a (classes, z, y, x) array or tensor, or ``BoxedProbabilities``."""
    if probabilities is None:
        return None
    if not isinstance(probabilities, BoxedProbabilities):
        probabilities = np.asarray(probabilities)
        if probabilities.ndim != 4:
            raise ValueError(f"expected (num_classes, z, y, x) probabilities, got shape {probabilities.shape}")
        probabilities = BoxedProbabilities.everywhere(probabilities)
    if probabilities.shape != segmentation.shape:
        raise ValueError(f"probabilities of an image {probabilities.shape} do not match the segmentation "
                         f"{segmentation.shape}; expected (num_classes, *segmentation.shape)")
    return probabilities.confidence(segmentation, foreground_labels)


def case_report(segmentation: np.ndarray, spacing_zyx: Sequence[float], probabilities=None,
                labels: Mapping[str, int] = COVID_LABELS) -> dict:
    """Volumes (mL), infection percentages and confidence of one case (see the module doc for definitions).

    ``segmentation`` is (z, y, x) integer labels; ``spacing_zyx`` in mm; ``probabilities`` optional
    ``(num_classes, z, y, x)`` (numpy array or CPU tensor); ``labels`` must name ``left_lung``,
    ``right_lung`` and ``infection``.
    """
    segmentation = np.asarray(segmentation)
    spacing_zyx = tuple(float(spacing) for spacing in spacing_zyx)
    if segmentation.ndim != 3 or len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
        raise ValueError(f"need a (z, y, x) segmentation and three positive spacings, got shape "
                         f"{segmentation.shape} and spacing {spacing_zyx}")
    missing = [name for name in REQUIRED_LABELS if name not in labels]
    if missing:
        raise ValueError(f"labels {dict(labels)} lack {missing}")
    left, right, infection = (int(labels[name]) for name in REQUIRED_LABELS)

    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    counts = np.bincount(segmentation.ravel().astype(np.int64, copy=False),
                         minlength=max(left, right, infection) + 1)
    left_infection, right_infection = assign_infection_to_lungs(segmentation, spacing_zyx, left, right, infection)
    infection_ml = float(counts[infection]) * voxel_ml
    left_infection_ml, right_infection_ml = left_infection * voxel_ml, right_infection * voxel_ml
    left_lung_ml = float(counts[left]) * voxel_ml + left_infection_ml
    right_lung_ml = float(counts[right]) * voxel_ml + right_infection_ml
    unassigned_infection_ml = infection_ml - left_infection_ml - right_infection_ml
    both_lungs_ml = left_lung_ml + right_lung_ml + unassigned_infection_ml
    return {
        "left_lung_ml": left_lung_ml,
        "right_lung_ml": right_lung_ml,
        "infection_ml": infection_ml,
        "left_lung_infection_ml": left_infection_ml,
        "right_lung_infection_ml": right_infection_ml,
        "infection_percent_left_lung": _percent(left_infection_ml, left_lung_ml),
        "infection_percent_right_lung": _percent(right_infection_ml, right_lung_ml),
        "infection_percent_lungs": _percent(infection_ml, both_lungs_ml),
        "confidence": prediction_confidence(segmentation, probabilities, (left, right, infection)),
    }


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}"
    return str(value)


def write_report(rows: Sequence[Mapping], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.csv`` and ``report.json`` (``{"cases": rows}``) into ``out_dir``, each atomically.

    Each row is one case's dict (typically ``{"case": name, **case_report(...)}``). CSV columns are the keys
    in first-seen order with ``case`` first; floats get 3 decimals and ``None`` an empty cell. JSON keeps full
    precision and writes ``None`` as ``null``. Returns the two paths.
    """
    rows = [dict(row) for row in rows]
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    if "case" in columns:
        columns.remove("case")
        columns.insert(0, "case")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(column)) for column in columns])
    out_dir = Path(out_dir)
    csv_path, json_path = out_dir / REPORT_CSV, out_dir / REPORT_JSON
    write_text(csv_path, buffer.getvalue())
    write_json(json_path, {"cases": [{key: _json_value(value) for key, value in row.items()} for row in rows]})
    return csv_path, json_path


def _json_value(value):
    """Plain Python numbers for JSON; a non-finite float becomes null so the file is strict JSON."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value
