"""A round's pseudo-labels: the teacher predicts the unused pool, the most confident cases are kept.

Everything happens on the plan's grid, on the preprocessed pool arrays (``preprocessed/unlabelled/``), with
the inference code's own ``Predictor.predict_probabilities``. For each case:

* ``confidence`` = ``prediction_confidence``: the mean, over voxels predicted as a foreground label (lungs and
  infection for COVID-19 data), of the largest class probability;
* the pseudo-label is the argmax, with voxels whose largest probability is below ``min_confidence`` set to
  the ignore label (masked out of the loss).

Each prediction goes to ``round_NN/candidates/`` (``<case>_seg.npy``, then ``<case>.json`` last), so a killed
pseudo-labelling resumes case by case. The ``cases_per_round`` most confident candidates then become
preprocessed cases in ``round_NN/pseudo_labels/`` in the storage format of expert cases (``<case>_seg.npy``,
``<case>.json`` with ``class_locations``, written last), their image a symlink to the pool's ``<case>.npy``
(a copy where symlinks fail), read by the trainer's one loader. ``selection.json`` is written last: a round
without it redoes its selection.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from covnet.dataset import IGNORE_LABEL_NAME
from covnet.inference.predictor import Predictor
from covnet.inference.report import prediction_confidence
from covnet.planning.plans import Plan
from covnet.preprocessing.case import sample_class_locations
from covnet.preprocessing.storage import image_file, load_case, properties_file, save_array, segmentation_file
from covnet.runtime.atomic import atomic_path, read_json, temporary_sibling, write_json
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.workspace import Workspace

log = logger(__name__)
CANDIDATES = "candidates"
PSEUDO_LABELS = "pseudo_labels"
SELECTION = "selection.json"


def self_training_plan(plan: Plan) -> Plan:
    """The plan with an ``ignore`` label (value = number of classes) when it declares none: the network's
    classes, and so its topology, stay the same."""
    if plan.ignore_label is not None:
        return plan
    return dataclasses.replace(plan, labels={**plan.labels, IGNORE_LABEL_NAME: plan.num_classes})


def pool_cases(workspace: Workspace) -> list[str]:
    """The preprocessed pool: cases whose properties (written last) and image exist."""
    folder = workspace.preprocessed_pool
    if not folder.is_dir():
        return []
    return sorted(path.stem for path in folder.glob("*.json") if image_file(folder, path.stem).is_file())


def pseudo_label(probabilities: torch.Tensor, plan: Plan, min_confidence: float) -> tuple[np.ndarray, float | None]:
    """(classes, z, y, x) probabilities → (pseudo-label uint8 with low-confidence voxels = ignore, confidence)."""
    largest, segmentation = probabilities.max(dim=0)
    segmentation = segmentation.numpy().astype(np.uint8)
    confidence = prediction_confidence(segmentation, probabilities.numpy(), list(plan.foreground_labels.values()))
    segmentation[largest.numpy() < min_confidence] = plan.ignore_label
    return segmentation, confidence


def _candidate_json(folder: Path, case: str) -> Path:
    return folder / f"{case}.json"


def _stored_candidate(folder: Path, case: str, key: dict) -> dict | None:
    """The record of a candidate already predicted under ``key``, or None."""
    path = _candidate_json(folder, case)
    if not path.is_file() or not segmentation_file(folder, case).is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("key") == key else None


def predict_candidates(workspace: Workspace, predictor: Predictor, plan: Plan, cases: Sequence[str], folder: Path,
                       min_confidence: float, key: dict) -> dict[str, float | None]:
    """Predict every case not yet done under ``key`` into ``folder``; return each case's confidence."""
    folder.mkdir(parents=True, exist_ok=True)
    confidences = {}
    for number, case in enumerate(cases, start=1):
        record = _stored_candidate(folder, case, key)
        if record is None:
            image, _, _ = load_case(workspace.preprocessed_pool, case)
            with torch.no_grad():
                probabilities = predictor.predict_probabilities(np.asarray(image)).float()
            segmentation, confidence = pseudo_label(probabilities, plan, min_confidence)
            del probabilities
            _candidate_json(folder, case).unlink(missing_ok=True)
            save_array(segmentation_file(folder, case), segmentation)
            record = {"case": case, "confidence": confidence, "key": key}
            write_json(_candidate_json(folder, case), record)
            log.info(f"pseudo-label [{number}/{len(cases)}] {case}: confidence "
                     f"{'n/a' if confidence is None else f'{confidence:.4f}'}")
        confidences[case] = record["confidence"]
    return confidences


