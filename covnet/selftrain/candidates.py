"""A round's pool predictions ("candidates"): what the round's teacher says about each unlabelled case.

For each pool case, in ``round_NN/candidates/``:

* ``<case>_seg.npy``: the teacher's argmax (uint8, on the plan's grid), before any voxel is ignored;
* ``<case>_confidence.npy``: the largest class probability per voxel, quantised to uint8 (0-255), from which
  every pseudo-label policy of ``covnet.selftrain.labels`` can be applied later without predicting again;
* ``<case>.json`` (written last: a case without it is unfinished): the teacher's ``key`` (its models and
  mirroring: a candidate of another teacher is redone), ``confidence``, ``agreement`` (mean pairwise Dice of
  the members on the scoring structure) and ``change`` (share of the foreground whose label differs from the
  previous round's candidate, when there is one).

The key holds no pseudo-label policy or selection setting, so runs that differ only in those share a round's
candidates. With ``oracle_folder`` the pool's true labels (preprocessed like expert cases) stand in for the
teacher: the ceiling of what pseudo-labels can give (experiments only).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from covnet.inference.predictor import Predictor
from covnet.planning.plans import Plan
from covnet.preprocessing.storage import load_case, save_array, segmentation_file
from covnet.runtime.atomic import write_json
from covnet.runtime.log import logger
from covnet.selftrain.labels import agreement, confidence, label_change
from covnet.workspace import Workspace

log = logger(__name__)
CONFIDENCE_LEVELS = 255


def confidence_file(folder: Path, case: str) -> Path:
    return folder / f"{case}_confidence.npy"


def record_file(folder: Path, case: str) -> Path:
    return folder / f"{case}.json"


@dataclass(frozen=True)
class Candidate:
    case: str
    labels: np.ndarray              # argmax, uint8
    largest: np.ndarray             # largest class probability, float32 in [0, 1]
    record: dict


def read_record(folder: Path, case: str, key: dict | None = None) -> dict | None:
    """The record of a finished candidate (made under ``key`` when given), or None."""
    path = record_file(folder, case)
    if not path.is_file() or not segmentation_file(folder, case).is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if key is None or record.get("key") == key else None


def load_candidate(folder: Path, case: str) -> Candidate:
    record = read_record(folder, case)
    labels = np.load(segmentation_file(folder, case))
    largest = np.load(confidence_file(folder, case)).astype(np.float32) / CONFIDENCE_LEVELS
    return Candidate(case, labels, largest, record)


@dataclass
class PoolLabeller:
    """The round's teacher. ``predictor`` gives the labels (its members' averaged probabilities); the members'
    own label maps, and those of ``second_opinion`` (one model's plain prediction beside its mirrored one), give
    the agreement. A single model without mirroring has nothing to agree with: agreement 1 for every case."""
    plan: Plan
    key: dict
    scoring: list[int]                          # label values whose agreement ranks the cases (e.g. infection)
    foreground: list[int]
    predictor: Predictor | None = None
    second_opinion: Predictor | None = None
    oracle_folder: Path | None = None

    def predict(self, workspace: Workspace, case: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(argmax labels, largest probability, agreement) of one pool case."""
        if self.oracle_folder is not None:
            truth = np.load(segmentation_file(self.oracle_folder, case)).astype(np.uint8)
            return truth, np.ones(truth.shape, np.float32), 1.0
        image, _, _ = load_case(workspace.preprocessed_pool, case)
        members: list[np.ndarray] = []
        largest, labels = self.predictor.predict_probabilities(np.asarray(image), member_labels=members).max(dim=0)
        if self.second_opinion is not None:
            self.second_opinion.predict_probabilities(np.asarray(image), member_labels=members)
        return labels.numpy().astype(np.uint8), largest.float().numpy(), agreement(members, self.scoring)


def predict_candidates(workspace: Workspace, labeller: PoolLabeller, cases: Sequence[str], folder: Path,
                       previous: Path | None = None) -> dict[str, dict]:
    """Predict every case of ``cases`` not yet done under the labeller's key into ``folder``; return each case's
    record. ``previous``: the last round's candidates, for the label change."""
    folder.mkdir(parents=True, exist_ok=True)
    records = {}
    for number, case in enumerate(cases, start=1):
        record = read_record(folder, case, labeller.key)
        if record is None:
            with torch.no_grad():
                labels, largest, members_agree = labeller.predict(workspace, case)
            record_file(folder, case).unlink(missing_ok=True)
            save_array(segmentation_file(folder, case), labels)
            save_array(confidence_file(folder, case),
                       np.rint(np.clip(largest, 0, 1) * CONFIDENCE_LEVELS).astype(np.uint8))
            before = read_record(previous, case) if previous is not None else None
            change = None if before is None else \
                label_change(np.load(segmentation_file(previous, case)), labels, labeller.foreground)
            record = {"case": case, "key": labeller.key, "confidence": confidence(labels, largest,
                                                                                   labeller.foreground),
                      "agreement": members_agree, "change": change}
            write_json(record_file(folder, case), record)
            log.info(f"pseudo-label [{number}/{len(cases)}] {case}: agreement {members_agree:.3f}, confidence "
                     f"{'n/a' if record['confidence'] is None else format(record['confidence'], '.3f')}"
                     + ("" if change is None else f", change {change:.3f}"))
        records[case] = record
    return records

