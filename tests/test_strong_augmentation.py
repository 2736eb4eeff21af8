"""The pseudo-labelled patches' extra noise: cutout blanks a box of the asked share and ignores its labels;
the strong pipeline changes images far more than it changes labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from covnet.training.strong_augmentation import (
    CutoutTransform,
    StrongAugmentationSettings,
    strong_augmentation_transforms,
)

IGNORE = 4


def _sample(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn((1, 16, 32, 32), generator=generator) + 3.0     # nowhere 0 before the cutout
    segmentation = torch.randint(0, 4, (1, 16, 32, 32), generator=generator).to(torch.int16)
    return {"image": image, "segmentation": segmentation}


def test_cutout_blanks_one_box_of_the_asked_share_and_ignores_its_labels():
    torch.manual_seed(0)
    for low, high in ((0.02, 0.02), (0.3, 0.3), (0.02, 0.4)):
        sample = _sample()
        original = sample["segmentation"].clone()
        out = CutoutTransform((low, high), IGNORE)(**sample)
        blank = out["image"][0] == 0
        assert torch.equal(blank, out["segmentation"][0] == IGNORE)
        z, y, x = (torch.nonzero(blank.any(dim=axes)).flatten() for axes in ((1, 2), (0, 2), (0, 1)))
        box = blank[z.min():z.max() + 1, y.min():y.max() + 1, x.min():x.max() + 1]
        assert box.all()                                                 # one solid box
        share = blank.float().mean().item()
        assert 0.5 * low <= share <= min(1.0, 1.6 * high), (low, high, share)
        assert torch.equal(out["segmentation"][0][~blank], original[0][~blank])


def test_strong_pipeline_changes_intensities_and_only_cutout_touches_labels():
    torch.manual_seed(1)
    transforms = strong_augmentation_transforms(IGNORE, StrongAugmentationSettings(p_intensity=1.0, p_blur=1.0,
                                                                                   p_cutout=1.0))
    sample = _sample(3)
    image, segmentation = sample["image"].clone(), sample["segmentation"].clone()
    for transform in transforms:
        sample = transform(**sample)
    changed = ~torch.isclose(sample["image"], image)
    assert changed.float().mean() > 0.9
    relabelled = sample["segmentation"] != segmentation
    assert relabelled.any() and torch.all(sample["segmentation"][relabelled] == IGNORE)
    assert np.isfinite(sample["image"].numpy()).all()


def test_training_pipeline_noises_only_the_pseudo_labelled_samples():
    """With every strong transform sure to fire, only the pseudo-labelled case's patch gets cut out; the expert
    patch of the same batch never holds the ignore label."""
    from covnet.training.augmentation import AugmentationSettings, training_transforms
    quiet = AugmentationSettings(p_rotation=0, p_scaling=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0,
                                 p_low_resolution=0, p_inverted_gamma=0, p_gamma=0, p_mirror_per_axis=0)
    torch.manual_seed(2)
    transforms = training_transforms((8, 16, 16), None, (), (), IGNORE, quiet, noised_cases=["pseudo"])
    for transform in transforms.noised_transforms:
        if transform not in transforms.sample_transforms:          # the strong ones only
            transform.apply_probability = 1.0
    rng = np.random.default_rng(0)
    batch = {"data": rng.normal(3, 1, (2, 1, 8, 16, 16)).astype(np.float32),
             "target": rng.integers(0, 4, (2, 1, 8, 16, 16)).astype(np.int16), "cases": ["expert", "pseudo"]}
    plain = training_transforms((8, 16, 16), None, (), (), IGNORE, quiet)
    torch.manual_seed(2)
    reference = plain(**{key: np.copy(value) if key != "cases" else value for key, value in batch.items()})
    torch.manual_seed(2)
    out = transforms(**batch)
    assert torch.equal(out["data"][0], reference["data"][0]) and torch.equal(out["target"][0], reference["target"][0])
    assert not (out["target"][0] == IGNORE).any() and (out["target"][1] == IGNORE).any()
    assert not torch.allclose(out["data"][1], reference["data"][1])
    with pytest.raises(ValueError, match="ignore label"):
        training_transforms((8, 16, 16), None, (), (), None, quiet, noised_cases=["pseudo"])