def most_confident(confidences: dict[str, float | None], count: int) -> list[str]:
    """The ``count`` cases of highest confidence (ties by name; a case without foreground comes last)."""
    def order(case):
        value = confidences[case]
        return (-value if value is not None and not math.isnan(value) else math.inf, case)
    return sorted(confidences, key=order)[:count]


def _link_image(source: Path, destination: Path) -> None:
    """``destination`` → ``source`` as a relative symlink, atomically; a copy where symlinks fail."""
    temporary = temporary_sibling(destination)
    try:
        os.symlink(os.path.relpath(source, destination.parent), temporary)
        os.replace(temporary, destination)
    except OSError:
        if temporary.is_symlink():
            temporary.unlink()
        with atomic_path(destination) as copy:
            shutil.copyfile(source, copy)


def store_pseudo_case(workspace: Workspace, case: str, candidates: Path, folder: Path, plan: Plan, seed: int,
                      provenance: dict) -> float:
    """Turn a candidate into a preprocessed case in ``folder``; return its share of ignored voxels."""
    folder.mkdir(parents=True, exist_ok=True)
    properties_file(folder, case).unlink(missing_ok=True)
    _link_image(image_file(workspace.preprocessed_pool, case), image_file(folder, case))
    segmentation = np.load(segmentation_file(candidates, case))
    save_array(segmentation_file(folder, case), segmentation)
    properties = read_json(properties_file(workspace.preprocessed_pool, case), "")
    rng = np.random.default_rng([seed, zlib.crc32(case.encode())])
    properties["class_locations"] = sample_class_locations(segmentation, list(plan.foreground_labels.values()), rng)
    ignored = float(np.mean(segmentation == plan.ignore_label))
    properties["pseudo_label"] = {**provenance, "ignored_share": ignored}
    write_json(properties_file(folder, case), properties, indent=None)
    return ignored


def read_selection(round_dir: Path) -> dict | None:
    path = round_dir / SELECTION
    return read_json(path, "") if path.is_file() else None


def pseudo_label_round(workspace: Workspace, round_index: int, round_dir: Path, predictor: Predictor, plan: Plan,
                       unused: Sequence[str], cases_per_round: int, min_confidence: float, key: dict,
                       seed: int) -> dict:
    """Predict the unused pool, keep the most confident cases as pseudo-labelled cases, write
    ``selection.json`` (last) and return it."""
    candidates = round_dir / CANDIDATES
    confidences = predict_candidates(workspace, predictor, plan, list(unused), candidates, min_confidence, key)
    chosen = most_confident(confidences, cases_per_round)
    folder = round_dir / PSEUDO_LABELS
    if folder.exists():
        shutil.rmtree(folder)     # what an interrupted selection left: redone from the candidates
    provenance = {"round": round_index, "teacher": key["teacher"], "min_confidence": min_confidence}
    ignored = {case: store_pseudo_case(workspace, case, candidates, folder, plan, seed,
                                       {**provenance, "confidence": confidences[case]}) for case in chosen}
    selection = {"round": round_index, "teacher": key["teacher"], "pool_size_before": len(unused),
                 "pool_size": len(unused) - len(chosen), "cases_added": chosen,
                 "confidence": {case: confidences[case] for case in chosen}, "ignored_share": ignored,
                 "min_confidence": min_confidence, "candidates_confidence": confidences}
    write_json(round_dir / SELECTION, selection)
    shutil.rmtree(candidates, ignore_errors=True)
    return selection


def check_pool_names(pool: Sequence[str], expert: Sequence[str]) -> None:
    clash = sorted(set(pool) & set(expert))
    if clash:
        raise CovnetError(None, f"unlabelled case(s) {', '.join(clash[:5])} have the name of labelled cases; "
                                "rename them in raw/imagesUnlabelled and preprocess again")
