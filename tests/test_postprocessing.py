"""Connected-component clean-up of predicted lungs and infection."""
from __future__ import annotations

import numpy as np
import pytest

from covnet.dataset import COVID_LABELS
from covnet.image.cropping import body_bounding_box
from covnet.image.io import Geometry, read_image
from covnet.image.orientation import canonical_reorientation
from covnet.inference.postprocessing import (
    assign_lung_sides,
    keep_largest_lung_components,
    lungs_on_both_sides,
    postprocess,
    remove_infection_outside_lungs,
)
from covnet.inference.predictor import lungs_by_midline
from covnet.preprocessing.case import CaseProperties


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


# ---------------------------------------------------------------------------------------------- sides
# In the canonical (LPS) frame x (the last axis) runs from the patient's right to left: the right lung (label 2)
# lies at low x, the left lung (label 1) at high x. The midline of these arrays is x = 19.5.
MIDLINE = 19.5


def lungs_on_their_sides() -> np.ndarray:
    segmentation = np.zeros((12, 20, 40), np.uint8)
    segmentation[2:10, 4:16, 3:17] = 2
    segmentation[2:10, 4:16, 23:37] = 1
    return segmentation


def test_swapped_sides_are_put_back_and_reported_as_all_relabelled():
    truth = lungs_on_their_sides()
    swapped = np.where(truth == 1, 2, np.where(truth == 2, 1, truth)).astype(np.uint8)
    fixed, relabelled = assign_lung_sides(swapped, MIDLINE)
    np.testing.assert_array_equal(fixed, truth)
    assert relabelled == 1.0
    assert swapped[5, 8, 5] == 1        # the input is not modified


def test_both_lungs_called_one_side_get_their_own_sides():
    truth = lungs_on_their_sides()
    for side in (1, 2):
        one_side = np.where(truth > 0, side, 0).astype(np.uint8)
        fixed, relabelled = assign_lung_sides(one_side, MIDLINE)
        np.testing.assert_array_equal(fixed, truth)
        assert relabelled == pytest.approx(np.count_nonzero(truth == 3 - side) / np.count_nonzero(truth))


def test_correct_sides_and_infection_stay_as_they_are():
    truth = lungs_on_their_sides()
    truth[4:7, 6:9, 25:28] = 3            # infection inside the left lung
    truth[0, 0, 0] = 7                    # another label
    fixed, relabelled = assign_lung_sides(truth, MIDLINE)
    np.testing.assert_array_equal(fixed, truth)
    assert relabelled == 0.0


def test_a_lung_component_takes_its_centroids_side_even_if_it_reaches_over_the_midline():
    segmentation = np.zeros((12, 20, 40), np.uint8)
    segmentation[2:10, 4:16, 3:22] = 1    # a right lung (centroid x 12) reaching 2 voxels past the midline
    fixed, relabelled = assign_lung_sides(segmentation, MIDLINE)
    assert set(np.unique(fixed)) == {0, 2} and relabelled == 1.0


def test_lungs_that_touch_at_the_midline_are_split_there():
    truth = lungs_on_their_sides()
    truth[2:10, 8:12, 17:20] = 2          # a bridge across the midline joins the two lungs
    truth[2:10, 8:12, 20:23] = 1
    touching = np.where(truth > 0, 1, 0).astype(np.uint8)
    fixed, _ = assign_lung_sides(touching, MIDLINE)
    np.testing.assert_array_equal(fixed, truth)


def test_a_single_lung_stays_whole_and_an_empty_map_is_unchanged():
    segmentation = np.zeros((12, 20, 40), np.uint8)
    segmentation[2:10, 4:16, 23:37] = 2   # only the left lung, called right
    fixed, _ = assign_lung_sides(segmentation, MIDLINE)
    np.testing.assert_array_equal(fixed, np.where(segmentation > 0, 1, 0))
    empty = np.zeros((4, 4, 4), np.uint8)
    fixed, relabelled = assign_lung_sides(empty, 1.5)
    np.testing.assert_array_equal(fixed, empty)
    assert relabelled == 0.0


def test_another_lateral_axis():
    truth = np.moveaxis(lungs_on_their_sides(), 2, 0)
    fixed, _ = assign_lung_sides(np.where(truth > 0, 2, 0).astype(np.uint8), MIDLINE, lateral_axis=0)
    np.testing.assert_array_equal(fixed, truth)


# Row-major SimpleITK directions (column j: the physical direction of index axis x, y, z).
DIRECTIONS = {
    "identity": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "x flipped": (-1, 0, 0, 0, 1, 0, 0, 0, 1),
    "x and y flipped": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "sagittal stack, index z towards the left": (0, 0, 1, 1, 0, 0, 0, -1, 0),
    "sagittal stack, index z towards the right": (0, 0, -1, 1, 0, 0, 0, -1, 0),
}


def chest_in_geometry(direction, touching: bool):
    """A body and two lungs placed by their physical (LPS) position, sampled on a 36×38×40 grid with
    ``direction``: returns the CT, the true label map (left lung 1 at physical x > the body's middle), the
    geometry and each voxel's physical distance from the body's middle towards the left (at x = 6 mm, off the
    image centre)."""
    shape_zyx, spacing = (36, 38, 40), 4.0     # air beside the body on every side: its midline can be trusted
    matrix = np.asarray(direction, float).reshape(3, 3)
    size_xyz = np.array(shape_zyx[::-1])
    origin = -matrix @ (spacing * (size_xyz - 1) / 2)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij")
    physical = origin[:, None] + matrix @ (spacing * np.stack([x.ravel(), y.ravel(), z.ravel()]))
    px, py, pz = (coordinate.reshape(shape_zyx) - offset for coordinate, offset in zip(physical, (6.0, 0, 0)))
    body = (np.abs(px) < 46) & (np.abs(py) < 36) & (np.abs(pz) < 40)
    gap = 0 if touching else 8
    lung = (np.abs(px) < 38) & (np.abs(px) >= gap) & (np.abs(py) < 24) & (np.abs(pz) < 30)
    image = np.where(body, 40, -1000).astype(np.int16)
    image[lung] = -850
    truth = np.where(lung, np.where(px > 0, 1, 2), 0).astype(np.uint8)
    geometry = Geometry((spacing,) * 3, tuple(origin), tuple(float(v) for v in direction), shape_zyx)
    return image, truth, geometry, px


