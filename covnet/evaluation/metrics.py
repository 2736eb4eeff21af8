"""Overlap and surface metrics on boolean (z, y, x) masks with voxel spacing (z, y, x) in mm.

Surface definition used throughout: a mask's *surface* is its set of border voxels, i.e. foreground
voxels with at least one 6-connected (face) neighbour in the background, where anything outside the
array counts as background. Distances are Euclidean distances between voxel centres in physical mm.
Each surface voxel carries the same weight (a voxel count, not a surface-area estimate as in the
surfel-based implementation of Nikolov et al.).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from covnet.image.grid import bounding_box

# A distance that equals the tolerance counts as "within"; the slack absorbs rounding in products like
# 3 * 0.7 so that a tie is not decided by the last bit.
_TIE_SLACK = 1e-9

_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def _check_pair(prediction: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction, reference = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    if prediction.ndim != 3:
        raise ValueError(f"masks must be 3D (z, y, x), got {prediction.ndim}D")
    return prediction, reference


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")
    return spacing


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """2|P∩R| / (|P| + |R|); NaN when both masks are empty, 0 when exactly one is."""
    prediction, reference = _check_pair(prediction, reference)
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a 6-connected background neighbour (outside the array is background)."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_SIX_CONNECTED, border_value=0)


def surface_distances(prediction: np.ndarray, reference: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each prediction surface voxel to the nearest reference surface voxel, and from
    each reference surface voxel to the nearest prediction surface voxel.

    Both masks must be non-empty (a distance to an empty surface is undefined).
    """
    prediction, reference = _check_pair(prediction, reference)
    if not prediction.any() or not reference.any():
        raise ValueError("surface distances need two non-empty masks")
    return _surface_distances(prediction, reference, _check_spacing(spacing))


def _surface_distances(prediction: np.ndarray, reference: np.ndarray,
                       spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    # Cropping to the smallest box holding both masks changes neither the surfaces (every voxel outside it is
    # background, as is everything outside the array) nor the distances (all surface voxels lie inside it),
    # so the results stay exact without a margin.
    box = tuple(slice(start, stop) for start, stop in bounding_box(prediction | reference))
    prediction_surface = surface_voxels(prediction[box])
    reference_surface = surface_voxels(reference[box])
    # The EDT gives, for every voxel, the distance to the nearest zero, i.e. to the nearest surface voxel.
    distance_to_reference = ndimage.distance_transform_edt(~reference_surface, sampling=spacing)
    distance_to_prediction = ndimage.distance_transform_edt(~prediction_surface, sampling=spacing)
    return distance_to_reference[prediction_surface], distance_to_prediction[reference_surface]


def normalized_surface_dice(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                            tolerance_mm: float) -> float:
    """Normalized surface Dice (Nikolov et al. 2018; Ma et al. 2020).

    The fraction of all surface voxels of both masks (surface as defined in the module docstring) whose
    centre lies within ``tolerance_mm`` (inclusive) of the nearest surface-voxel centre of the other mask:
    ``(#{p: d(p, ∂R) <= τ} + #{r: d(r, ∂P) <= τ}) / (|∂P| + |∂R|)``.
    NaN when both masks are empty, 0 when exactly one is.
    """
    prediction, reference = _check_pair(prediction, reference)
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance must be a non-negative number of mm, got {tolerance_mm}")
    has_prediction, has_reference = bool(prediction.any()), bool(reference.any())
    if not has_prediction and not has_reference:
        return float("nan")
    if not has_prediction or not has_reference:
        return 0.0
    prediction_to_reference, reference_to_prediction = _surface_distances(prediction, reference,
                                                                          _check_spacing(spacing))
    limit = tolerance_mm * (1.0 + _TIE_SLACK) + _TIE_SLACK
    within = int((prediction_to_reference <= limit).sum()) + int((reference_to_prediction <= limit).sum())
    return within / (prediction_to_reference.size + reference_to_prediction.size)


__all__ = ["dice", "normalized_surface_dice", "surface_distances", "surface_voxels"]
