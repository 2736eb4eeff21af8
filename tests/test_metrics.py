import math

import numpy as np
import pytest
from scipy import ndimage

from covnet.evaluation.metrics import dice, normalized_surface_dice, surface_distances, surface_voxels

SPACING = (3.0, 0.7, 1.1)
SHAPE = (10, 12, 14)


def random_blob(seed: int, shape=SHAPE, threshold: float = 0.55) -> np.ndarray:
    """A smooth random blob (Gaussian-filtered noise, thresholded) that may touch the array border."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), sigma=1.5)
    return field > np.quantile(field, threshold)


def brute_force_surface(mask: np.ndarray) -> np.ndarray:
    """Coordinates (voxel indices) of foreground voxels with a face neighbour in background or outside."""
    points = []
    depth, height, width = mask.shape
    for z in range(depth):
        for y in range(height):
            for x in range(width):
                if not mask[z, y, x]:
                    continue
                for dz, dy, dx in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
                    nz, ny, nx = z + dz, y + dy, x + dx
                    outside = not (0 <= nz < depth and 0 <= ny < height and 0 <= nx < width)
                    if outside or not mask[nz, ny, nx]:
                        points.append((z, y, x))
                        break
    return np.array(points, dtype=float).reshape(-1, 3)


def brute_force_nsd(prediction, reference, spacing, tolerance) -> float:
    prediction_points = brute_force_surface(prediction) * np.asarray(spacing)
    reference_points = brute_force_surface(reference) * np.asarray(spacing)
    pairwise = np.sqrt(((prediction_points[:, None, :] - reference_points[None, :, :]) ** 2).sum(axis=-1))
    within = (pairwise.min(axis=1) <= tolerance).sum() + (pairwise.min(axis=0) <= tolerance).sum()
    return within / (len(prediction_points) + len(reference_points))


def test_dice_known_values():
    reference = np.zeros((4, 4, 4), bool)
    reference[0, 0, :4] = True  # 4 voxels
    prediction = np.zeros_like(reference)
    prediction[0, 0, 2:4] = True  # 2 voxels, both inside the reference
    prediction[3, 3, 3] = True  # 1 voxel outside
    assert dice(prediction, reference) == pytest.approx(2 * 2 / (3 + 4))
    assert dice(reference, reference) == 1.0
    disjoint = np.zeros_like(reference)
    disjoint[2, 2, 2] = True
    assert dice(disjoint, reference) == 0.0


def test_dice_empty_cases():
    empty = np.zeros((3, 3, 3), bool)
    full = np.ones((3, 3, 3), bool)
    assert math.isnan(dice(empty, empty))
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0


def test_dice_rejects_different_shapes():
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))


def test_surface_matches_brute_force():
    mask = random_blob(3)
    fast = np.argwhere(surface_voxels(mask)).astype(float)
    assert np.array_equal(fast, brute_force_surface(mask))
    # A solid 3x3x3 cube has 26 surface voxels: all but its centre.
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert surface_voxels(cube).sum() == 26 and not surface_voxels(cube)[2, 2, 2]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("tolerance", [0.5, 1.05, 1.8, 3.45, 5.0])
def test_nsd_matches_brute_force_on_anisotropic_blobs(seed, tolerance):
    reference = random_blob(100 + seed)
    prediction = random_blob(200 + seed, threshold=0.6)
    assert reference.any() and prediction.any() and not np.array_equal(reference, prediction)
    expected = brute_force_nsd(prediction, reference, SPACING, tolerance)
    assert normalized_surface_dice(prediction, reference, SPACING, tolerance) == pytest.approx(expected, abs=1e-9)


def test_nsd_brute_force_values_are_informative():
    # Guard against a comparison that passes only because every value is 0 or 1.
    reference, prediction = random_blob(100), random_blob(200, threshold=0.6)
    values = [brute_force_nsd(prediction, reference, SPACING, t) for t in (0.5, 1.8, 5.0)]
    assert 0 < values[0] < values[1] < values[2] <= 1 and values[0] < 0.9


def test_nsd_on_small_blobs_inside_a_large_volume_matches_brute_force():
    # Masks far from the array border exercise the bounding-box crop; outside the small box is background
    # in both settings, so the brute force on the small box must give the same value.
    box = (slice(20, 30), slice(30, 42), slice(40, 54))
    reference = np.zeros((40, 60, 70), bool)
    prediction = np.zeros_like(reference)
    reference[box], prediction[box] = random_blob(7), random_blob(8)
    expected = brute_force_nsd(random_blob(8), random_blob(7), SPACING, 2.0)
    assert 0 < expected < 1
    assert normalized_surface_dice(prediction, reference, SPACING, 2.0) == pytest.approx(expected, abs=1e-9)


def test_nsd_identical_masks_is_one():
    mask = random_blob(5)
    assert normalized_surface_dice(mask, mask, SPACING, 0.0) == 1.0


def test_nsd_shift_by_one_slice_along_z():
    reference = np.zeros((12, 10, 10), bool)
    reference[3:8, 2:8, 2:8] = True
    prediction = np.roll(reference, 1, axis=0)
    below = normalized_surface_dice(prediction, reference, SPACING, SPACING[0] - 0.1)
    assert 0 < below < 1
    assert normalized_surface_dice(prediction, reference, SPACING, SPACING[0]) == 1.0  # inclusive tolerance
    assert normalized_surface_dice(prediction, reference, SPACING, SPACING[0] + 0.1) == 1.0
    # Below the z spacing only the top and bottom faces fail: the side walls overlap in 4 of 5 slices.
    assert below == pytest.approx(brute_force_nsd(prediction, reference, SPACING, SPACING[0] - 0.1), abs=1e-9)
    # The same shift along x (1.1 mm) is already within a 1.2 mm tolerance.
    shifted_x = np.roll(reference, 1, axis=2)
    assert normalized_surface_dice(shifted_x, reference, SPACING, 1.2) == 1.0
    assert normalized_surface_dice(shifted_x, reference, SPACING, 1.0) < 1.0
    # A tie that floating point would break (3 * 1.1 mm = 3.3000000000000003) still counts as within.
    assert normalized_surface_dice(np.roll(reference, 3, axis=2), reference, SPACING, 3.3) == 1.0


def test_nsd_empty_cases():
    empty = np.zeros(SHAPE, bool)
    blob = random_blob(1)
    assert math.isnan(normalized_surface_dice(empty, empty, SPACING, 1.0))
    assert normalized_surface_dice(empty, blob, SPACING, 1.0) == 0.0
    assert normalized_surface_dice(blob, empty, SPACING, 100.0) == 0.0


def test_surface_distances_are_physical():
    reference = np.zeros((6, 6, 6), bool)
    reference[1, 1, 1] = True
    prediction = np.zeros_like(reference)
    prediction[3, 1, 2] = True  # 2 slices along z and 1 voxel along x away
    to_reference, to_prediction = surface_distances(prediction, reference, SPACING)
    expected = math.hypot(2 * SPACING[0], SPACING[2])
    assert to_reference.tolist() == pytest.approx([expected]) and to_prediction.tolist() == pytest.approx([expected])


def test_nsd_rejects_bad_spacing_and_tolerance():
    blob = random_blob(2)
    with pytest.raises(ValueError):
        normalized_surface_dice(blob, blob, (1.0, 0.0, 1.0), 1.0)
    with pytest.raises(ValueError):
        normalized_surface_dice(blob, blob, SPACING, -1.0)
