"""What a CT in Hounsfield units looks like, what a label map looks like, and what grid a CT can have.

One definition each, asked by every stage that must tell a CT from something else: preprocessing refuses an
unlabelled image that is not in HU, the importer warns about one, and ``covnet_predict`` skips label maps and
refuses non-CT images and implausible grids before it spends minutes on them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from covnet.image.cropping import BODY_THRESHOLD_HU
from covnet.image.grid import compute_new_shape

# A chest CT's body (soft tissue, bone: above BODY_THRESHOLD_HU) fills tens of percent of its voxels (31.6% in
# ../shared/data/real_ct's 512×512×141 chest CT). Below this share there is no body to segment: an empty or
# all-air scan, where the network would still find "lungs" in the air.
MIN_BODY_FRACTION = 0.001
# Label maps (covnet's hold 4 values; multi-structure masks a few tens) against images: a CT has thousands of
# HU levels and a 0-255 export about a hundred or more.
MAX_LABEL_MAP_VALUES = 32
# Every 97th voxel is looked at first: an image with more distinct values than a label map shows it there.
_SAMPLE_STRIDE = 97

# The grid of a CT that can be segmented. Fewer than 8 voxels along an axis is not a volume but a scout, a single
# slab or a 2D image saved as 3D: even at 10 mm slices 8 of them cover only 8 cm, a third of the lungs' height,
# and the network's first three poolings would leave one voxel. Clinical CT spacings are 0.2-1 mm in-plane and
# 0.5-10 mm between slices (covnet's small phantoms go up to 16 mm); outside 0.1-20 mm the header's unit or
# spacing is wrong, and resampling it to the plan's spacing would make a grid of absurd size (a 100³ image
# said to be at 50 mm becomes over 10⁸ voxels on a 1 mm grid).
MIN_VOXELS_PER_AXIS = 8
SPACING_RANGE_MM = (0.1, 20.0)
# Resampled to the plan's spacing, a case is held as one float32 array per class several times over during
# prediction: 2·10⁸ voxels are 3.2 GB per copy of 4 class maps. A 512×512×1000 chest-abdomen CT at 0.6 mm
# resampled to 1 × 0.8 × 0.8 mm is 1.2·10⁸, so this refuses only grids no CT has.
MAX_RESAMPLED_VOXELS = 200_000_000


def is_ct_channel(channel_name: str) -> bool:
    """Whether a dataset's channel name (dataset.json's ``channel_names``) says the images are CTs in HU."""
    return channel_name.strip().upper() == "CT"


def not_hu_reason(values: np.ndarray) -> str | None:
    """Why ``values`` do not look like a CT in HU, or None when they do: a constant image, one with nothing
    below 0 (e.g. a 0–255 windowed export, which CT normalization would turn into a near-constant), or one with
    (almost) nothing above air (no body in it)."""
    low, high = float(values.min()), float(values.max())
    if low == high:
        return f"every voxel is {low:g}; a constant image is not a CT"
    if low >= 0.0:
        return (f"intensities span [{low:g}, {high:g}]; this does not look like HU (a CT in Hounsfield units has "
                "air near -1000; a windowed export such as 0-255 has nothing below 0)")
    body = np.count_nonzero(values > BODY_THRESHOLD_HU) / values.size
    if body < MIN_BODY_FRACTION:
        return (f"only {100 * body:.2g}% of the voxels are above {BODY_THRESHOLD_HU:g} HU: there is no body in this "
                f"image (all air; a chest CT has tens of percent of soft tissue and bone)")
    return None


def _distinct_values(values: np.ndarray, limit: int) -> np.ndarray | None:
    """The distinct values of ``values``, or None when there are more than ``limit``."""
    flat = values.reshape(-1)
    found = np.unique(flat[::_SAMPLE_STRIDE])
    if len(found) > limit:
        return None
    rest = flat[~np.isin(flat, found)]
    if rest.size:
        found = np.union1d(found, np.unique(rest))
    return found if len(found) <= limit else None


def label_map_reason(values: np.ndarray) -> str | None:
    """Why ``values`` look like a label map (a segmentation, e.g. covnet's own output) rather than an image, or
    None. Float pixels never are (a CT stored with a rescale slope reads as float, and is an image); integer
    pixels are when nothing is negative (a CT's air is -1000 HU) and there are 2 to ``MAX_LABEL_MAP_VALUES``
    distinct values. Cheap for a CT: its negative minimum ends the check."""
    if values.dtype.kind not in "iub" or values.size == 0 or values.min() < 0:
        return None
    distinct = _distinct_values(values, MAX_LABEL_MAP_VALUES)
    if distinct is None or len(distinct) < 2:
        return None
    shown = ", ".join(str(int(value)) for value in distinct[:8]) + (", ..." if len(distinct) > 8 else "")
    return (f"is a label map, not a CT ({values.dtype} with only {len(distinct)} distinct values: {shown})")


def grid_problem(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> str | None:
    """Why a CT of ``shape`` and ``spacing`` (mm), both (z, y, x) in the plan's canonical frame, cannot be
    segmented on a plan of ``target_spacing``, or None: see the constants above for each limit and its reason."""
    names = ("z", "y", "x")
    thin = [f"{names[axis]} {size}" for axis, size in enumerate(shape) if size < MIN_VOXELS_PER_AXIS]
    if thin:
        return (f"has only {', '.join(thin)} voxels (shape z, y, x {list(shape)}); a CT volume needs at least "
                f"{MIN_VOXELS_PER_AXIS} along each axis (fewer is a scout, a single slab or a 2D image)")
    low, high = SPACING_RANGE_MM
    odd = [f"{names[axis]} {value:g} mm" for axis, value in enumerate(spacing) if not low <= value <= high]
    if odd:
        return (f"has spacing {', '.join(odd)}, outside the {low:g}-{high:g} mm of any CT; check the header's "
                f"spacing and unit")
    resampled = compute_new_shape(shape, spacing, target_spacing)
    voxels = int(np.prod(resampled, dtype=np.int64))
    if voxels > MAX_RESAMPLED_VOXELS:
        extent = " × ".join(f"{size * step:.0f}" for size, step in zip(shape, spacing))
        return (f"covers {extent} mm, which on the model's {' × '.join(f'{s:g}' for s in target_spacing)} mm grid "
                f"is {voxels / 1e6:.0f} M voxels (limit {MAX_RESAMPLED_VOXELS / 1e6:.0f} M); check the header's "
                f"spacing, or crop the scan")
    return None
