"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Every reference file ``CASE<file_ending>`` needs a prediction of the same name on the same grid. For each
foreground label and each region of ``dataset.json`` the Dice and the normalized surface Dice (NSD, in
physical spacing, see ``covnet.evaluation.metrics``) are computed. As in nnU-Net, voxels whose reference is the
ignore label (``dataset.IGNORE_LABEL_NAME``) count for no structure, in the prediction or the reference, and the
ignore label is no structure of its own.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from covnet.dataset import INFECTION, DatasetDescription, check_label_values, find_label_cases, label_path
from covnet.evaluation.metrics import dice, normalized_surface_dice
from covnet.image.io import read_image
from covnet.runtime.atomic import write_json, write_text
from covnet.runtime.errors import CovnetError
from covnet.runtime.parallel import map_cases

# NSD tolerances as in Ma et al. 2020 (COVID-19-CT-Seg benchmark): 3 mm for infection, 1 mm for lungs.
INFECTION_TOLERANCE_MM = 3.0
DEFAULT_TOLERANCE_MM = 1.0
METRICS = ("dice", "nsd")


def default_tolerance_mm(structure: str) -> float:
    """The NSD tolerance for a label or region name."""
    return INFECTION_TOLERANCE_MM if structure == INFECTION else DEFAULT_TOLERANCE_MM


def structures_of(description: DatasetDescription) -> dict[str, list[int]]:
    """Foreground labels then regions, each as the label values whose union it is.

    A region with a label's name and the same single value is that label (listed once).
    """
    structures = {name: [value] for name, value in description.foreground_labels.items()}
    for name, values in description.regions.items():
        if name in structures:
            if sorted(set(values)) != structures[name]:
                raise CovnetError("dataset.json", f"region '{name}' has the name of a label but label values "
                                                  f"{sorted(set(values))} instead of {structures[name]}")
            continue
        structures[name] = sorted(set(values))
    return structures


def tolerances_for(structures: Mapping[str, list[int]],
                   overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(structures))
    if unknown:
        raise ValueError(f"tolerances given for unknown structures {unknown}; known: {sorted(structures)}")
    return {name: float(overrides.get(name, default_tolerance_mm(name))) for name in structures}


def reference_cases(reference_dir: Path, file_ending: str) -> list[str]:
    if not reference_dir.is_dir():
        raise CovnetError(reference_dir, "reference folder not found")
    cases = find_label_cases(reference_dir, file_ending)
    if not cases:
        raise CovnetError(reference_dir, f"holds no reference label files named CASE{file_ending}")
    return cases


def evaluate_case(reference_file: Path, prediction_file: Path, description: DatasetDescription,
                  structures: Mapping[str, list[int]], tolerances: Mapping[str, float]) -> dict:
    """``{"case": ..., name: {"dice": float, "nsd": float}}`` with NaN where both masks are empty; voxels whose
    reference is the ignore label are left out of both masks."""
    if not prediction_file.is_file():
        raise CovnetError(prediction_file, f"prediction missing for reference {reference_file.name}")
    reference, reference_geometry = read_image(reference_file)
    prediction, prediction_geometry = read_image(prediction_file)
    differences = prediction_geometry.differences(reference_geometry)
    if differences:
        raise CovnetError(prediction_file, f"geometry differs from its reference {reference_file} "
                                           f"(prediction vs reference: {'; '.join(differences)})")
    check_label_values(reference, description, reference_file)
    check_label_values(prediction, description, prediction_file)
    spacing = reference_geometry.spacing
    result: dict = {"case": reference_file.name[: -len(description.file_ending)]}
    ignored = None if description.ignore_label is None else reference == description.ignore_label
    for name, values in structures.items():
        reference_mask, prediction_mask = np.isin(reference, values), np.isin(prediction, values)
        if ignored is not None:
            prediction_mask &= ~ignored
        result[name] = {"dice": dice(prediction_mask, reference_mask),
                        "nsd": normalized_surface_dice(prediction_mask, reference_mask, spacing,
                                                       tolerances[name])}
    return result


def _evaluate_case_in_worker(arguments: tuple) -> dict:
    return evaluate_case(*arguments)


