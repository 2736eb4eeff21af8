"""One canonical orientation for every case: the array axes (z, y, x) run towards patient Superior,
Posterior and Left (DICOM/ITK "LPS", the identity direction).

The labels are lateral (left lung 1, right lung 2): a scan stored with flipped or swapped axes would
otherwise put its left lung on the other side of the array than every other case. Only axis
permutations and flips are used (the nearest canonical axes for an oblique scan), so the mapping is
exact and its inverse restores the original array bit for bit. Pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# In a canonical (LPS) array the last axis, x, runs from the patient's right to left: mirroring along it
# turns a left lung into a right one.
LEFT_RIGHT_AXIS = 2
# Mirroring (training augmentation and test-time) along every array axis, as nnU-Net does for 3D configurations.
MIRROR_AXES = (0, 1, 2)


@dataclass(frozen=True)
class Reorientation:
    """Canonical array axis ``i`` is original array axis ``permutation[i]``, reversed where ``flips[i]``."""

    permutation: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flips)

    def shape(self, original_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(original_shape[axis]) for axis in self.permutation)

    def spacing(self, original_spacing: Sequence[float]) -> tuple[float, ...]:
        return tuple(float(original_spacing[axis]) for axis in self.permutation)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Reorient the trailing three axes (leading axes such as channels stay)."""
        lead = array.ndim - 3
        moved = np.transpose(array, tuple(range(lead)) + tuple(lead + axis for axis in self.permutation))
        flip_axes = tuple(lead + axis for axis, flipped in enumerate(self.flips) if flipped)
        return np.ascontiguousarray(np.flip(moved, flip_axes) if flip_axes else moved)

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """The exact inverse of ``to_canonical``."""
        lead = array.ndim - 3
        flip_axes = tuple(lead + axis for axis, flipped in enumerate(self.flips) if flipped)
        unflipped = np.flip(array, flip_axes) if flip_axes else array
        inverse = np.argsort(self.permutation)
        return np.ascontiguousarray(np.transpose(unflipped, tuple(range(lead)) + tuple(lead + int(a) for a in inverse)))

    def to_json(self) -> dict:
        return {"permutation": list(self.permutation), "flips": list(self.flips)}

    @classmethod
    def from_json(cls, data: dict | None) -> "Reorientation":
        if not data:
            return cls()
        return cls(tuple(int(a) for a in data["permutation"]), tuple(bool(f) for f in data["flips"]))


def canonical_reorientation(direction: Sequence[float]) -> Reorientation:
    """From a SimpleITK direction (row-major 3×3; column j is the physical direction of index axis j, x y z)
    to the permutation and flips that make the array LPS-canonical.

    Each index axis goes to the physical axis it is most aligned with; for oblique scans the strongest
    alignments are taken first so the result is always a permutation."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    physical_of_index = [-1, -1, -1]
    sign_of_index = [1.0, 1.0, 1.0]
    taken = np.abs(matrix).copy()
    for _ in range(3):
        physical, index = np.unravel_index(np.argmax(taken), taken.shape)
        physical_of_index[index] = int(physical)
        sign_of_index[index] = float(np.sign(matrix[physical, index]) or 1.0)
        taken[physical, :] = -1.0
        taken[:, index] = -1.0
    permutation, flips = [0, 0, 0], [False, False, False]
    for index in range(3):
        # array axis a holds index axis 2 - a (SimpleITK's x y z is the array's z y x reversed)
        canonical_axis, original_axis = 2 - physical_of_index[index], 2 - index
        permutation[canonical_axis] = original_axis
        flips[canonical_axis] = sign_of_index[index] < 0
    return Reorientation(tuple(permutation), tuple(flips))
