"""Probabilities kept as their box: every operation equals the same operation on the full array."""
import numpy as np
import pytest

from covnet.image.boxed import BoxedProbabilities
from covnet.image.orientation import Reorientation
from covnet.image.resampling import resample_boxed_probabilities, resample_image, resample_probabilities
from covnet.inference.report import prediction_confidence


def random_boxed(rng, shape=(9, 14, 17), box=(slice(2, 7), slice(3, 11), slice(5, 16)), classes=4):
    values = rng.random((classes, *(part.stop - part.start for part in box))).astype(np.float32)
    return BoxedProbabilities(values / values.sum(axis=0), box, shape)


def test_full_and_labels_are_background_outside_the_box():
    boxed = random_boxed(np.random.default_rng(0))
    full = boxed.full()
    outside = np.ones(boxed.shape, dtype=bool)
    outside[boxed.box] = False
    assert np.all(full[0][outside] == 1) and np.all(full[1:][:, outside] == 0)
    assert np.array_equal(full[(slice(None), *boxed.box)], boxed.values)
    assert np.array_equal(boxed.labels(), np.argmax(full, axis=0))
    with pytest.raises(ValueError):
        BoxedProbabilities(boxed.values, boxed.box, (9, 14, 12))   # the box does not fit the image


def full_resampling(full: np.ndarray, spacing, new_shape) -> np.ndarray:
    """The whole array resampled channel by channel by resample_image (order 1, the same separate-z rule): an
    implementation that knows nothing of boxes."""
    return np.stack([resample_image(channel, spacing, new_shape=new_shape, order=1) for channel in full])


@pytest.mark.parametrize("new_shape, spacing", [((13, 20, 11), (1.0, 1.0, 1.0)),    # linear on every axis
                                                ((27, 20, 25), (4.0, 1.0, 1.0)),    # separate z: nearest along z
                                                ((9, 7, 17), (1.0, 1.0, 1.0))])     # one axis kept
def test_resampling_the_box_equals_resampling_the_full_array(new_shape, spacing):
    boxed = random_boxed(np.random.default_rng(1))
    resampled = resample_boxed_probabilities(boxed, spacing, new_shape=new_shape)
    expected = full_resampling(boxed.full(), spacing, new_shape)
    assert resampled.shape == tuple(new_shape)
    assert np.allclose(resampled.full(), expected, atol=1e-6)
    assert np.allclose(resample_probabilities(boxed.full(), spacing, new_shape=new_shape), expected, atol=1e-6)
    assert all(part.stop - part.start < size for part, size in zip(resampled.box, new_shape) if size > 7)


def test_a_box_at_the_image_border_the_whole_image_and_a_box_that_shrinking_skips():
    rng = np.random.default_rng(2)
    for box in [(slice(0, 3), slice(10, 14), slice(0, 17)), (slice(0, 9), slice(0, 14), slice(0, 17))]:
        boxed = random_boxed(rng, box=box)
        resampled = resample_boxed_probabilities(boxed, (1.0, 1.0, 1.0), new_shape=(5, 30, 8))
        assert np.allclose(resampled.full(), full_resampling(boxed.full(), (1.0, 1.0, 1.0), (5, 30, 8)), atol=1e-6)
    # one slice of nine shrunk to one: no output sample lies on it, and everything is background
    skipped = random_boxed(rng, box=(slice(7, 8), slice(3, 11), slice(5, 16)))
    resampled = resample_boxed_probabilities(skipped, (1.0, 1.0, 1.0), new_shape=(1, 14, 17))
    assert np.array_equal(resampled.full(), full_resampling(skipped.full(), (1.0, 1.0, 1.0), (1, 14, 17)))
    assert not resampled.labels().any()


def test_a_target_spacing_decides_separate_z_as_for_images():
    boxed = random_boxed(np.random.default_rng(5), shape=(10, 14, 17))
    spacing, target = (1.0, 1.0, 1.0), (2.9, 1.0, 1.0)   # 3 slices: 3.33 mm would be anisotropic, 2.9 mm is not
    expected = np.stack([resample_image(channel, spacing, target, order=1) for channel in boxed.full()])
    assert np.allclose(resample_probabilities(boxed.full(), spacing, target), expected, atol=1e-6)


def test_placing_and_reorienting_the_box_equal_doing_it_to_the_full_array():
    boxed = random_boxed(np.random.default_rng(3))
    placed = boxed.placed((1, 0, 4), (12, 16, 22))
    canvas = np.zeros((4, 12, 16, 22), dtype=np.float32)
    canvas[0] = 1
    canvas[:, 1:10, 0:14, 4:21] = boxed.full()
    assert np.array_equal(placed.full(), canvas)
    for reorientation in [Reorientation((2, 0, 1), (True, False, True)), Reorientation((0, 1, 2), (False, True, False)),
                          Reorientation()]:
        assert np.array_equal(placed.reoriented(reorientation).full(), reorientation.to_original(canvas))


def test_confidence_of_the_box_equals_that_of_the_full_array():
    boxed = random_boxed(np.random.default_rng(4))
    segmentation = boxed.labels()
    segmentation[0, 0, 0] = 3          # a foreground voxel outside the box, where background is certain (1)
    expected = prediction_confidence(segmentation, boxed.full(), (1, 2, 3))
    assert boxed.confidence(segmentation, (1, 2, 3)) == pytest.approx(expected, rel=1e-6)
    assert prediction_confidence(segmentation, boxed, (1, 2, 3)) == pytest.approx(expected, rel=1e-6)
    assert boxed.confidence(np.zeros(boxed.shape, np.uint8), (1, 2, 3)) is None
