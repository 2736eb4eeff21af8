"""Clean-up of a predicted lung/infection segmentation with connected components.

Two rules, applied by :func:`postprocess` in this order:

1. :func:`remove_infection_outside_lungs`: infection can only exist inside a lung. Components of the union
   "lung ∪ infection" that contain no lung voxel at all (pure infection, e.g. a false positive in the bowel
   or the other side of the diaphragm) are set to background. Infection that touches a lung, even only by
   an edge or a corner with the default 26-connectivity, stays.
2. :func:`keep_largest_lung_components`: a chest CT holds (at most) two lungs. Of the components of
   "lung ∪ infection" the ``num_lung_components`` largest are kept, and of those only the ones at least
   ``min_fraction_of_largest`` the size of the largest; the rest (stray blobs in the airway, bowel gas,
   outside the body) become background. Lungs that touch each other form one component, so in that case the
   second largest component is usually a small stray blob: the size fraction drops it.

Infection is removed first so that a large false-positive infection blob cannot take the place of a lung.

A third rule, :func:`assign_lung_sides`, makes left and right a matter of position rather than of the
network's opinion: in the canonical (LPS) frame the patient's left lies towards higher indices along
``LEFT_RIGHT_AXIS``, so each lung component gets the side of the body's midline its centroid lies on. A
component with a large share of its voxels on each side (two lungs that touch, e.g. at the anterior junction
line) is cut at the midline. Infection keeps its label: the report assigns it to the nearest lung. The midline
must be one the caller can trust (``covnet.inference.predictor.lungs_by_midline`` checks it, with
:func:`lungs_on_both_sides` where the body reaches the image's sides).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from acvl_utils.morphology.morphology_helper import cc3d_label_with_component_sizes

from covnet.dataset import INFECTION, LEFT_LUNG, RIGHT_LUNG
from covnet.image.grid import bounding_box
from covnet.image.orientation import LEFT_RIGHT_AXIS
from covnet.planning.plans import Plan

FULL_CONNECTIVITY = 26
# A lung component with at least this share of its voxels on each side of the midline is two touching lungs
# (the smaller lung is about 45% of both); one lung reaching over the midline (the anterior junction, a shifted
# mediastinum) has a few percent there and stays whole on its centroid's side.
TWO_LUNGS_MIN_SHARE_PER_SIDE = 0.2


def _lung_and_infection_labels(lung_labels: Sequence[int], infection_label: int | None) -> list[int]:
    return list(lung_labels) + ([] if infection_label is None else [infection_label])


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Component ids of ``mask`` (0 outside) and the voxel count of each id (index 0 unused, 0)."""
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    component_ids, sizes_by_id = cc3d_label_with_component_sizes(np.ascontiguousarray(mask), connectivity)
    sizes = np.zeros(len(sizes_by_id) + 1, dtype=np.int64)
    for component, size in sizes_by_id.items():
        sizes[component] = size
    return component_ids, sizes


def remove_infection_outside_lungs(segmentation: np.ndarray, lung_labels: Sequence[int] = (1, 2),
                                   infection_label: int | None = 3,
                                   connectivity: int = FULL_CONNECTIVITY) -> np.ndarray:
    """A copy of ``segmentation`` without infection that is not connected to any lung voxel.

    Connection is judged on the union of lung and infection labels: an infection voxel survives when its
    component of that union contains at least one lung voxel. ``infection_label=None`` returns a plain copy.
    """
    cleaned = np.array(segmentation, copy=True)
    if infection_label is None:
        return cleaned
    infection = cleaned == infection_label
    if not infection.any():
        return cleaned
    component_ids, sizes = _components(np.isin(cleaned, _lung_and_infection_labels(lung_labels, infection_label)),
                                       connectivity)
    lung_voxels_per_component = np.bincount(component_ids[np.isin(cleaned, list(lung_labels))].ravel(),
                                            minlength=len(sizes))
    touches_lung = lung_voxels_per_component > 0
    cleaned[infection & ~touches_lung[component_ids]] = 0
    return cleaned


def keep_largest_lung_components(segmentation: np.ndarray, lung_labels: Sequence[int] = (1, 2),
                                 infection_label: int | None = 3, num_lung_components: int = 2,
                                 min_fraction_of_largest: float = 0.1,
                                 connectivity: int = FULL_CONNECTIVITY) -> np.ndarray:
    """A copy of ``segmentation`` keeping only the largest components of "lung ∪ infection".

    A component is kept when it is among the ``num_lung_components`` largest and has at least
    ``min_fraction_of_largest`` times the voxels of the largest one (ties in size keep the lower component id,
    i.e. the one met first in (z, y, x) order). Every label inside a kept component is unchanged; voxels of
    removed components become 0. Labels other than the lung and infection labels are never touched.
    """
    if num_lung_components < 1:
        raise ValueError(f"num_lung_components must be at least 1, got {num_lung_components}")
    cleaned = np.array(segmentation, copy=True)
    foreground = np.isin(cleaned, _lung_and_infection_labels(lung_labels, infection_label))
    if not foreground.any():
        return cleaned
    component_ids, sizes = _components(foreground, connectivity)
    by_size = np.argsort(-sizes[1:], kind="stable") + 1
    largest_size = sizes[by_size[0]]
    keep = np.zeros(len(sizes), dtype=bool)
    for component in by_size[:num_lung_components]:
        if sizes[component] >= min_fraction_of_largest * largest_size:
            keep[component] = True
    cleaned[foreground & ~keep[component_ids]] = 0
    return cleaned


