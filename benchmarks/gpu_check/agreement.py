"""Does a trained model predict the same labels on a device as on the CPU? Used by tests/test_cuda.py.

The reference is the CPU in float32 (``use_amp=False``); the device runs as ``covnet_predict`` would there
(float16 autocast on CUDA), both with test-time mirroring unless told otherwise. Each labelled test phantom
(raw/imagesTs with raw/labelsTs) is predicted by both through ``Predictor.predict_image`` (preprocessing,
sliding window, export to the phantom's grid); the figures are the share of voxels with the same label and,
per region of the dataset (lungs, infection), each side's Dice against the true labels.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _mean(values) -> float | None:
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else None


def _difference(first: float, second: float) -> float:
    """|first - second|, a Dice of nothing against nothing (NaN) counting as 1."""
    return abs((1.0 if math.isnan(first) else first) - (1.0 if math.isnan(second) else second))


def device_agreement(workspace_root: Path, checkpoint: Path, device, *, mirroring: bool = True) -> dict:
    import torch

    from covnet.checkpoint import Checkpoint
    from covnet.dataset import DatasetDescription, find_cases, image_path, label_path
    from covnet.evaluation.metrics import dice
    from covnet.image.io import read_image
    from covnet.inference.predictor import InferenceSettings, Predictor
    from covnet.workspace import Workspace

    workspace = Workspace(workspace_root)
    description = DatasetDescription.load(workspace.dataset_json)
    model = Checkpoint.load(checkpoint)
    reference = Predictor([model], torch.device("cpu"), InferenceSettings(use_mirroring=mirroring, use_amp=False))
    on_device = Predictor([model], device, InferenceSettings(use_mirroring=mirroring, use_amp=device.type == "cuda"))
    cases = find_cases(workspace.images_ts, description.file_ending)
    if not cases:
        raise ValueError(f"{workspace.images_ts}: no test phantoms to predict")
    rows, same, total = [], 0, 0
    for case in cases:
        image, geometry = read_image(image_path(workspace.images_ts, case, description.file_ending))
        truth, _ = read_image(label_path(workspace.labels_ts, case, description.file_ending))
        cpu_labels, _ = reference.predict_image(image, geometry, case)
        device_labels, _ = on_device.predict_image(image, geometry, case)
        agreeing = int(np.count_nonzero(cpu_labels == device_labels))
        same, total = same + agreeing, total + cpu_labels.size
        row = {"case": case, "voxel_agreement": agreeing / cpu_labels.size}
        for region, labels in description.regions.items():
            row[f"{region}_dice_cpu"] = dice(np.isin(cpu_labels, labels), np.isin(truth, labels))
            row[f"{region}_dice_device"] = dice(np.isin(device_labels, labels), np.isin(truth, labels))
        rows.append(row)
    figures = {"device": str(device), "reference": "cpu float32", "cases": rows, "voxel_agreement": same / total}
    for region in description.regions:
        cpu, on = _mean(r[f"{region}_dice_cpu"] for r in rows), _mean(r[f"{region}_dice_device"] for r in rows)
        figures.update({f"{region}_dice_cpu": cpu, f"{region}_dice_device": on,
                        f"{region}_dice_difference": _difference(cpu if cpu is not None else math.nan,
                                                                 on if on is not None else math.nan),
                        f"{region}_dice_max_case_difference": max(
                            _difference(r[f"{region}_dice_cpu"], r[f"{region}_dice_device"]) for r in rows)})
    return figures