def case_properties(image: np.ndarray, geometry: Geometry) -> CaseProperties:
    """What preprocessing records of a case: its reorientation to LPS and its body box there."""
    reorientation = canonical_reorientation(geometry.direction)
    box = body_bounding_box(reorientation.to_canonical(image))
    return CaseProperties("case", geometry, [list(b) for b in box], [b - a for a, b in box], [4.0] * 3,
                          [b - a for a, b in box], reorientation=reorientation)


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_sides_follow_the_patient_in_every_orientation(direction, caplog):
    image, truth, geometry, _ = chest_in_geometry(direction, touching=False)
    properties = case_properties(image, geometry)
    swapped = np.where(truth == 1, 2, np.where(truth == 2, 1, 0)).astype(np.uint8)
    with caplog.at_level("WARNING", logger="covnet"):
        np.testing.assert_array_equal(lungs_by_midline(swapped, properties, COVID_LABELS), truth)
    assert "gave 100% of the lung voxels the side opposite" in caplog.text and "--no-lateral-fix" in caplog.text
    caplog.clear()
    one_side = np.where(truth > 0, 1, 0).astype(np.uint8)
    np.testing.assert_array_equal(lungs_by_midline(one_side, properties, COVID_LABELS), truth)
    np.testing.assert_array_equal(lungs_by_midline(truth, properties, COVID_LABELS), truth)
    assert "side opposite" not in caplog.text


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_touching_lungs_are_split_at_the_bodys_midline_in_every_orientation(direction):
    image, truth, geometry, lateral_mm = chest_in_geometry(direction, touching=True)
    one_component = np.where(truth > 0, 2, 0).astype(np.uint8)
    fixed = lungs_by_midline(one_component, case_properties(image, geometry), COVID_LABELS)
    wrong = fixed != truth
    # The body box is found on a 2x coarser grid: the cut may lie up to two voxels (8 mm) off the true middle.
    assert np.all(np.abs(lateral_mm[wrong]) <= 8.0)
    assert np.count_nonzero(wrong) < 0.1 * np.count_nonzero(truth)


def cropped_chest(lungs: str) -> tuple[np.ndarray, np.ndarray, CaseProperties]:
    """A field of view inside the body (soft tissue up to every border) holding ``one`` lung across its middle, or
    ``two`` separate lungs on either side of it (right lung 2 at low x, left lung 1 at high x): the CT, the true
    labels and what preprocessing records."""
    image = np.full((20, 30, 32), 40, np.int16)
    truth = np.zeros(image.shape, np.uint8)
    if lungs == "one":
        truth[3:17, 4:26, 3:29] = 2
    else:
        truth[3:17, 4:26, 2:13] = 2
        truth[3:17, 4:26, 19:30] = 1
    image[truth > 0] = -850
    geometry = Geometry((2.0, 1.5, 1.5), (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1), image.shape)
    return image, truth, case_properties(image, geometry)


def test_a_crop_to_one_lung_keeps_the_networks_labels_with_a_warning(caplog):
    image, truth, properties = cropped_chest("one")
    start, stop = properties.bounding_box[2]
    assert (start, stop) == (0, 32)                        # the body reaches both sides: its middle is the crop's
    assert len(np.unique(assign_lung_sides(truth, (start + stop - 1) / 2)[0])) == 3   # what the fix would do: cut
    with caplog.at_level("WARNING", logger="covnet"):
        np.testing.assert_array_equal(lungs_by_midline(truth, properties, COVID_LABELS), truth)
    assert "case: the body reaches the image's left or right border and the lungs are not two separate components" \
           in caplog.text and "the network's left and right labels are kept" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="covnet"):    # no lungs: nothing to keep or warn about
        empty = np.zeros_like(truth)
        np.testing.assert_array_equal(lungs_by_midline(empty, properties, COVID_LABELS), empty)
    assert caplog.text == ""


def test_a_crop_holding_both_lungs_apart_still_gets_its_sides_fixed():
    _, truth, properties = cropped_chest("two")
    swapped = np.where(truth == 1, 2, np.where(truth == 2, 1, 0)).astype(np.uint8)
    np.testing.assert_array_equal(lungs_by_midline(swapped, properties, COVID_LABELS), truth)
    assert lungs_on_both_sides(truth, 15.5) and not lungs_on_both_sides(np.where(truth == 2, 2, 0), 15.5)


def test_the_real_ct_cropped_to_one_lung_keeps_its_lung_whole(real_ct_dir, caplog):
    image, geometry = read_image(real_ct_dir / "lung_crop_ct.nii.gz")
    mask = read_image(real_ct_dir / "lung_crop_mask.nii.gz")[0]
    properties = case_properties(image, geometry)
    for side in (1, 2):
        network = np.where(mask > 0, side, 0).astype(np.uint8)
        with caplog.at_level("WARNING", logger="covnet"):
            np.testing.assert_array_equal(lungs_by_midline(network, properties, COVID_LABELS), network)
        assert "a field of view cropped to one lung?" in caplog.text
        caplog.clear()
