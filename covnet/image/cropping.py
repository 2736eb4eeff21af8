"""Finding the body in a CT, so that planning, preprocessing and inference all crop the same way.

nnU-Net crops to the non-zero region, which does nothing for CT (air is −1000 HU, not 0). covnet crops
to the body instead: voxels above ``BODY_THRESHOLD_HU`` that belong to the largest connected component
(this drops the table and padding outside the field of view), found on a 2× subsampled grid for speed.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from covnet.image.grid import bounding_box

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
        box = np.array(bounding_box(_largest_component(coarse)))
        starts = np.maximum(box[:, 0] * _SUBSAMPLING - _SUBSAMPLING, 0)
        stops = np.minimum(box[:, 1] * _SUBSAMPLING + _SUBSAMPLING, image.shape)
    if label is not None and np.any(label):
        labelled = np.array(bounding_box(label))
        starts, stops = np.minimum(starts, labelled[:, 0]), np.maximum(stops, labelled[:, 1])
    return tuple((int(a), int(b)) for a, b in zip(starts, stops))
