"""Validation of a trained fold: every validation case predicted whole, in its original geometry, and scored.

The prediction goes through ``covnet.inference.predictor`` (the same path as ``covnet_predict``) and the
scores through ``covnet.evaluation.folders`` (the same summary as ``covnet_evaluate``).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from covnet.checkpoint import Checkpoint
from covnet.dataset import DatasetDescription, label_path
from covnet.evaluation.folders import evaluate_folders, format_mean_table
from covnet.inference.predictor import InferenceSettings, Predictor
from covnet.preprocessing.storage import load_case
from covnet.runtime.log import logger
from covnet.workspace import VALIDATION_SUMMARY, Workspace

log = logger(__name__)


def validate_fold(workspace: Workspace, checkpoint: Checkpoint, cases: Sequence[str], output_dir: Path,
                  device: torch.device, settings: InferenceSettings = InferenceSettings(), *,
                  resume: bool = False) -> dict | None:
    """Predict ``cases`` into ``output_dir`` and score them into ``output_dir/summary.json``; return the summary
    (None when there is nothing to validate). With ``resume``, predictions already written are kept."""
    if not cases:
        log.info("no validation cases (fold 'all'): validation skipped")
        return None
    description = DatasetDescription.load(workspace.dataset_json)
    if output_dir.exists() and not resume:
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor([checkpoint], device, settings)
    for number, case in enumerate(sorted(cases), start=1):
        output_file = label_path(output_dir, case, description.file_ending)
        if output_file.is_file():
            continue
        image, _, properties = load_case(workspace.preprocessed_cases, case)
        predictor.predict_preprocessed(np.asarray(image), properties, output_file)
        log.info(f"validation [{number}/{len(cases)}] {case}")
    summary = evaluate_folders(workspace.labels_tr, output_dir, description,
                               output_json=output_dir / VALIDATION_SUMMARY, cases=list(cases))
    log.info(format_mean_table(summary))
    return summary

