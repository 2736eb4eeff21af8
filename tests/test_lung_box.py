"""The lung box (covnet.inference.lung_box): its region holds every lung and infection voxel of test phantoms
(heavily infected ones included) and every lung voxel the full prediction finds, what lies outside it is
background, the air around the body and small gas pockets do not widen it, and without air it is the whole
image."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from covnet.checkpoint import Checkpoint
from covnet.inference.lung_box import (
    LungBoxSettings,
    find_lung_region,
    grown_region,
    inner_air,
)
from covnet.inference.postprocessing import postprocess_segmentation
from covnet.inference.predictor import InferenceSettings, Predictor
from covnet.network.unet import ResidualEncoderUNet
from covnet.phantoms.generate import make_phantom_case
from covnet.planning.planner import plan_dataset
from covnet.planning.plans import NormalizationScheme
from covnet.preprocessing.case import preprocess_case
from covnet.workspace import Workspace
from kit.workspaces import tiny_topology

TISSUE_HU = 40
DARK_THRESHOLD = 2.0        # normalised intensity: about -480 HU for the phantoms' CT normalisation


class DarkIsLung(torch.nn.Module):
    """A stand-in segmentation network with a small receptive field: 'left lung' where the 3×3×3 mean intensity
    is dark, background elsewhere (the air around the body too: it sees the image's own padding as air)."""

    def forward(self, x):
        smoothed = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
        lung = 8.0 * (DARK_THRESHOLD - smoothed)
        never = torch.full_like(lung, -30.0)
        return torch.cat([torch.zeros_like(lung), lung, never, never], dim=1)


def without_outside_air(image: np.ndarray) -> np.ndarray:
    """The phantom with the air around the body (air connected to the image border) made soft tissue: the
    stand-in network would call it lung."""
    air, _ = ndimage.label(image < -500)
    border = np.unique(np.concatenate([np.moveaxis(air, axis, 0)[index].ravel()
                                       for axis in range(3) for index in (0, -1)]))
    filled = image.copy()
    filled[np.isin(air, border[border > 0])] = TISSUE_HU
    return filled


def inside(region, shape) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[region] = True
    return mask


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


@pytest.mark.parametrize("seed, burden", [(21, None), (22, None), (23, 0.5), (24, 0.7)])
def test_the_lung_box_holds_every_lung_and_infection_voxel(plan, seed, burden):
    """Heavily infected phantoms too: consolidation denser than the air threshold lies within the margin."""
    image, truth, geometry = make_phantom_case(seed, spacing_zyx=(5.0, 5.0, 5.0), infection_burden=burden)
    preprocessed, labels, _ = preprocess_case("test", [image], geometry, plan, truth)
    region = find_lung_region(preprocessed, plan, LungBoxSettings(), patch_size=(8, 8, 8))   # the 20 mm margin
    assert region is not None
    kept = inside(region, labels.shape)
    assert (labels > 0).any() and not ((labels > 0) & ~kept).any()
    assert kept.sum() < 0.8 * kept.size                                # the box left out part of the image


def test_a_lung_without_air_lies_in_the_box(plan):
    """A white-out: one lung entirely soft tissue. The box, mirrored about the body's middle, still holds it."""
    image, truth, geometry = make_phantom_case(22, spacing_zyx=(5.0, 5.0, 5.0))
    lung_x = np.nonzero(truth > 0)[2]
    opaque = (truth > 0) & (np.arange(truth.shape[2]) < np.median(lung_x))[None, None, :]
    image = np.where(opaque, TISSUE_HU, image).astype(image.dtype)
    preprocessed, labels, _ = preprocess_case("test", [image], geometry, plan, truth)
    region = find_lung_region(preprocessed, plan, LungBoxSettings(), patch_size=(8, 8, 8))
    assert region is not None and not ((labels > 0) & ~inside(region, labels.shape)).any()
    unmirrored = find_lung_region(preprocessed, plan, LungBoxSettings(margin_mm=0), patch_size=(1, 1, 1))
    assert unmirrored[2].stop - unmirrored[2].start > 1.5 * (labels.shape[2] / 4)   # wider than one lung


def test_the_full_prediction_is_background_outside_the_box(plan):
    image, _, geometry = make_phantom_case(21, spacing_zyx=(5.0, 5.0, 5.0))
    preprocessed, _, _ = preprocess_case("test", [without_outside_air(image)], geometry, plan)
    full = stand_in_predictor(plan, InferenceSettings(use_mirroring=False))
    boxed = stand_in_predictor(plan, InferenceSettings(use_mirroring=False, lung_box=LungBoxSettings()))
    full_labels = postprocess_segmentation(full.predict_probabilities(preprocessed).argmax(dim=0).numpy(), plan)
    kept = inside(boxed.lung_region(preprocessed), full_labels.shape)
    boxed_labels = boxed.predict_probabilities(preprocessed).argmax(dim=0).numpy()
    lungs = full_labels > 0
    assert lungs.any() and not (lungs & ~kept).any()
    agreement = 2 * np.count_nonzero(lungs & (boxed_labels > 0)) / (lungs.sum() + np.count_nonzero(boxed_labels))
    assert agreement > 0.99


def test_the_margin_grows_the_box(plan):
    image, _, geometry = make_phantom_case(21, spacing_zyx=(5.0, 5.0, 5.0))
    preprocessed, _, _ = preprocess_case("test", [image], geometry, plan)
    tight = find_lung_region(preprocessed, plan, LungBoxSettings(margin_mm=0), patch_size=(1, 1, 1))
    wide = find_lung_region(preprocessed, plan, LungBoxSettings(margin_mm=10), patch_size=(1, 1, 1))
    wider = find_lung_region(preprocessed, plan, LungBoxSettings(margin_mm=10), patch_size=(16, 16, 16))
    assert [part.start for part in wider] == [max(0, part.start - 8) for part in tight]      # half a window: 8 > 4
    for narrow, grown, size in zip(tight, wide, preprocessed.shape[1:]):
        assert grown.start == max(0, narrow.start - 4) and grown.stop == min(size, narrow.stop + 4)   # 10 mm / 2.5


def test_air_around_the_body_and_small_gas_pockets_are_left_out():
    air = np.zeros((20, 40, 40), dtype=bool)
    air[:, :, :3] = True                       # outside the body: touches every slice's border
    air[2:18, 10:30, 8:18] = True              # two lungs
    air[2:18, 10:30, 22:32] = True
    air[18:20, 34:37, 34:37] = True            # a gas pocket: 18 voxels
    air[0:3, 15:17, 12:14] = True              # the airway, leaving through the top slice
    kept = inner_air(air, min_share=0.05)
    assert kept[5, 15, 10] and kept[5, 15, 25] and not kept[:, :, :3].any() and not kept[19, 35, 35]
    assert kept[0, 15, 12]


def test_without_air_or_with_air_clipped_away_it_is_the_whole_image(plan):
    image, _, geometry = make_phantom_case(21, spacing_zyx=(5.0, 5.0, 5.0))
    bright = np.full_like(image, TISSUE_HU)
    preprocessed, _, _ = preprocess_case("test", [bright], geometry, plan)
    assert find_lung_region(preprocessed, plan, LungBoxSettings(), patch_size=plan.patch_size) is None
    boxed = stand_in_predictor(plan, InferenceSettings(use_mirroring=False, lung_box=LungBoxSettings()))
    assert boxed.predict_probabilities(preprocessed).shape[1:] == preprocessed.shape[1:]
    soft_tissue_only = dataclasses.replace(plan, normalization={"0": NormalizationScheme("CT", (-100.0, 200.0),
                                                                                         50.0, 60.0)})
    image_preprocessed, _, _ = preprocess_case("test", [image], geometry, soft_tissue_only)
    assert find_lung_region(image_preprocessed, soft_tissue_only, LungBoxSettings(),
                            patch_size=plan.patch_size) is None


def test_grown_region_covers_the_box_plus_the_margin_or_half_a_window_and_one_window():
    assert grown_region([(40, 80)], [200], [1.0], margin_mm=3.0, patch=[4]) == (slice(37, 83),)
    assert grown_region([(40, 80)], [200], [1.0], margin_mm=3.0, patch=[16]) == (slice(32, 88),)   # half a patch
    assert grown_region([(40, 80)], [200], [1.0], margin_mm=3.0, patch=[16], half_patch=False) == (slice(37, 83),)
    assert grown_region([(0, 200)], [200], [1.0], margin_mm=3.0, patch=[8]) == (slice(0, 200),)
    small = grown_region([(100, 104)], [200], [1.0], margin_mm=0.0, patch=[64])
    assert small[0].stop - small[0].start == 68 and small[0].start <= 100 and small[0].stop >= 104
    assert grown_region([(196, 200)], [200], [1.0], margin_mm=0.0, patch=[64]) == (slice(136, 200),)
