"""Cross-validation folds that keep every patient on one side of each split.

``make_splits`` groups cases by patient (``DatasetDescription.groups``; a case without a group is its own
patient), shuffles the patients with a fixed seed and deals them, largest group first, to whichever fold
holds the fewest cases so far. The result depends only on the set of cases, the groups, the number of folds
and the seed, never on the order the cases were listed in.

``splits.json`` is written once and afterwards only read: adding or removing a case, or asking for another
number of folds, would reshuffle every fold, so either is an error that says what changed and how to re-split,
instead of a silent regeneration that would make old and new results incomparable. Its format is nnU-Net's: a
list with one ``{"train": [...], "val": [...]}`` per fold, so the number of folds is its length.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from covnet.runtime.atomic import read_json, write_json
from covnet.runtime.errors import CovnetError
from covnet.workspace import ALL_FOLDS, check_fold

DEFAULT_NUM_FOLDS = 5
DEFAULT_SPLIT_SEED = 12345
_LISTED_NAMES = 5   # how many added/removed case names an error message spells out


def _patients(cases: Iterable[str], groups: Mapping[str, str]) -> dict[str, list[str]]:
    members: dict[str, list[str]] = defaultdict(list)
    for case in sorted(set(cases)):
        members[groups.get(case, case)].append(case)
    return dict(members)


def make_splits(cases: Iterable[str], groups: Mapping[str, str] | None = None, num_folds: int = DEFAULT_NUM_FOLDS,
                seed: int = DEFAULT_SPLIT_SEED) -> list[dict[str, list[str]]]:
    """``num_folds`` dicts ``{"train": [...], "val": [...]}`` (sorted case lists); each case is validated in
    exactly one fold, and all cases of one patient group are validated in the same fold."""
    if num_folds < 2:
        raise CovnetError(None, f"--num-folds {num_folds}: cross-validation needs at least 2 folds")
    patients = _patients(cases, groups or {})
    if len(patients) < num_folds:
        fewer = f"use --num-folds {len(patients)} (leave-one-out) or fewer, or " if len(patients) >= 2 else ""
        raise CovnetError(None, f"cannot make {num_folds} folds from {len(patients)} patient(s); {fewer}"
                                f"train on all cases (fold '{ALL_FOLDS}')")
    order = sorted(patients)
    np.random.default_rng(seed).shuffle(order)
    # stable sort: patients of equal size keep their shuffled order
    order.sort(key=lambda patient: -len(patients[patient]))
    validation: list[list[str]] = [[] for _ in range(num_folds)]
    for patient in order:
        smallest = min(range(num_folds), key=lambda fold: len(validation[fold]))
        validation[smallest].extend(patients[patient])
    all_cases = sorted(case for members in patients.values() for case in members)
    splits = []
    for fold_cases in validation:
        held_out = set(fold_cases)
        splits.append({"train": [case for case in all_cases if case not in held_out], "val": sorted(fold_cases)})
    return splits


def _named(cases: list[str]) -> str:
    shown = ", ".join(cases[:_LISTED_NAMES])
    return shown + (f" and {len(cases) - _LISTED_NAMES} more" if len(cases) > _LISTED_NAMES else "")


def _check_structure(path: Path, stored) -> list[dict[str, list[str]]]:
    well_formed = isinstance(stored, list) and stored and all(
        isinstance(fold, dict) and isinstance(fold.get("train"), list) and isinstance(fold.get("val"), list)
        for fold in stored)
    if not well_formed:
        raise CovnetError(path, "is not a splits file (expected a list of {\"train\": [...], \"val\": [...]}); "
                                "delete it to re-split")
    return [{"train": [str(c) for c in fold["train"]], "val": [str(c) for c in fold["val"]]} for fold in stored]


def _check_stored_splits(path: Path, splits: list[dict[str, list[str]]], cases: set[str],
                         groups: Mapping[str, str], num_folds: int | None) -> None:
    hint = f"delete {path} to re-split (this reassigns every fold, so earlier fold results are no longer comparable)"
    if num_folds is not None and len(splits) != num_folds:
        raise CovnetError(path, f"holds {len(splits)} folds, not the {num_folds} asked for (--num-folds); {hint}, "
                                f"and the results/fold_* folders trained on the old split")
    fold_of: dict[str, int] = {}
    for fold, split in enumerate(splits):
        for case in split["val"]:
            if case in fold_of:
                raise CovnetError(path, f"validates case {case} in folds {fold_of[case]} and {fold}; {hint}")
            fold_of[case] = fold
    stored = set(fold_of)
    for fold, split in enumerate(splits):
        if set(split["train"]) != stored - set(split["val"]):
            raise CovnetError(path, f"fold {fold} does not train on exactly the cases it does not validate; {hint}")
    added, removed = sorted(cases - stored), sorted(stored - cases)
    if added or removed:
        changes = []
        if added:
            changes.append(f"{len(added)} case(s) added since it was written ({_named(added)})")
        if removed:
            changes.append(f"{len(removed)} case(s) removed ({_named(removed)})")
        raise CovnetError(path, f"was made for another set of cases: {'; '.join(changes)}; {hint}")
    folds_of_patient: dict[str, set[int]] = defaultdict(set)
    for case, fold in fold_of.items():
        folds_of_patient[groups.get(case, case)].add(fold)
    for patient, folds in sorted(folds_of_patient.items()):
        if len(folds) > 1:
            raise CovnetError(path, f"validates cases of patient {patient} in folds {sorted(folds)}, so the patient "
                                    f"is on both sides of a split; {hint}")


def load_or_make_splits(path: str | os.PathLike, cases: Iterable[str], groups: Mapping[str, str] | None = None,
                        num_folds: int | None = None, seed: int = DEFAULT_SPLIT_SEED
                        ) -> tuple[list[dict[str, list[str]]], bool]:
    """(folds, whether they are new): the folds stored at ``path``, after checking they still describe ``cases``
    (and number ``num_folds``, when given), or new ones from ``make_splits`` (``num_folds``, default 5) when the
    file does not exist yet; new folds are not written (``save_splits``)."""
    path = Path(path)
    cases, groups = set(cases), groups or {}
    if num_folds is not None and num_folds < 2:
        raise CovnetError(None, f"--num-folds {num_folds}: cross-validation needs at least 2 folds")
    if not path.exists():
        return make_splits(cases, groups, DEFAULT_NUM_FOLDS if num_folds is None else num_folds, seed), True
    splits = _check_structure(path, read_json(path, "delete it to re-split"))
    _check_stored_splits(path, splits, cases, groups, num_folds)
    return splits, False


def save_splits(path: str | os.PathLike, splits: list[dict[str, list[str]]]) -> None:
    write_json(path, splits)


def load_or_create_splits(path: str | os.PathLike, cases: Iterable[str], groups: Mapping[str, str] | None = None,
                          num_folds: int | None = None, seed: int = DEFAULT_SPLIT_SEED) -> list[dict[str, list[str]]]:
    """``load_or_make_splits``, writing new folds (atomically)."""
    splits, is_new = load_or_make_splits(path, cases, groups, num_folds, seed)
    if is_new:
        save_splits(path, splits)
    return splits


def fold_names(splits: list[dict[str, list[str]]]) -> list[str]:
    """The cross-validation folds of a split: "0" .. "K-1"."""
    return [str(index) for index in range(len(splits))]


def cases_for_fold(splits: list[dict[str, list[str]]], fold: int | str) -> tuple[list[str], list[str]]:
    """(training cases, validation cases) of ``fold``: "0" .. "K-1" or "all" (every case in training, none in
    validation)."""
    name = check_fold(fold, fold_names(splits))
    if name == ALL_FOLDS:
        every_case = sorted({case for split in splits for part in ("train", "val") for case in split[part]})
        return every_case, []
    return list(splits[int(name)]["train"]), list(splits[int(name)]["val"])
