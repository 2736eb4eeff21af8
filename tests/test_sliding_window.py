"""Sliding-window inference: window placement, Gaussian weights, blending, mirroring and lateral swaps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from covnet.inference.sliding_window import (
    gaussian_importance_map,
    mirror_combinations,
    predict_sliding_window,
    window_starts,
    window_starts_along_axis,
)

NUM_CLASSES = 3


def voxelwise_network(batch: torch.Tensor) -> torch.Tensor:
    """Logits that depend only on each voxel's own value: shift-, crop- and flip-equivariant."""
    value = batch[:, 0]
    return torch.stack([torch.zeros_like(value), 2.0 * value, value ** 2 - 1.0], dim=1)


def voxelwise_answer(image: np.ndarray) -> np.ndarray:
    """Softmax of the voxelwise logits of a (C, z, y, x) image, computed on the whole image at once."""
    return torch.softmax(voxelwise_network(torch.from_numpy(image)[None]), dim=1)[0].numpy()


def position_network(batch: torch.Tensor) -> torch.Tensor:
    """Says 'label 1' on the left half of every patch (x below the centre) and 'label 2' on the right half."""
    width = batch.shape[-1]
    left = (torch.arange(width) < width / 2).to(batch.dtype)
    logits = torch.zeros((batch.shape[0], NUM_CLASSES, *batch.shape[2:]), dtype=batch.dtype)
    logits[:, 1] = 10.0 * left
    logits[:, 2] = 10.0 * (1.0 - left)
    return logits


def position_and_value_network(batch: torch.Tensor) -> torch.Tensor:
    """Not translation-equivariant, so the Gaussian blending of overlapping windows shows in the result."""
    z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, size) for size in batch.shape[2:]), indexing="ij")
    value = batch[:, 0]
    return torch.stack([value * z, value + y, x - value], dim=1)


@pytest.mark.parametrize("image_shape, patch_size, step_size", [
    ((64, 64, 64), (64, 64, 64), 0.5),
    ((100, 37, 65), (32, 37, 16), 0.5),
    ((33, 80, 129), (32, 40, 64), 0.5),
    ((50, 50, 50), (20, 20, 20), 0.25),
    ((97, 97, 97), (24, 48, 96), 1.0),
])
def test_window_starts_cover_the_image_evenly(image_shape, patch_size, step_size):
    starts = window_starts(image_shape, patch_size, step_size)
    for axis_starts, size, patch in zip(starts, image_shape, patch_size):
        assert axis_starts[0] == 0
        assert axis_starts[-1] == size - patch
        gaps = np.diff(axis_starts)
        assert np.all(gaps > 0) and np.all(gaps <= step_size * patch)
        expected_count = int(np.ceil((size - patch) / (patch * step_size))) + 1
        assert len(axis_starts) == expected_count
        covered = np.zeros(size, bool)
        for start in axis_starts:
            covered[start:start + patch] = True
        assert covered.all()


def test_window_starts_take_one_step_per_axis():
    starts = window_starts((40, 100, 100), (20, 40, 40), (0.5, 0.75, 1.0))
    assert starts == [window_starts_along_axis(40, 20, 0.5), window_starts_along_axis(100, 40, 0.75),
                      window_starts_along_axis(100, 40, 1.0)]
    with pytest.raises(ValueError, match="step_size"):
        window_starts((40, 100, 100), (20, 40, 40), (0.5, 0.75))


def test_window_starts_refuse_an_axis_smaller_than_the_patch_and_a_bad_step():
    with pytest.raises(ValueError, match="pad it first"):
        window_starts((10, 64, 64), (16, 32, 32))
    with pytest.raises(ValueError, match="step_size"):
        window_starts((64, 64, 64), (16, 32, 32), step_size=0)


@pytest.mark.parametrize("patch_size", [(16, 24, 32), (15, 9, 21)])
def test_gaussian_is_positive_float32_with_its_peak_at_the_centre(patch_size):
    weights = gaussian_importance_map(patch_size)
    assert weights.shape == patch_size and weights.dtype == np.float32
    assert np.all(weights > 0)
    assert weights.max() == pytest.approx(1.0)
    peak = np.unravel_index(np.argmax(weights), weights.shape)
    for index, size in zip(peak, patch_size):
        assert index in {(size - 1) // 2, size // 2}
    assert weights[0, 0, 0] < 0.01 * weights.max()
    np.testing.assert_allclose(weights, weights[::-1, ::-1, ::-1])


def test_gaussian_floor_replaces_values_that_underflow():
    # With a tiny sigma the far corners underflow to 0 even in float64; they must take the smallest weight.
    weights = gaussian_importance_map((8, 8, 64), sigma_scale=0.01)
    assert np.all(weights > 0)
    assert np.count_nonzero(weights == weights.min()) > 1000
    assert weights.max() == pytest.approx(1.0)


@pytest.mark.parametrize("image_shape", [(20, 30, 40), (16, 16, 16), (10, 7, 12), (30, 9, 16)])
def test_sliding_window_equals_the_whole_image_answer_for_a_voxelwise_network(image_shape):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, *image_shape)).astype(np.float32)
    probabilities = predict_sliding_window(voxelwise_network, image, (16, 16, 16), NUM_CLASSES)
    assert isinstance(probabilities, torch.Tensor)
    assert probabilities.dtype == torch.float32 and probabilities.device.type == "cpu"
    assert tuple(probabilities.shape) == (NUM_CLASSES, *image_shape)
    np.testing.assert_allclose(probabilities.numpy(), voxelwise_answer(image), rtol=1e-5, atol=1e-6)