def postprocess(segmentation: np.ndarray, lung_labels: Sequence[int] = (1, 2), infection_label: int | None = 3,
                num_lung_components: int = 2, min_fraction_of_largest: float = 0.1,
                connectivity: int = FULL_CONNECTIVITY) -> np.ndarray:
    """Remove infection not connected to a lung, then keep the largest lung components (see module doc)."""
    without_stray_infection = remove_infection_outside_lungs(segmentation, lung_labels, infection_label,
                                                             connectivity)
    return keep_largest_lung_components(without_stray_infection, lung_labels, infection_label,
                                        num_lung_components, min_fraction_of_largest, connectivity)


def postprocess_segmentation(segmentation: np.ndarray, plan: Plan) -> np.ndarray:
    """:func:`postprocess` with the plan's lung and infection labels, for datasets with COVID labels (others are
    returned unchanged)."""
    labels = plan.labels
    lungs = [labels[name] for name in (LEFT_LUNG, RIGHT_LUNG) if name in labels]
    if not lungs:
        return segmentation
    return postprocess(segmentation, lung_labels=lungs, infection_label=labels.get(INFECTION))


def _voxels_per_position(component_ids: np.ndarray, num_ids: int, axis: int) -> np.ndarray:
    """``counts[c, i]``: voxels of component ``c`` at index ``i`` along ``axis``, one plane at a time (no array of
    coordinates as large as the image)."""
    planes = np.moveaxis(component_ids, axis, 0)
    return np.stack([np.bincount(plane.ravel(), minlength=num_ids) for plane in planes], axis=1)


class _LungComponents(NamedTuple):
    """The components of a lung mask inside its bounding box ``box``, and where they lie along the lateral axis."""
    box: tuple[slice, ...]
    ids: np.ndarray               # component id of each voxel of the box (0 outside the lungs)
    sizes: np.ndarray             # voxels per id (index 0 unused, 0)
    counts: np.ndarray            # counts[c, i]: voxels of component c at lateral position positions[i]
    positions: np.ndarray         # the box's lateral positions, as indices of the whole image
    centroids: np.ndarray         # each component's mean lateral position


def _lung_components(lungs: np.ndarray, lateral_axis: int, connectivity: int) -> _LungComponents:
    box = tuple(slice(start, stop) for start, stop in bounding_box(lungs))
    ids, sizes = _components(lungs[box], connectivity)
    counts = _voxels_per_position(ids, len(sizes), lateral_axis)
    positions = np.arange(box[lateral_axis].start, box[lateral_axis].stop)
    return _LungComponents(box, ids, sizes, counts, positions, counts @ positions / np.maximum(sizes, 1))


def lungs_on_both_sides(segmentation: np.ndarray, midline: float, lung_labels: Sequence[int] = (1, 2),
                        lateral_axis: int = LEFT_RIGHT_AXIS, connectivity: int = FULL_CONNECTIVITY) -> bool:
    """Whether the lungs are (at least) two separate components, one on each side of ``midline``: each side holds
    the centroid of a component of at least ``TWO_LUNGS_MIN_SHARE_PER_SIDE`` of the lung voxels. A single lung (a
    crop to one lung), or two lungs that touch, is not."""
    lungs = np.isin(segmentation, lung_labels)
    if not lungs.any():
        return False
    components = _lung_components(lungs, lateral_axis, connectivity)
    large = components.sizes >= TWO_LUNGS_MIN_SHARE_PER_SIDE * components.sizes.sum()
    on_left = components.centroids > midline
    return bool(np.any(large & on_left) and np.any(large & ~on_left))


def assign_lung_sides(segmentation: np.ndarray, midline: float, left_label: int = 1, right_label: int = 2,
                      lateral_axis: int = LEFT_RIGHT_AXIS, connectivity: int = FULL_CONNECTIVITY) -> tuple[np.ndarray, float]:
    """A copy of a canonical-frame ``segmentation`` whose lung labels follow the body's ``midline``, and the share
    of the lung voxels whose label changed.

    ``midline`` is a position (in voxels, fractional) along ``lateral_axis``, along which indices increase
    towards the patient's left. Each component of "left ∪ right lung" (whatever the network called its voxels)
    becomes ``left_label`` when its centroid lies beyond the midline, else ``right_label``; a component with at
    least ``TWO_LUNGS_MIN_SHARE_PER_SIDE`` of its voxels on each side is split at the midline instead. Other
    labels, infection included, are never touched.
    """
    fixed = np.array(segmentation, copy=True)
    lungs = np.isin(fixed, (left_label, right_label))
    if not lungs.any():
        return fixed, 0.0
    components = _lung_components(lungs, lateral_axis, connectivity)
    lungs_in_box, labels_in_box = lungs[components.box], fixed[components.box]
    on_left = components.positions > midline
    left_share = components.counts[:, on_left].sum(axis=1) / np.maximum(components.sizes, 1)
    side_of_component = np.where(components.centroids > midline, left_label, right_label)
    split = np.minimum(left_share, 1 - left_share) >= TWO_LUNGS_MIN_SHARE_PER_SIDE
    by_position = np.where(on_left, left_label, right_label).reshape(
        [-1 if axis == lateral_axis else 1 for axis in range(fixed.ndim)])
    ids = components.ids[lungs_in_box]
    assigned = np.where(split[ids], np.broadcast_to(by_position, lungs_in_box.shape)[lungs_in_box],
                        side_of_component[ids]).astype(fixed.dtype)
    relabelled = np.count_nonzero(assigned != labels_in_box[lungs_in_box])
    labels_in_box[lungs_in_box] = assigned
    return fixed, relabelled / np.count_nonzero(lungs_in_box)
