"""Pseudo-labels from a teacher's probabilities, and the scores that rank them. Pure numpy/torch, no files.

Policies (``PseudoLabelPolicy.name``):

* ``argmax``: every voxel gets the teacher's most probable class; nothing is ignored (the FLARE22 winner's
  choice, and the best of covnet's own ablation, where ignoring unsure voxels removed mostly infection);
* ``class_balanced``: class-balanced self-training (Zou et al. 2018, CBST): per class, only the ``portion`` most
  confident of the voxels predicted as that class are kept, the others become the ignore label; the portion
  grows by ``portion_step`` per round up to ``max_portion``. Thresholds are per case (so that candidates need
  no stored probabilities), and a rare, unsure class such as infection keeps its share instead of vanishing
  under one global threshold;
* ``threshold``: voxels whose largest class probability is below ``min_confidence`` are ignored (covnet's first
  self-training recipe).

Scores of a case: ``confidence`` (mean largest probability over the predicted foreground), ``agreement`` (mean
pairwise Dice between the teacher's members on the scoring structure, usually infection: the ensemble's folds,
or a single model with and without test-time mirroring) and ``label_change`` (share of the foreground whose
label changed since the previous round).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

POLICIES = ("argmax", "class_balanced", "threshold")


@dataclass(frozen=True)
class PseudoLabelPolicy:
    """How a candidate becomes a pseudo-label; the values and their limits are ``SelfTrainingSettings``'."""
    name: str                       # one of POLICIES
    min_confidence: float           # threshold: voxels less sure than this are ignored
    portion: float                  # class_balanced: share of each class's voxels kept in round 1
    portion_step: float             # ... growing by this per round
    max_portion: float              # ... up to this

    def portion_for_round(self, round_index: int) -> float:
        return min(self.max_portion, self.portion + self.portion_step * (round_index - 1))


def _class_thresholds(largest: np.ndarray, labels: np.ndarray, classes: Sequence[int], portion: float
                      ) -> dict[int, float]:
    """Per class, the confidence of the ``ceil(portion · n)``-th most confident of its ``n`` predicted voxels."""
    thresholds = {}
    for value in classes:
        confidences = largest[labels == value]
        if confidences.size == 0:
            continue
        kept = max(1, int(np.ceil(portion * confidences.size)))
        thresholds[value] = float(np.partition(confidences, confidences.size - kept)[confidences.size - kept])
    return thresholds


def apply_policy(labels: np.ndarray, largest: np.ndarray, policy: PseudoLabelPolicy, *, round_index: int,
                 num_classes: int, ignore_label: int) -> tuple[np.ndarray, dict[int, float]]:
    """The teacher's argmax ``labels`` and their ``largest`` probability → (uint8 pseudo-label with ignored voxels
    set to ``ignore_label``, the share of each class's predicted voxels that was ignored)."""
    labels = np.array(labels, dtype=np.uint8)
    classes = list(range(num_classes))
    if policy.name == "argmax":
        ignored = np.zeros(labels.shape, bool)
    elif policy.name == "threshold":
        ignored = largest < policy.min_confidence
    else:
        thresholds = _class_thresholds(largest, labels, classes, policy.portion_for_round(round_index))
        cut = np.zeros(max(classes + [int(labels.max())]) + 1, np.float32)
        for value, threshold in thresholds.items():
            cut[value] = threshold
        ignored = largest < cut[labels]
    shares = {value: float(ignored[labels == value].mean()) for value in classes if (labels == value).any()}
    labels[ignored] = ignore_label
    return labels, shares


def dice(first: np.ndarray, second: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (they agree that there is nothing)."""
    total = int(first.sum()) + int(second.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(first, second).sum()) / total


def agreement(member_labels: Sequence[np.ndarray], structure: Sequence[int]) -> float:
    """Mean pairwise Dice between the members' label maps on ``structure`` (label values merged into one
    mask); 1.0 for a single member."""
    masks = [np.isin(labels, list(structure)) for labels in member_labels]
    pairs = list(itertools.combinations(masks, 2))
    return float(np.mean([dice(a, b) for a, b in pairs])) if pairs else 1.0


def confidence(labels: np.ndarray, largest_probability: np.ndarray, foreground: Sequence[int]) -> float | None:
    """Mean largest class probability over the voxels predicted as foreground; None without foreground."""
    mask = np.isin(labels, list(foreground))
    return float(largest_probability[mask].mean(dtype=np.float64)) if mask.any() else None


def label_change(previous: np.ndarray, current: np.ndarray, foreground: Sequence[int]) -> float:
    """Share of the voxels that are foreground in either map whose label differs between the two."""
    union = np.isin(previous, list(foreground)) | np.isin(current, list(foreground))
    return float((previous[union] != current[union]).mean()) if union.any() else 0.0