def test_probabilities_sum_to_one_with_overlapping_position_dependent_windows():
    image = np.random.default_rng(1).normal(size=(1, 24, 20, 28)).astype(np.float32)
    probabilities = predict_sliding_window(position_and_value_network, image, (12, 12, 12), NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(dim=0).numpy(), 1.0, atol=1e-5)


def test_deep_supervision_output_uses_the_full_resolution_logits():
    def deep_supervision_network(batch):
        full = voxelwise_network(batch)
        return [full, -full[:, :, ::2, ::2, ::2]]

    image = np.random.default_rng(2).normal(size=(1, 20, 18, 16)).astype(np.float32)
    probabilities = predict_sliding_window(deep_supervision_network, image, (8, 8, 8), NUM_CLASSES)
    np.testing.assert_allclose(probabilities.numpy(), voxelwise_answer(image), rtol=1e-5, atol=1e-6)


def test_mirroring_an_equivariant_network_changes_nothing():
    image = np.random.default_rng(3).normal(size=(1, 20, 24, 17)).astype(np.float32)
    plain = predict_sliding_window(voxelwise_network, image, (8, 16, 16), NUM_CLASSES)
    mirrored = predict_sliding_window(voxelwise_network, image, (8, 16, 16), NUM_CLASSES, mirror_axes=(0, 1, 2))
    np.testing.assert_allclose(mirrored.numpy(), plain.numpy(), rtol=1e-5, atol=1e-6)


def test_mirroring_averages_every_flip_combination():
    assert mirror_combinations((2, 0)) == [(), (0,), (2,), (0, 2)]
    seen_flips = []

    def recording_network(batch):
        seen_flips.append(batch[0, 0, 0, 0, 0].item())
        return voxelwise_network(batch)

    image = np.zeros((1, 8, 8, 8), np.float32)
    image[0, 0, 0, 0] = 1.0  # marks the corner: each flip moves it elsewhere
    predict_sliding_window(recording_network, image, (8, 8, 8), NUM_CLASSES, mirror_axes=(0, 1, 2))
    assert len(seen_flips) == 8 and seen_flips.count(1.0) == 1


def test_lateral_labels_are_swapped_back_after_a_left_right_flip():
    image = np.zeros((1, 4, 6, 10), np.float32)
    patch = (4, 6, 10)
    left_half = np.arange(10) < 5

    plain = predict_sliding_window(position_network, image, patch, NUM_CLASSES).numpy()
    swapped = predict_sliding_window(position_network, image, patch, NUM_CLASSES, mirror_axes=(2,),
                                     lateral_pairs=((1, 2),), left_right_axis=2).numpy()
    unswapped = predict_sliding_window(position_network, image, patch, NUM_CLASSES, mirror_axes=(2,)).numpy()

    assert np.all(plain.argmax(0)[..., left_half] == 1) and np.all(plain.argmax(0)[..., ~left_half] == 2)
    np.testing.assert_allclose(swapped, plain, atol=1e-6)
    # Without the swap the mirrored pass contradicts the plain one: both lungs get about half each.
    np.testing.assert_allclose(unswapped[1], 0.5, atol=1e-3)
    np.testing.assert_allclose(unswapped[2], 0.5, atol=1e-3)


def test_lateral_swap_only_applies_to_flips_along_the_left_right_axis():
    image = np.zeros((1, 4, 6, 10), np.float32)
    plain = predict_sliding_window(position_network, image, (4, 6, 10), NUM_CLASSES).numpy()
    flipped_along_y = predict_sliding_window(position_network, image, (4, 6, 10), NUM_CLASSES, mirror_axes=(1,),
                                             lateral_pairs=((1, 2),), left_right_axis=2).numpy()
    np.testing.assert_allclose(flipped_along_y, plain, atol=1e-6)


