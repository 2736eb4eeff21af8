"""The lung box (covnet.inference.lung_box): the coarse first pass's region holds every lung voxel the full
prediction finds, on test phantoms, and what lies outside it is background."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from covnet.checkpoint import Checkpoint
from covnet.inference.lung_box import LungBoxSettings, coarse_shape, grown_region, paste_into_background
from covnet.inference.postprocessing import postprocess_segmentation
from covnet.inference.predictor import InferenceSettings, Predictor
from covnet.network.unet import ResidualEncoderUNet
from covnet.phantoms.generate import make_phantom_case
from covnet.planning.planner import plan_dataset
from covnet.preprocessing.case import preprocess_case
from covnet.workspace import Workspace
from kit.workspaces import tiny_topology

TISSUE_HU = 40
DARK_THRESHOLD = 2.0        # normalised intensity: about -480 HU for the phantoms' CT normalisation


class DarkIsLung(torch.nn.Module):
    """A stand-in segmentation network with a small receptive field: 'left lung' where the 3×3×3 mean intensity
    is dark, background elsewhere. It finds a phantom's lungs at any grid once the air outside the body is gone,
    and like a trained network its answer near a structure's edge depends on the grid it sees."""

    def forward(self, x):
        smoothed = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
        lung = 8.0 * (DARK_THRESHOLD - smoothed)
        never = torch.full_like(lung, -30.0)
        return torch.cat([torch.zeros_like(lung), lung, never, never], dim=1)


def without_outside_air(image: np.ndarray) -> np.ndarray:
    """The phantom with the air around the body (air connected to the image border) made soft tissue."""
    air, _ = ndimage.label(image < -500)
    border = np.unique(np.concatenate([np.moveaxis(air, axis, 0)[index].ravel()
                                       for axis in range(3) for index in (0, -1)]))
    filled = image.copy()
    filled[np.isin(air, border[border > 0])] = TISSUE_HU
    return filled


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """The phantoms' own plan on a 2.5 mm grid with a 16×32×32 window, so that a phantom is many windows."""
    from covnet.phantoms.generate import make_phantom_dataset
    workspace = Workspace(tmp_path_factory.mktemp("lung_box_ws"))
    make_phantom_dataset(workspace, num_labelled=2, num_unlabelled=0, num_test=0, seed=3)
    planned = plan_dataset(workspace)
    return dataclasses.replace(planned, target_spacing=[2.5, 2.5, 2.5], patch_size=[16, 32, 32],
                               network=tiny_topology(planned))


def stand_in_predictor(plan, settings: InferenceSettings) -> Predictor:
    checkpoint = Checkpoint(plan=plan.to_json(), fold="all", settings={},
                            network_state=ResidualEncoderUNet(plan.network).state_dict())
    predictor = Predictor([checkpoint], settings=settings)
    predictor.network, predictor.states = DarkIsLung(), [{}]
    return predictor


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_the_lung_box_holds_every_lung_voxel_the_full_prediction_finds(plan, seed):
    image, truth, geometry = make_phantom_case(seed, spacing_zyx=(5.0, 5.0, 5.0))
    preprocessed, _, _ = preprocess_case("test", [without_outside_air(image)], geometry, plan)
    full = stand_in_predictor(plan, InferenceSettings(use_mirroring=False))
    boxed = stand_in_predictor(plan, InferenceSettings(use_mirroring=False, lung_box=LungBoxSettings()))

    full_labels = postprocess_segmentation(full.predict_probabilities(preprocessed).argmax(dim=0).numpy(), plan)
    region = boxed.lung_region(preprocessed)
    boxed_labels = boxed.predict_probabilities(preprocessed).argmax(dim=0).numpy()

    lungs = full_labels > 0
    assert lungs.sum() > 0.3 * np.count_nonzero(truth > 0) * 8        # it found the lungs (5 mm → 2.5 mm grid)
    inside = np.zeros(lungs.shape, dtype=bool)
    inside[region] = True
    assert not (lungs & ~inside).any()
    assert inside.sum() < 0.8 * inside.size                           # the box left out part of the image
    assert not boxed_labels[~inside].any()                            # background outside the box
    agreement = 2 * np.count_nonzero(lungs & (boxed_labels > 0)) / (lungs.sum() + np.count_nonzero(boxed_labels))
    assert agreement > 0.99


