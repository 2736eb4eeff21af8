"""Every case is brought to one LPS orientation (left lung on the same array side), and back exactly."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from kit.images import make_tiny_case

from covnet.dataset import covid_description
from covnet.image.io import Geometry, write_image
from covnet.image.orientation import Reorientation, canonical_reorientation
from covnet.planning.fingerprint import extract_fingerprint
from covnet.planning.planner import make_plan
from covnet.preprocessing.case import preprocess_case, segmentation_to_original


def direction_of(permutation_xyz, signs_xyz) -> tuple:
    """A direction matrix whose index axis j points along physical axis permutation_xyz[j] with a sign."""
    matrix = np.zeros((3, 3))
    for index_axis, (physical, sign) in enumerate(zip(permutation_xyz, signs_xyz)):
        matrix[physical, index_axis] = sign
    return tuple(matrix.ravel())


def test_identity_direction_needs_nothing():
    assert canonical_reorientation((1, 0, 0, 0, 1, 0, 0, 0, 1)).is_identity


@pytest.mark.parametrize("permutation", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("signs", [(1, 1, 1), (-1, -1, 1), (-1, 1, -1)])
def test_reorienting_a_physical_pattern_always_gives_the_same_canonical_array(permutation, signs):
    # One physical volume, stored with index axes along permuted and flipped physical axes.
    canonical = np.arange(4 * 5 * 6).reshape(4, 5, 6)                 # (S, P, L) = (z, y, x) canonical
    direction = direction_of(permutation, signs)
    matrix = np.asarray(direction).reshape(3, 3)
    # stored[index] = canonical[physical position]; physical axis k of index axis j: canonical array axis 2-k
    stored_shape = tuple(canonical.shape[2 - permutation[2 - a]] for a in range(3))
    stored = np.empty(stored_shape, canonical.dtype)
    for index in np.ndindex(stored_shape):
        physical = [0, 0, 0]
        for array_axis, value in enumerate(index):
            j = 2 - array_axis
            k = permutation[j]
            size = canonical.shape[2 - k]
            physical[2 - k] = value if matrix[k, j] > 0 else size - 1 - value
        stored[index] = canonical[tuple(physical)]
    reorientation = canonical_reorientation(direction)
    assert np.array_equal(reorientation.to_canonical(stored), canonical)
    assert np.array_equal(reorientation.to_original(reorientation.to_canonical(stored)), stored)
    assert reorientation.shape(stored.shape) == canonical.shape


def test_an_oblique_scan_uses_its_nearest_axes():
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    assert canonical_reorientation(tuple(rotation.ravel())).is_identity
    flipped = rotation @ np.diag([-1, 1, 1])
    assert canonical_reorientation(tuple(flipped.ravel())) == Reorientation((0, 1, 2), (False, False, True))


def test_reorientation_json_round_trip():
    reorientation = Reorientation((2, 0, 1), (True, False, True))
    assert Reorientation.from_json(reorientation.to_json()) == reorientation
    assert Reorientation.from_json(None).is_identity


def flipped_xy(image, label, geometry):
    """The same physical case stored with x and y reversed (direction diag(-1, -1, 1))."""
    origin = np.asarray(geometry.origin) + np.array([(geometry.shape[2] - 1) * geometry.spacing[2],
                                                     (geometry.shape[1] - 1) * geometry.spacing[1], 0.0])
    flipped = Geometry(geometry.spacing, tuple(origin), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), geometry.shape)
    return image[:, ::-1, ::-1].copy(), label[:, ::-1, ::-1].copy(), flipped


def test_a_case_with_flipped_axes_puts_its_left_lung_where_the_others_do(tmp_path):
    image, label, geometry = make_tiny_case(0)
    flipped_image, flipped_label, flipped_geometry = flipped_xy(image, label, geometry)
    raw = tmp_path / "raw"
    for case, (img, lab, geo) in {"plain": (image, label, geometry),
                                  "flipped": (flipped_image, flipped_label, flipped_geometry)}.items():
        write_image(img, geo, raw / "imagesTr" / f"{case}_0000.nii.gz")
        write_image(lab, geo, raw / "labelsTr" / f"{case}.nii.gz")
    description = covid_description("orientation", 2)
    fingerprint = extract_fingerprint(raw, ["flipped", "plain"], description)
    flipped_case, plain_case = fingerprint.cases
    assert flipped_case.spacing == plain_case.spacing
    assert flipped_case.shape_after_crop == plain_case.shape_after_crop
    plan = make_plan(fingerprint, description)
    assert plan.lateral_pairs == [[1, 2]]
    plain = preprocess_case("plain", [image], geometry, plan, label)
    flipped = preprocess_case("flipped", [flipped_image], flipped_geometry, plan, flipped_label)
    # The same arrays: the left lung (1) lies at high x (towards patient left) in both.
    assert np.array_equal(plain[1], flipped[1]) and np.allclose(plain[0], flipped[0])
    left_x = np.argwhere(flipped[1] == 1)[:, 2].mean()
    right_x = np.argwhere(flipped[1] == 2)[:, 2].mean()
    assert left_x > right_x
    # Export restores the flipped case's own array layout.
    restored = segmentation_to_original(flipped[1], flipped[2], sorted(plan.labels.values()), plan.resampling)
    assert restored.shape == flipped_label.shape
    assert (restored == flipped_label).mean() > 0.97
    assert np.argwhere(restored == 1)[:, 2].mean() < np.argwhere(restored == 2)[:, 2].mean()  # stored mirrored
