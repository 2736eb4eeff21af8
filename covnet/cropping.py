"""Finding the body in a CT, so that planning, preprocessing and inference all crop the same way.

nnU-Net crops to the non-zero region, which does nothing for CT (air is −1000 HU, not 0). covnet crops
to the body instead: voxels above ``BODY_THRESHOLD_HU`` that belong to the largest connected component
(this drops the table and padding outside the field of view), found on a 2× subsampled grid for speed.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_THRESHOLD_HU = -500.0
# One subsampled voxel of slack on each side, because the search runs on a 2× coarser grid.
_SUBSAMPLING = 2


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def body_bounding_box(image: np.ndarray, label: np.ndarray | None = None,
                      threshold: float = BODY_THRESHOLD_HU) -> tuple[tuple[int, int], ...]:
    """``((z0, z1), (y0, y1), (x0, x1))`` of the body (and of every labelled voxel, if a label is given).

    An image with no voxel above the threshold (not a CT in HU, or an empty scan) keeps its full extent.
    """
    coarse = image[::_SUBSAMPLING, ::_SUBSAMPLING, ::_SUBSAMPLING] > threshold
    starts, stops = np.zeros(3, dtype=int), np.array(image.shape)
    if coarse.any():
        body = _largest_component(coarse)
        coordinates = np.nonzero(body.any(axis=(1, 2))), np.nonzero(body.any(axis=(0, 2))), np.nonzero(body.any(axis=(0, 1)))
        starts = np.array([c[0][0] for c in coordinates]) * _SUBSAMPLING - _SUBSAMPLING
        stops = (np.array([c[0][-1] for c in coordinates]) + 2) * _SUBSAMPLING
        starts, stops = np.maximum(starts, 0), np.minimum(stops, image.shape)
    if label is not None and np.any(label):
        for axis in range(3):
            other_axes = tuple(a for a in range(3) if a != axis)
            present = np.nonzero(np.any(label, axis=other_axes))[0]
            starts[axis] = min(starts[axis], present[0])
            stops[axis] = max(stops[axis], present[-1] + 1)
    return tuple((int(a), int(b)) for a, b in zip(starts, stops))