def _nan_mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def mean_over_cases(per_case: list[dict], structures: Mapping[str, list[int]]) -> dict:
    """Mean of each metric over cases, leaving out NaN (empty vs empty); NaN if every case is NaN."""
    return {name: {metric: _nan_mean([case[name][metric] for case in per_case]) for metric in METRICS}
            for name in structures}


def _nan_to_none(value):
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def summary_csv_text(summary: dict) -> str:
    """One row per case and a final ``mean`` row; a missing value (empty vs empty) is written ``NaN``."""
    names = list(summary["mean"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case"] + [f"{name}_{metric}" for name in names for metric in METRICS])

    def cell(value) -> str:
        return "NaN" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))

    for row in summary["per_case"]:
        writer.writerow([row["case"]] + [cell(row[name][metric]) for name in names for metric in METRICS])
    writer.writerow(["mean"] + [cell(summary["mean"][name][metric]) for name in names for metric in METRICS])
    return buffer.getvalue()


def format_mean_table(summary: dict) -> str:
    """The mean Dice and NSD of each structure as a short text table."""
    tolerances = summary.get("nsd_tolerance_mm", {})
    names = list(summary["mean"])
    width = max([len("structure")] + [len(name) for name in names])

    def number(value) -> str:
        return "   n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.4f}"

    lines = [f"{'structure':<{width}}    dice     nsd  nsd tolerance"]
    for name in names:
        mean = summary["mean"][name]
        tolerance = f"{tolerances[name]:g} mm" if name in tolerances else ""
        lines.append(f"{name:<{width}}  {number(mean['dice'])}  {number(mean['nsd'])}  {tolerance}")
    lines.append(f"({len(summary['per_case'])} cases)")
    return "\n".join(lines)


def evaluate_folders(reference_dir: str | os.PathLike, prediction_dir: str | os.PathLike,
                     description: DatasetDescription, output_json: str | os.PathLike | None = None,
                     num_processes: int = 1, tolerances_mm: Mapping[str, float] | None = None,
                     cases: Sequence[str] | None = None) -> dict:
    """Evaluate every reference case and return (and, if ``output_json`` is given, write) the summary.

    The summary is ``{"per_case": [{"case": ..., name: {"dice": x, "nsd": y}, ...}], "mean": {name:
    {"dice": x, "nsd": y}}, "nsd_tolerance_mm": {name: mm}}``. Names are the foreground labels, then the
    regions, of ``description``. A value that is undefined (both masks empty) is ``None`` both in the
    returned dict and in the JSON (``null``, so that strict JSON readers accept the file); means leave
    such cases out and are ``None`` when no case has a value. A CSV with the same stem is written beside
    the JSON. ``tolerances_mm`` overrides the NSD tolerance of named structures (default:
    ``default_tolerance_mm``).
    """
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    structures = structures_of(description)
    tolerances = tolerances_for(structures, tolerances_mm)
    available = reference_cases(reference_dir, description.file_ending)
    if cases is not None:
        missing = sorted(set(cases) - set(available))
        if missing:
            raise CovnetError(reference_dir, f"holds no reference for {', '.join(missing)}")
        available = sorted(cases)
    cases = available
    if not prediction_dir.is_dir():
        raise CovnetError(prediction_dir, "prediction folder not found")
    jobs = [(label_path(reference_dir, case, description.file_ending),
             label_path(prediction_dir, case, description.file_ending), description, structures, tolerances)
            for case in cases]
    results = map_cases(_evaluate_case_in_worker, jobs, num_processes, "evaluate")
    summary = {"per_case": results, "mean": mean_over_cases(results, structures), "nsd_tolerance_mm": tolerances}
    summary = _nan_to_none(summary)
    if output_json is not None:
        output_json = Path(output_json)
        write_json(output_json, summary)
        write_text(output_json.with_suffix(".csv"), summary_csv_text(summary))
    return summary


__all__ = ["evaluate_folders", "evaluate_case", "format_mean_table", "default_tolerance_mm", "structures_of",
           "mean_over_cases", "summary_csv_text", "INFECTION_TOLERANCE_MM", "DEFAULT_TOLERANCE_MM"]
