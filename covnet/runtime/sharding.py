"""Splitting a list of cases into parts: one part per process, GPU or machine, the same split everywhere."""
from __future__ import annotations

from typing import Sequence

from covnet.runtime.errors import CovnetError


def part_id_for(num_parts: int | None, part_id: int | None) -> int:
    """``--part-id`` as given, checked against ``--num-parts`` (None: not given). Several parts need a part id:
    a default of 0 would make every machine of a split run do the same cases."""
    if part_id is None:
        if num_parts is not None and num_parts > 1:
            raise CovnetError(None, f"--num-parts {num_parts} needs --part-id (0 .. {num_parts - 1}): the part "
                                    "this run does; start one run per part")
        return 0
    if num_parts is None and part_id != 0:
        raise CovnetError(None, f"--part-id {part_id} needs --num-parts")
    return part_id


def shard(cases: Sequence, num_parts: int = 1, part_id: int = 0, key=lambda item: item.case) -> list:
    """Part ``part_id`` of ``num_parts``: the cases whose index in the list sorted by ``key`` (the case name) is
    ``part_id`` mod ``num_parts``. Shared by ``covnet_predict`` and the self-training's pseudo-labelling."""
    if num_parts < 1:
        raise CovnetError(None, f"--num-parts {num_parts}: must be at least 1")
    if not 0 <= part_id < num_parts:
        raise CovnetError(None, f"--part-id {part_id}: must be between 0 and {num_parts - 1} "
                                f"for --num-parts {num_parts}")
    ordered = sorted(cases, key=key)
    return [case for index, case in enumerate(ordered) if index % num_parts == part_id]
