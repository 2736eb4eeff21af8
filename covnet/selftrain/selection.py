"""Which pool cases a round trains on, and turning each into a preprocessed, pseudo-labelled training case.

How many: round r takes ``min(1, r · select_fraction)`` of the pool (ST++: the most reliable half first, then
everything), or ``r · cases_per_round`` cases. Which: the highest ``agreement`` (the members agree on the
scoring structure; whole-case selection as ST++ and the FLARE22 teams do), the highest ``confidence``, or a
seeded random order. With ``refresh`` the round's cases are the best of the whole, freshly labelled pool; without
it a case keeps the labels of the round that took it, and only unused cases are added.

A pseudo-labelled case (``round_NN/pseudo_labels/``) has the layout of ``preprocessed/cases/``: the image is a
symlink to the pool's array (a copy where symlinks fail), the segmentation is the candidate under the round's
label policy, and the properties carry fresh foreground locations for the patch sampler and the provenance.
"""
from __future__ import annotations

import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from covnet.planning.plans import Plan
from covnet.preprocessing.case import sample_class_locations
from covnet.preprocessing.storage import image_file, properties_file, save_array, segmentation_file
from covnet.runtime.atomic import atomic_path, read_json, temporary_sibling, write_json
from covnet.selftrain.candidates import load_candidate
from covnet.selftrain.labels import PseudoLabelPolicy, apply_policy
from covnet.selftrain.settings import SelfTrainingSettings


def target_count(settings: SelfTrainingSettings, round_index: int, pool_size: int) -> int:
    """How many pool cases the students of round ``round_index`` train on in all."""
    if settings.cases_per_round is not None:
        return min(pool_size, round_index * settings.cases_per_round)
    return min(pool_size, math.ceil(min(1.0, round_index * settings.select_fraction) * pool_size))


def ranked(records: dict[str, dict], method: str, *, seed: int, round_index: int) -> list[str]:
    """The cases best first: by agreement (ties, e.g. a single model without mirroring, whose agreement is
    always 1, by confidence) or by confidence, undefined scores last, then by name; or in a random order drawn
    from (seed, round)."""
    cases = sorted(records)
    if method == "random":
        order = np.random.default_rng([seed, round_index]).permutation(len(cases))
        return [cases[index] for index in order]

    def best_first(value) -> float:
        return -value if value is not None and not math.isnan(value) else math.inf
    tie_breaks = ["agreement", "confidence"] if method == "agreement" else ["confidence"]
    return sorted(cases, key=lambda case: (*(best_first(records[case].get(name)) for name in tie_breaks), case))


def choose_cases(records: dict[str, dict], settings: SelfTrainingSettings, *, round_index: int, pool_size: int,
                 kept: Sequence[str], seed: int) -> list[str]:
    """The cases that take this round's labels: with refresh the best of all ``records``; without, the best of
    the records beyond the ``kept`` cases (which keep their earlier labels)."""
    wanted = target_count(settings, round_index, pool_size)
    order = ranked(records, settings.selection, seed=seed, round_index=round_index)
    if settings.refresh:
        return order[:wanted]
    return [case for case in order if case not in kept][:max(0, wanted - len(kept))]


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


def store_pseudo_case(pool_folder: Path, candidates: Path, folder: Path, case: str, plan: Plan,
                      policy: PseudoLabelPolicy, *, round_index: int, seed: int, provenance: dict
                      ) -> dict[int, float]:
    """Write ``case`` as a pseudo-labelled training case into ``folder``; return the share of each class's
    voxels that the policy ignored."""
    folder.mkdir(parents=True, exist_ok=True)
    properties_file(folder, case).unlink(missing_ok=True)
    _link_image(image_file(pool_folder, case), image_file(folder, case))
    candidate = load_candidate(candidates, case)
    segmentation, ignored = apply_policy(candidate.labels, candidate.largest, policy, round_index=round_index,
                                         num_classes=plan.num_classes, ignore_label=plan.ignore_label)
    save_array(segmentation_file(folder, case), segmentation)
    properties = read_json(properties_file(pool_folder, case), "")
    rng = np.random.default_rng([seed, zlib.crc32(case.encode())])
    properties["class_locations"] = sample_class_locations(segmentation, list(plan.foreground_labels.values()), rng)
    properties["pseudo_label"] = {**provenance, "ignored_share": {str(k): v for k, v in ignored.items()}}
    write_json(properties_file(folder, case), properties, indent=None)
    return ignored
