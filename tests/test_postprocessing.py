"""Connected-component clean-up of predicted lungs and infection."""
from __future__ import annotations

import numpy as np
import pytest

from covnet.inference.postprocessing import keep_largest_lung_components, postprocess, remove_infection_outside_lungs


def two_lungs_with_infection() -> np.ndarray:
    """(z, y, x): a right lung (label 2) at low x, a left lung (label 1) at high x, infection in the left lung."""
    segmentation = np.zeros((24, 30, 40), np.uint8)
    segmentation[4:20, 5:25, 4:17] = 2
    segmentation[4:20, 5:25, 22:36] = 1
    segmentation[8:12, 10:14, 25:29] = 3  # inside the left lung
    segmentation[14:17, 20:25, 32:36] = 3  # on the left lung's border, still connected to it
    return segmentation


def test_clean_prediction_is_left_unchanged():
    segmentation = two_lungs_with_infection()
    np.testing.assert_array_equal(postprocess(segmentation), segmentation)


def test_a_stray_lung_blob_is_removed_and_the_two_lungs_stay():
    segmentation = two_lungs_with_infection()
    polluted = segmentation.copy()
    polluted[0:2, 0:2, 0:2] = 1
    polluted[21:23, 27:29, 37:39] = 2
    cleaned = keep_largest_lung_components(polluted)
    np.testing.assert_array_equal(cleaned, segmentation)
    assert polluted[0, 0, 0] == 1  # the input is not modified


def test_a_small_second_component_is_dropped_when_the_lungs_touch():
    segmentation = two_lungs_with_infection()
    segmentation[4:20, 5:25, 17:22] = 2  # the lungs now form one component
    polluted = segmentation.copy()
    polluted[0:3, 0:3, 0:3] = 1  # the second largest component, but tiny
    np.testing.assert_array_equal(keep_largest_lung_components(polluted), segmentation)
    kept_regardless_of_size = keep_largest_lung_components(polluted, min_fraction_of_largest=0.0)
    np.testing.assert_array_equal(kept_regardless_of_size, polluted)


def test_one_lung_component_keeps_only_the_larger_lung():
    segmentation = two_lungs_with_infection()
    cleaned = keep_largest_lung_components(segmentation, num_lung_components=1)
    left_size = np.isin(segmentation, (1, 3)).sum()
    right_size = (segmentation == 2).sum()
    assert left_size > right_size
    assert not np.any(cleaned == 2)
    np.testing.assert_array_equal(cleaned[segmentation != 2], segmentation[segmentation != 2])


def test_infection_inside_a_lung_stays_and_an_isolated_infection_blob_is_removed():
    segmentation = two_lungs_with_infection()
    polluted = segmentation.copy()
    polluted[20:23, 0:3, 18:21] = 3  # away from both lungs
    cleaned = remove_infection_outside_lungs(polluted)
    np.testing.assert_array_equal(cleaned, segmentation)
    assert np.count_nonzero(cleaned == 3) == np.count_nonzero(segmentation == 3) > 0


def test_infection_touching_a_lung_only_at_a_corner_depends_on_connectivity():
    segmentation = np.zeros((10, 10, 10), np.uint8)
    segmentation[2:5, 2:5, 2:5] = 1
    segmentation[5, 5, 5] = 3  # shares only a corner with the lung
    assert remove_infection_outside_lungs(segmentation)[5, 5, 5] == 3
    assert remove_infection_outside_lungs(segmentation, connectivity=6)[5, 5, 5] == 0


def test_a_large_false_infection_blob_cannot_displace_a_lung():
    segmentation = np.pad(two_lungs_with_infection(), ((0, 0), (0, 0), (0, 60)))
    polluted = segmentation.copy()
    polluted[:, :, 45:] = 3  # pure infection far from the lungs, larger than either lung
    assert np.count_nonzero(polluted == 3) > np.count_nonzero(segmentation == 1)
    cleaned = postprocess(polluted, num_lung_components=2, min_fraction_of_largest=0.0)
    np.testing.assert_array_equal(cleaned, segmentation)


def test_other_labels_and_datasets_without_infection_are_handled():
    segmentation = np.zeros((12, 12, 12), np.int16)
    segmentation[1:5, 1:5, 1:5] = 1
    segmentation[7:11, 7:11, 7:11] = 2
    segmentation[0, 11, 0] = 1
    segmentation[11, 0, 11] = 7  # not a lung label: never touched
    cleaned = postprocess(segmentation, infection_label=None)
    assert cleaned.dtype == np.int16
    assert cleaned[0, 11, 0] == 0 and cleaned[11, 0, 11] == 7
    assert np.count_nonzero(cleaned == 1) == 64 and np.count_nonzero(cleaned == 2) == 64


def test_empty_segmentation_and_bad_arguments():
    empty = np.zeros((5, 5, 5), np.uint8)
    np.testing.assert_array_equal(postprocess(empty), empty)
    with pytest.raises(ValueError, match="num_lung_components"):
        keep_largest_lung_components(empty, num_lung_components=0)
    with pytest.raises(ValueError, match="connectivity"):
        remove_infection_outside_lungs(two_lungs_with_infection(), connectivity=4)