def test_without_a_margin_the_coarse_grid_cuts_lung_off(plan):
    """The margin is what absorbs the coarse grid's blur: with none, some lung of the full prediction falls
    outside (so the test above would catch a margin that is not applied)."""
    image, _, geometry = make_phantom_case(21, spacing_zyx=(5.0, 5.0, 5.0))
    preprocessed, _, _ = preprocess_case("test", [without_outside_air(image)], geometry, plan)
    full = stand_in_predictor(plan, InferenceSettings(use_mirroring=False))
    tight = stand_in_predictor(plan, InferenceSettings(use_mirroring=False,
                                                       lung_box=LungBoxSettings(margin_mm=0)))
    lungs = postprocess_segmentation(full.predict_probabilities(preprocessed).argmax(dim=0).numpy(), plan) > 0
    inside = np.zeros(lungs.shape, dtype=bool)
    inside[tight.lung_region(preprocessed)] = True
    assert (lungs & ~inside).any()


def test_nothing_found_predicts_the_whole_image(plan):
    image, _, geometry = make_phantom_case(21, spacing_zyx=(5.0, 5.0, 5.0))
    bright = np.full_like(image, TISSUE_HU)                           # no dark voxel: no lung anywhere
    preprocessed, _, _ = preprocess_case("test", [bright], geometry, plan)
    boxed = stand_in_predictor(plan, InferenceSettings(use_mirroring=False, lung_box=LungBoxSettings()))
    assert boxed.lung_region(preprocessed) is None
    probabilities = boxed.predict_probabilities(preprocessed)
    assert probabilities.shape[1:] == preprocessed.shape[1:]


def test_coarse_grid_is_near_isotropic_and_never_finer():
    assert coarse_shape((122, 480, 634), (2.3, 0.75, 0.75), 4.0) == (94, 120, 158)   # z: 2.3 → 3 mm
    assert coarse_shape((100, 100, 100), (5.0, 5.0, 5.0), 1.0) == (100, 100, 100)
    assert coarse_shape((10, 3, 3), (1.0, 1.0, 1.0), 8.0) == (1, 1, 1)


def test_grown_region_covers_the_coarse_box_plus_the_margin_and_one_window():
    # coarse voxel 10..20 of 50 on a 4x finer grid is 40..80; 3 mm margin at 1 mm spacing
    region = grown_region([(10, 20)], [50], [200], [1.0], margin_mm=3.0, min_size=[8])
    assert region == (slice(37, 83),)
    clipped = grown_region([(0, 50)], [50], [200], [1.0], margin_mm=3.0, min_size=[8])
    assert clipped == (slice(0, 200),)
    small = grown_region([(25, 26)], [50], [200], [1.0], margin_mm=0.0, min_size=[64])
    assert small[0].stop - small[0].start == 64 and small[0].start <= 100 and small[0].stop >= 104
    at_edge = grown_region([(49, 50)], [50], [200], [1.0], margin_mm=0.0, min_size=[64])
    assert at_edge == (slice(136, 200),)


def test_outside_the_region_is_certain_background():
    inside = torch.rand(4, 2, 3, 4)
    pasted = paste_into_background(inside, (slice(1, 3), slice(0, 3), slice(2, 6)), (5, 3, 8))
    assert torch.equal(pasted[:, 1:3, :, 2:6], inside)
    outside = torch.ones(5, 3, 8, dtype=torch.bool)
    outside[1:3, :, 2:6] = False
    assert torch.all(pasted[0][outside] == 1) and torch.all(pasted[1:][:, outside] == 0)
