"""Pseudo-label policies and the case scores of self-training, on probability maps with a known answer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from covnet.runtime.errors import CovnetError
from covnet.selftrain.labels import agreement, apply_policy, confidence, label_change
from covnet.selftrain.settings import SelfTrainingSettings

IGNORE = 4


def make_pseudo_label(probabilities: torch.Tensor, policy, *, round_index: int, ignore_label: int):
    largest, labels = probabilities.max(dim=0)
    return apply_policy(labels.numpy().astype(np.uint8), largest.numpy(), policy, round_index=round_index,
                        num_classes=probabilities.shape[0], ignore_label=ignore_label)


def _policy(**settings):
    return SelfTrainingSettings(**settings).label_policy


def _probabilities(seed: int = 0) -> torch.Tensor:
    """4 classes on a 20×20×20 grid: background everywhere sure (0.95-1.0), a lung block fairly sure
    (0.8-0.95) and an infection blob that the teacher is unsure of (0.4-0.6)."""
    rng = np.random.default_rng(seed)
    shape = (20, 20, 20)
    labels = np.zeros(shape, np.int64)
    labels[2:18, 2:18, 2:10] = 1
    labels[2:18, 2:18, 10:18] = 2
    labels[8:12, 8:12, 4:8] = 3
    sure = np.select([labels == 0, labels == 3], [rng.uniform(0.95, 1.0, shape), rng.uniform(0.4, 0.6, shape)],
                     rng.uniform(0.8, 0.95, shape))
    probabilities = np.zeros((4, *shape), np.float32)
    rest = (1 - sure) / 3
    for value in range(4):
        probabilities[value] = np.where(labels == value, sure, rest)
    return torch.from_numpy(probabilities), labels


def test_argmax_keeps_every_voxel():
    probabilities, truth = _probabilities()
    labels, ignored = make_pseudo_label(probabilities, _policy(pseudo_labels="argmax"), round_index=1, ignore_label=IGNORE)
    assert np.array_equal(labels, truth) and labels.dtype == np.uint8
    assert ignored == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}


def test_a_global_threshold_wipes_out_the_unsure_class():
    probabilities, truth = _probabilities()
    labels, ignored = make_pseudo_label(probabilities, _policy(pseudo_labels="threshold", min_confidence=0.9),
                                        round_index=1, ignore_label=IGNORE)
    assert not (labels == 3).any() and ignored[3] == 1.0           # every infection voxel ignored
    assert ignored[0] == 0.0 and 0.2 < ignored[1] < 0.9
    assert np.array_equal(labels[labels != IGNORE], truth[labels != IGNORE])


def test_class_balanced_keeps_the_top_portion_of_every_class_and_grows_per_round():
    probabilities, truth = _probabilities()
    policy = _policy(pseudo_labels="class_balanced", class_portion=0.2, class_portion_step=0.1, class_portion_max=0.35)
    for round_index, portion in ((1, 0.2), (2, 0.3), (3, 0.35), (5, 0.35)):
        labels, ignored = make_pseudo_label(probabilities, policy, round_index=round_index, ignore_label=IGNORE)
        for value in range(4):
            predicted = np.count_nonzero(truth == value)
            kept = np.count_nonzero(labels == value) / predicted
            assert kept == np.ceil(portion * predicted) / predicted, (round_index, value, kept)
            assert ignored[value] == pytest.approx(1 - kept)
        assert np.array_equal(labels[labels != IGNORE], truth[labels != IGNORE])
    # The kept infection voxels are its most confident ones.
    largest = probabilities.max(dim=0).values.numpy()
    kept = labels == 3
    assert largest[kept].min() >= largest[(truth == 3) & ~kept].max() - 1e-3


def test_policy_values_are_checked():
    with pytest.raises(CovnetError, match="--pseudo-labels 'soft'"):
        _policy(pseudo_labels="soft")
    with pytest.raises(CovnetError, match="--class-portion 0.6 is above --class-portion-max 0.5"):
        _policy(pseudo_labels="class_balanced", class_portion=0.6)
    assert _policy(pseudo_labels="argmax", class_portion=0.6).name == "argmax"     # not its business
    with pytest.raises(CovnetError, match="--min-confidence must be at most 1.01"):
        _policy(min_confidence=2.0)


def test_agreement_confidence_and_change():
    base = np.zeros((10, 10, 10), np.uint8)
    base[2:8, 2:8, 2:8] = 1
    same, shifted, empty = base.copy(), np.roll(base, 3, axis=0), np.zeros_like(base)
    base[4:6, 4:6, 4:6] = same[4:6, 4:6, 4:6] = 3
    shifted[7:9, 4:6, 4:6] = 3
    assert agreement([base, same], [3]) == 1.0
    assert agreement([base, shifted], [3]) == 0.0                  # infection in different places
    assert agreement([base, same, shifted], [3]) == pytest.approx(1 / 3)
    assert agreement([empty, empty], [3]) == 1.0 and agreement([base], [3]) == 1.0
    largest = np.where(base > 0, 0.7, 0.99)
    assert confidence(base, largest, [1, 2, 3]) == pytest.approx(0.7)
    assert confidence(empty, largest, [1, 2, 3]) is None
    assert label_change(base, same, [1, 2, 3]) == 0.0
    union = np.count_nonzero((base > 0) | (shifted > 0))
    assert label_change(base, shifted, [1, 2, 3]) == pytest.approx(np.count_nonzero(base != shifted) / union)
