"""The lung box: the air-filled lungs found by their intensity, and the full-resolution sliding window covering only
them (plus a margin) instead of the whole body box.

Why: lungs and infection lie inside the lungs, yet the body box preprocessing crops to also holds the neck,
shoulders, mediastinal soft tissue and abdomen that a chest CT scans; every window over them is network time for
background (BENCHMARKS.md, "Fast prediction on the CPU", measures the share).

How: not a network. covnet's first lung box was the same network on a 4× coarser grid (a cascade in the spirit of
nnU-Net's ``3d_lowres`` without a second network); a trained network does not recognise lungs four times smaller
than it was trained on, and on 7 of 12 test phantoms its box cut off lung that the full prediction found. Air is
certain: on the preprocessed CT, voxels darker than ``air_hu`` (-400 HU, between aerated lung at about -850 and
soft tissue) are air; air connected to the border of its axial slice lies outside the body; the rest, grouped in
3D, keeps its large components (those of at least ``min_share`` of the largest: the lungs and airways, not bowel
gas). Their box is widened left-right to its mirror image about the body's middle (a lung without air, a
white-out or a collapse, lies opposite an aerated one) and grows on every side by ``margin_mm`` (consolidation
denser than -400 HU at the edge of the aerated lung) or by half a patch if that is more (context for
the windows at the edge). When no air is found, or the CT's normalisation cannot tell -400 HU apart, the whole
image is predicted.

Outside the box the probabilities are those of certain background (1 for label 0), which is what the full
prediction's argmax says there whenever the box holds all the lung it finds (tests/test_lung_box.py and
benchmarks/fast_predict.py check this on trained phantoms).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from covnet.image.ct import is_ct_channel
from covnet.image.grid import bounding_box
from covnet.image.orientation import LEFT_RIGHT_AXIS
from covnet.planning.plans import CT_SCHEME, Plan

Region = tuple[slice, slice, slice]
# In-plane connectivity only: air is 'outside' when it reaches the border of its own axial slice (the airway that
# leaves the top slice does not make the lungs outside air).
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = True


@dataclass(frozen=True)
class LungBoxSettings:
    margin_mm: float = 20.0          # added to the air's box on every side, in mm
    air_hu: float = -400.0           # darker than this is air
    min_share: float = 0.05          # air components smaller than this share of the largest are left out
    # Grow by half the training patch where that is more than the margin (context for the windows at the edge).
    half_patch: bool = True

    def __post_init__(self):
        if not self.margin_mm >= 0:
            raise ValueError(f"margin_mm must be 0 or more, got {self.margin_mm}")
        if not 0 < self.min_share <= 1:
            raise ValueError(f"min_share must be in (0, 1], got {self.min_share}")


def air_threshold(plan: Plan, air_hu: float) -> tuple[int, float] | None:
    """(channel, the normalised value of ``air_hu``) of the plan's first CT channel; None when there is none or
    its normalisation clips ``air_hu`` away."""
    for channel, name in sorted(plan.channel_names.items()):
        scheme = plan.normalization.get(channel)
        if is_ct_channel(name) and scheme is not None and scheme.name == CT_SCHEME:
            low, high = scheme.clip
            if low < air_hu < high:
                return int(channel), (air_hu - scheme.mean) / scheme.std
    return None


def outside_air(air: np.ndarray) -> np.ndarray:
    """The air around the body: the in-plane components of ``air`` (z, y, x) that reach their slice's border."""
    slices, _ = ndimage.label(air, structure=_IN_PLANE)
    border = np.concatenate([slices[:, 0].ravel(), slices[:, -1].ravel(), slices[:, :, 0].ravel(),
                             slices[:, :, -1].ravel()])
    return np.isin(slices, np.unique(border[border > 0]))


def inner_air(air: np.ndarray, min_share: float, outside: np.ndarray | None = None) -> np.ndarray:
    """The air inside the body: ``air`` (z, y, x) without the air around it (``outside``, computed when not
    given), and without the 3D components smaller than ``min_share`` of the largest."""
    inside = air & ~(outside_air(air) if outside is None else outside)
    components, count = ndimage.label(inside, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return inside
    sizes = np.bincount(components.ravel())[1:]
    kept = np.flatnonzero(sizes >= min_share * sizes.max()) + 1
    return np.isin(components, kept)


def mirrored_about_body(box: list[tuple[int, int]], body: np.ndarray) -> list[tuple[int, int]]:
    """``box`` widened along the left-right axis to its mirror image about the body's middle, so that a lung
    without air (a white-out, a collapse) lies in the box when the other lung does."""
    if not body.any():
        return box
    low, high = bounding_box(body)[LEFT_RIGHT_AXIS]
    start, stop = box[LEFT_RIGHT_AXIS]
    size = body.shape[LEFT_RIGHT_AXIS]
    widened = list(box)
    widened[LEFT_RIGHT_AXIS] = (max(0, min(start, low + high - stop)), min(size, max(stop, low + high - start)))
    return widened


def grown_region(box: Sequence[tuple[int, int]], shape: Sequence[int], spacing: Sequence[float], margin_mm: float,
                 patch: Sequence[int], *, half_patch: bool = True) -> Region:
    """``box`` grown on every side by ``margin_mm`` (or half the training ``patch`` with ``half_patch``, where
    that is larger) and, centred, to at least one patch, clipped to ``shape``. The half patch is context: a
    window at the region's edge then still sees what lies beyond the lungs (BENCHMARKS.md, "Fast prediction on the
    CPU", measures what it buys)."""
    region = []
    for (start, stop), size, axis_spacing, patch_size in zip(box, shape, spacing, patch):
        margin = max(math.ceil(margin_mm / axis_spacing), int(patch_size) // 2 if half_patch else 0)
        low, high = max(0, start - margin), min(size, stop + margin)
        wanted = min(int(patch_size), size)
        if high - low < wanted:
            low = min(max(0, round((low + high - wanted) / 2)), size - wanted)
            high = low + wanted
        region.append(slice(low, high))
    return tuple(region)


def find_lung_region(image: np.ndarray | torch.Tensor, plan: Plan, settings: LungBoxSettings, *,
                     patch_size: Sequence[int]) -> Region | None:
    """The region of the (C, z, y, x) preprocessed ``image`` that the sliding window needs (module doc), or None
    (the whole image) when no air is found."""
    threshold = air_threshold(plan, settings.air_hu)
    if threshold is None:
        return None
    channel, value = threshold
    air = np.asarray(image[channel]) < value
    outside = outside_air(air)
    lungs = inner_air(air, settings.min_share, outside)
    if not lungs.any():
        return None
    box = mirrored_about_body(list(bounding_box(lungs)), ~outside)
    return grown_region(box, lungs.shape, plan.target_spacing, settings.margin_mm, patch_size,
                        half_patch=settings.half_patch)


def region_fraction(region: Region | None, shape: Sequence[int]) -> float:
    """The share of the image's voxels inside ``region`` (1 for the whole image)."""
    if region is None:
        return 1.0
    return math.prod(part.stop - part.start for part in region) / math.prod(shape)