def test_batching_windows_gives_the_same_result_as_one_at_a_time():
    image = np.random.default_rng(4).normal(size=(1, 26, 21, 30)).astype(np.float32)
    kwargs = dict(patch_size=(10, 10, 12), num_classes=NUM_CLASSES, mirror_axes=(0, 2), lateral_pairs=((1, 2),))
    one_at_a_time = predict_sliding_window(position_and_value_network, image, batch_windows=1, **kwargs)
    batched = predict_sliding_window(position_and_value_network, image, batch_windows=5, **kwargs)
    np.testing.assert_allclose(batched.numpy(), one_at_a_time.numpy(), rtol=1e-5, atol=1e-6)


def test_gaussian_blending_favours_the_window_whose_centre_is_nearer():
    # Two windows along x overlap; a network that answers "label 1" in the first window and "label 2" in the
    # second (told apart by the image value) must, in the overlap, lean towards the window whose centre is closer.
    image = np.zeros((1, 4, 4, 24), np.float32)
    image[..., 8:] = 1.0  # the network recognises a window by its first voxel: 0 in the first, 1 in the second

    def window_identity_network(batch):
        first_window = (batch[:, 0, 0, 0, 0] == 0).to(batch.dtype)[:, None, None, None]
        logits = torch.zeros((batch.shape[0], NUM_CLASSES, *batch.shape[2:]))
        logits[:, 1] = 10.0 * first_window
        logits[:, 2] = 10.0 * (1.0 - first_window)
        return logits

    probabilities = predict_sliding_window(window_identity_network, image, (4, 4, 16), NUM_CLASSES).numpy()
    # Windows start at x = 0 and x = 8; their overlap is x = 8..15, the midpoint between centres is 11.5.
    assert np.all(probabilities.argmax(0)[..., :12] == 1)
    assert np.all(probabilities.argmax(0)[..., 12:] == 2)
    assert 0.01 < probabilities[1, 0, 0, 10] < 0.99


def test_wrong_number_of_network_classes_is_an_error():
    image = np.zeros((1, 8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="classes"):
        predict_sliding_window(voxelwise_network, image, (8, 8, 8), num_classes=4)
    with pytest.raises(ValueError, match="lateral pair"):
        predict_sliding_window(voxelwise_network, image, (8, 8, 8), NUM_CLASSES, lateral_pairs=((1, 3),))


def test_a_real_convolutional_network_runs_with_mirroring_and_padding():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(),
                                  torch.nn.Conv3d(4, NUM_CLASSES, 1)).eval()
    image = torch.randn(1, 6, 14, 11)
    probabilities = predict_sliding_window(network, image, (8, 8, 8), NUM_CLASSES, mirror_axes=(0, 1, 2),
                                           batch_windows=2)
    assert tuple(probabilities.shape) == (NUM_CLASSES, 6, 14, 11)
    assert torch.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(0).numpy(), 1.0, atol=1e-5)


def test_cpu_autocast_is_bfloat16_where_native_and_float32_elsewhere(monkeypatch):
    from covnet.inference import sliding_window
    from covnet.runtime import precision
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.LeakyReLU(),
                                  torch.nn.Conv3d(8, NUM_CLASSES, 3, padding=1)).eval()
    image = torch.randn(1, 10, 12, 12)
    exact = predict_sliding_window(network, image, (8, 8, 8), NUM_CLASSES)
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda native=native: native)
        assert sliding_window.autocast_available(torch.device("cpu")) is native
        mixed = predict_sliding_window(network, image, (8, 8, 8), NUM_CLASSES, use_amp=True)
        assert mixed.dtype == torch.float32
        np.testing.assert_allclose(mixed.sum(0).numpy(), 1.0, atol=1e-5)
        if native:      # the network ran in bfloat16: close to float32, not equal
            assert not torch.equal(mixed, exact)
            assert (mixed - exact).abs().max() < 0.05
            assert (mixed.argmax(0) == exact.argmax(0)).float().mean() > 0.95
        else:
            assert torch.equal(mixed, exact)


def test_accumulators_fall_back_to_the_cpu_when_the_device_is_out_of_memory(monkeypatch):
    from covnet.inference import sliding_window

    real_zeros = torch.zeros

    def zeros_that_fail_off_the_cpu(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type != "cpu":
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_zeros(*args, device=device, **kwargs)

    monkeypatch.setattr(sliding_window.torch, "zeros", zeros_that_fail_off_the_cpu)
    probabilities, weights = sliding_window._allocate_accumulators(3, (4, 5, 6), torch.device("cuda"))
    assert probabilities.device.type == "cpu" and tuple(probabilities.shape) == (3, 4, 5, 6)
    assert weights.device.type == "cpu" and tuple(weights.shape) == (4, 5, 6)
