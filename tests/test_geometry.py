"""Bounding boxes, crop/uncrop, the anisotropy rule and resampling, checked against scipy.ndimage."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from covnet.image.grid import (
    ANISOTROPY_THRESHOLD,
    bounding_box,
    coarse_axis,
    compute_new_shape,
    crop,
    is_anisotropic,
    separate_z_axis,
    uncrop,
)
from covnet.image.resampling import (
    interpolation_matrix,
    resample_image,
    resample_probabilities,
    resample_segmentation,
    source_coordinates,
)


def scipy_reference(volume: np.ndarray, new_shape, order: int) -> np.ndarray:
    """scipy.ndimage.map_coordinates on the pixel-centre grid, edge replicated."""
    axes = [((2 * np.arange(m) + 1) * n - m) / (2 * m) for n, m in zip(volume.shape, new_shape)]
    coordinates = np.meshgrid(*axes, indexing="ij")
    return ndi.map_coordinates(volume.astype(np.float64), coordinates, order=order, mode="nearest")


def smooth_volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32) * 100


# --- bounding boxes -----------------------------------------------------------------------------------

def test_bounding_box_crop_uncrop_round_trip():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(9, 12, 15)).astype(np.float32)
    mask = np.zeros(image.shape, dtype=bool)
    mask[2, 3, 4] = mask[6, 10, 7] = mask[4, 5, 13] = True
    box = bounding_box(mask)
    assert box == ((2, 7), (3, 11), (4, 14))
    cropped = crop(image, box)
    assert cropped.shape == (5, 8, 10)
    assert np.array_equal(cropped, image[2:7, 3:11, 4:14])
    restored = uncrop(cropped, box, image.shape, fill_value=-7.0)
    assert restored.dtype == image.dtype
    assert np.array_equal(restored[2:7, 3:11, 4:14], cropped)
    outside = np.ones(image.shape, dtype=bool)
    outside[2:7, 3:11, 4:14] = False
    assert np.all(restored[outside] == -7.0)
    # Everything nonzero in the mask lies inside the box, so uncrop(crop(mask)) gives the mask back.
    assert np.array_equal(uncrop(crop(mask, box), box, mask.shape), mask)


def test_crop_applies_box_to_trailing_axes_of_channels():
    stack = np.arange(2 * 4 * 5 * 6).reshape(2, 4, 5, 6)
    box = ((1, 3), (0, 5), (2, 4))
    assert np.array_equal(crop(stack, box), stack[:, 1:3, 0:5, 2:4])
    assert np.array_equal(uncrop(crop(stack, box), box, stack.shape)[:, 1:3, :, 2:4], stack[:, 1:3, :, 2:4])


def test_bounding_box_errors():
    with pytest.raises(ValueError):
        bounding_box(np.zeros((3, 4, 5), dtype=bool))
    with pytest.raises(ValueError):
        crop(np.zeros((3, 4, 5)), ((0, 4), (0, 4), (0, 5)))
    with pytest.raises(ValueError):
        uncrop(np.zeros((2, 2, 2)), ((0, 3), (0, 2), (0, 2)), (4, 4, 4))


# --- anisotropy rule ----------------------------------------------------------------------------------

def test_anisotropy_rule():
    assert ANISOTROPY_THRESHOLD == 3.0
    assert not is_anisotropic((2.0, 0.977, 0.977))
    assert is_anisotropic((5.0, 0.7, 0.7))
    assert not is_anisotropic((3.0, 1.0, 1.0))  # strictly greater than the threshold
    assert coarse_axis((5.0, 0.7, 0.7)) == 0
    assert coarse_axis((0.7, 0.7, 5.0)) == 2
    assert coarse_axis((1.25, 1.25, 0.24)) is None  # two coarse axes: no single one to separate
    assert separate_z_axis((5.0, 0.7, 0.7), (1.0, 1.0, 1.0)) == 0  # current spacing decides first
    assert separate_z_axis((1.0, 1.0, 1.0), (1.0, 4.0, 1.0)) == 1  # else the target spacing
    assert separate_z_axis((2.0, 1.0, 1.0), (1.0, 0.8, 0.8)) is None


def test_new_shape_preserves_physical_extent():
    shape, spacing, target = (141, 512, 512), (2.0, 0.9765625, 0.9765625), (1.0, 0.8, 0.8)
    new_shape = compute_new_shape(shape, spacing, target)
    assert new_shape == (282, 625, 625)
    extent_before = np.multiply(shape, spacing)
    extent_after = np.multiply(new_shape, target)
    assert np.all(np.abs(extent_after - extent_before) <= np.asarray(target) / 2)


# --- image resampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("new_shape", [(14, 9, 26), (5, 22, 13), (3, 4, 40)])
@pytest.mark.parametrize("order", [0, 1])
def test_low_orders_match_scipy_on_random_data(new_shape, order):
    image = np.random.default_rng(2).normal(size=(7, 11, 13)).astype(np.float32)
    result = resample_image(image, (1.0, 1.0, 1.0), new_shape=new_shape, order=order, separate_z=False)
    assert result.shape == new_shape and result.dtype == np.float32
    reference = scipy_reference(image, new_shape, order)
    if order == 0:
        assert np.array_equal(result, reference.astype(np.float32))
    else:
        np.testing.assert_allclose(result, reference, atol=1e-5)


def test_order_3_matches_scipy_cubic_spline():
    image = smooth_volume((6, 20, 24))
    new_shape = (13, 15, 50)
    result = resample_image(image, (2.0, 1.0, 1.0), new_shape=new_shape, order=3, separate_z=False,
                            clip_to_input_range=False)
    reference = scipy_reference(image, new_shape, 3)
    scipy_zoom = ndi.zoom(image.astype(np.float64), np.divide(new_shape, image.shape), order=3,
                          mode="nearest", grid_mode=True)
    np.testing.assert_allclose(reference, scipy_zoom, atol=1e-9)  # same grid as scipy's own zoom
    np.testing.assert_allclose(result, reference, atol=1e-3 * np.abs(reference).max())


def test_order_3_overshoot_is_clipped_to_the_input_range():
    image = np.full((4, 12, 12), -1000.0, dtype=np.float32)
    image[:, 4:8, 4:8] = 1000.0  # a sharp edge: the cubic spline rings past both plateaus
    reference = scipy_reference(image, (4, 29, 29), 3)
    assert reference.max() > 1000.5 and reference.min() < -1000.5
    unclipped = resample_image(image, (1, 1, 1), new_shape=(4, 29, 29), clip_to_input_range=False)
    np.testing.assert_allclose(unclipped, reference, atol=0.05)
    clipped = resample_image(image, (1, 1, 1), new_shape=(4, 29, 29))
    np.testing.assert_allclose(clipped, np.clip(reference, -1000, 1000), atol=0.05)


def test_many_tiles_and_downsampling_match_scipy():
    """Axes long enough to be cut into several tiles, shrinking and growing, all three orders."""
    image = smooth_volume((40, 150, 90), seed=3)
    for new_shape in [(90, 61, 200), (17, 151, 33)]:
        for order in (0, 1, 3):
            result = resample_image(image, (1.0, 1.0, 1.0), new_shape=new_shape, order=order, separate_z=False)
            reference = scipy_reference(image, new_shape, order)
            if order == 3:  # the default clips the spline's overshoot to the input range
                reference = np.clip(reference, image.min(), image.max())
            np.testing.assert_allclose(result, reference, atol=2e-3 if order == 3 else 1e-4)


def test_target_spacing_gives_rounded_shape_and_keeps_constants():
    image = np.full((10, 20, 20), 42.0, dtype=np.float32)
    result = resample_image(image, (2.0, 0.9, 0.9), (1.5, 1.1, 0.7))
    assert result.shape == compute_new_shape(image.shape, (2.0, 0.9, 0.9), (1.5, 1.1, 0.7)) == (13, 16, 26)
    np.testing.assert_allclose(result, 42.0, rtol=1e-5)


def test_separate_z_uses_nearest_along_the_coarse_axis():
    image = np.zeros((6, 16, 16), dtype=np.float32)
    image[3:] = 100.0  # a step between slices 2 and 3
    image += smooth_volume((6, 16, 16), seed=4)
    spacing, target = (5.0, 1.0, 1.0), (1.0, 1.0, 1.0)  # 5 > 3: anisotropic
    result = resample_image(image, spacing, target, order=3)
    assert result.shape == (30, 16, 16)
    # Every output slice is an input slice (nearest along z) ...
    nearest = interpolation_matrix(6, 30, 0).argmax(axis=1)
    np.testing.assert_allclose(result, image[nearest], atol=1e-3)
    # ... and the step stays a step: no value between the two plateaus appears along z.
    assert np.array_equal(nearest, np.repeat(np.arange(6), 5))
    # In-plane it is the cubic spline: compare with scipy on one slice.
    downsized = resample_image(image, spacing, (5.0, 1.6, 1.3), order=3)
    spline = np.stack([ndi.zoom(s.astype(np.float64), np.divide((10, 12), s.shape), order=3,
                                mode="nearest", grid_mode=True) for s in image])
    # Clipped slice by slice, as nnU-Net (skimage resize per slice) does.
    reference = np.stack([np.clip(r, s.min(), s.max()) for r, s in zip(spline, image)])
    assert not np.allclose(reference, np.clip(spline, image.min(), image.max()), atol=0.01)  # it bites
    np.testing.assert_allclose(downsized, reference, atol=1e-3)
    # Forced off, the same image is interpolated across the step.
    smooth_z = resample_image(image, spacing, target, order=3, separate_z=False)
    assert not np.allclose(smooth_z, result, atol=1.0)


def test_isotropic_enough_spacing_is_resampled_in_3d():
    image = smooth_volume((8, 12, 12), seed=5)
    result = resample_image(image, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0), order=1)
    np.testing.assert_allclose(result, scipy_reference(image, (16, 12, 12), 1), atol=1e-4)


def test_resample_image_rejects_bad_arguments():
    image = np.zeros((4, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError):
        resample_image(image, (1, 1, 1), (2, 2, 2), new_shape=(2, 2, 2))
    with pytest.raises(ValueError):
        resample_image(image, (1, 1, 1))
    with pytest.raises(ValueError):
        resample_image(image, (1, 1, 1), (0.5, 0.5, 0.5), order=2)
    with pytest.raises(ValueError):
        resample_image(np.zeros((4, 4)), (1, 1), (2, 2))


# --- segmentations and probabilities ------------------------------------------------------------------

def blocky_segmentation(block_grid, block=2, seed=6) -> np.ndarray:
    """Random labels 0..3 on a grid of cubes ``block`` voxels wide."""
    labels = np.random.default_rng(seed).choice(np.array([0, 1, 2, 3], dtype=np.uint8), size=block_grid)
    return labels.repeat(block, 0).repeat(block, 1).repeat(block, 2)


@pytest.mark.parametrize("spacing,factor", [((1.0, 1.0, 1.0), (2, 2, 2)), ((1.0, 1.0, 1.0), (3, 3, 3)),
                                            ((6.0, 1.0, 1.0), (3, 2, 1))])
def test_segmentation_round_trip_coarse_fine_coarse_is_exact(spacing, factor):
    coarse = blocky_segmentation((3, 3, 4))
    fine_spacing = tuple(s / f for s, f in zip(spacing, factor))
    fine = resample_segmentation(coarse, spacing, fine_spacing)
    assert fine.dtype == np.uint8
    assert fine.shape == tuple(n * f for n, f in zip(coarse.shape, factor))
    assert set(np.unique(fine)) == set(np.unique(coarse))
    back = resample_segmentation(fine, fine_spacing, spacing)
    assert np.array_equal(back, coarse)


def test_segmentation_upsampling_in_plane_by_two_is_nearest():
    """In 2D the nearest of 4 neighbours weighs 0.75² > 0.5, so even voxel-sized structures survive."""
    coarse = np.random.default_rng(10).choice(np.array([0, 1, 2], dtype=np.uint8), size=(4, 5, 6))
    fine = resample_segmentation(coarse, (8.0, 1.0, 1.0), (8.0, 0.5, 0.5))
    assert np.array_equal(fine, coarse.repeat(2, 1).repeat(2, 2))


def test_segmentation_is_argmax_of_linearly_interpolated_masks():
    segmentation = blocky_segmentation((4, 5, 5), block=3, seed=7)  # (12, 15, 15)
    new_shape = (9, 20, 11)
    result = resample_segmentation(segmentation, (1.0, 1.0, 1.0), new_shape=new_shape, labels=[0, 1, 2, 3])
    scores = np.stack([scipy_reference((segmentation == label).astype(np.float32), new_shape, 1)
                       for label in range(4)])
    top_two = np.sort(scores, axis=0)[-2:]
    clear = top_two[1] - top_two[0] > 1e-4  # skip exact ties, where float rounding may pick either
    assert clear.mean() > 0.75
    assert np.array_equal(result[clear], scores.argmax(axis=0)[clear])
    assert set(np.unique(result)) == {0, 1, 2, 3}


def test_segmentation_keeps_labels_and_respects_separate_z():
    segmentation = np.zeros((4, 20, 20), dtype=np.uint8)
    segmentation[:2, 5:15, 5:15] = 1
    segmentation[2:, 8:12, 2:18] = 3
    result = resample_segmentation(segmentation, (5.0, 1.0, 1.0), (1.0, 0.8, 0.8))
    assert result.shape == (20, 25, 25) and result.dtype == np.uint8
    assert set(np.unique(result)) == {0, 1, 3}
    # Nearest along z: output slices 0..9 come from input slices 0..1, 10..19 from 2..3.
    assert not np.isin(3, result[:10]) and not np.isin(1, result[10:])
    with pytest.raises(ValueError):
        resample_segmentation(segmentation, (1, 1, 1), (2, 2, 2), labels=[0, 300])


def test_probabilities_stay_a_partition_of_unity():
    rng = np.random.default_rng(8)
    logits = ndi.gaussian_filter(rng.normal(size=(3, 6, 14, 14)), (0, 1, 1, 1))
    probabilities = (np.exp(logits) / np.exp(logits).sum(axis=0)).astype(np.float32)
    result = resample_probabilities(probabilities, (4.0, 1.0, 1.0), (1.0, 0.6, 0.6))
    assert result.shape == (3, 24, 23, 23) and result.dtype == np.float32
    np.testing.assert_allclose(result.sum(axis=0), 1.0, atol=1e-5)
    assert result.min() >= 0.0
    for channel in range(3):
        np.testing.assert_array_equal(
            result[channel], resample_image(probabilities[channel], (4.0, 1.0, 1.0), (1.0, 0.6, 0.6), order=1))


def test_inputs_are_not_modified_nor_returned():
    image = smooth_volume((5, 8, 8), seed=9)
    copy = image.copy()
    resample_image(image, (1, 1, 1), (0.5, 0.7, 0.7))
    assert np.array_equal(image, copy)
    same_grid = resample_image(image, (1, 1, 1), (1, 1, 1))
    assert np.array_equal(same_grid, image) and not np.shares_memory(same_grid, image)


def test_grid_is_pixel_centre_aligned():
    assert np.allclose(source_coordinates(2, 4), [-0.25, 0.25, 0.75, 1.25])
    assert np.allclose(source_coordinates(4, 2), [0.5, 2.5])


def test_small_tasks_slabs_and_one_thread_give_the_same_result(monkeypatch):
    """Cutting the work finer (many tasks, many segmentation slabs) or running on one thread changes
    nothing; torch's thread setting is restored afterwards."""
    import torch

    import covnet.image.resampling as resampling
    image = smooth_volume((9, 14, 16), seed=11)
    segmentation = np.digitize(smooth_volume((9, 14, 11), seed=12), [-20, 0, 20]).astype(np.uint8)
    expected_image = resample_image(image, (2.0, 1.0, 1.0), (0.7, 0.6, 1.3))
    expected_segmentation = resample_segmentation(segmentation, (2.0, 1.0, 1.0), (0.7, 0.6, 1.3))
    monkeypatch.setattr(resampling, "_TASK_ELEMENTS", 64)
    monkeypatch.setattr(resampling, "_SLAB_VOXELS", 300)
    np.testing.assert_allclose(resample_image(image, (2.0, 1.0, 1.0), (0.7, 0.6, 1.3)), expected_image,
                               atol=1e-4)  # float32 sums in another order
    np.testing.assert_array_equal(resample_segmentation(segmentation, (2.0, 1.0, 1.0), (0.7, 0.6, 1.3)),
                                  expected_segmentation)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        np.testing.assert_allclose(resample_image(image, (2.0, 1.0, 1.0), (0.7, 0.6, 1.3)), expected_image,
                                   atol=1e-4)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    resample_image(image, (2.0, 1.0, 1.0), (0.7, 0.6, 1.3))
    assert torch.get_num_threads() == threads


def test_separate_z_along_another_axis_for_segmentations():
    segmentation = blocky_segmentation((4, 2, 4), block=2, seed=13)  # (8, 4, 8), coarse along y
    fine = resample_segmentation(segmentation, (1.0, 4.0, 1.0), (0.5, 1.0, 0.5))
    assert fine.shape == (16, 16, 16)
    # Order 0 along y: every output row along y is a copy of an input row.
    assert np.array_equal(fine[:, ::4], fine[:, 3::4])
    assert np.array_equal(resample_segmentation(fine, (0.5, 1.0, 0.5), (1.0, 4.0, 1.0)), segmentation)


def test_concurrent_calls_agree_and_restore_the_thread_setting():
    import threading

    import torch
    image = smooth_volume((10, 30, 30), seed=14)
    expected = resample_image(image, (1.0, 1.0, 1.0), (0.7, 0.6, 0.9))
    threads_before = torch.get_num_threads()
    results = [None] * 4

    def work(index):
        results[index] = resample_image(image, (1.0, 1.0, 1.0), (0.7, 0.6, 0.9))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-4)
    assert torch.get_num_threads() == threads_before
