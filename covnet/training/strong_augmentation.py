"""Stronger augmentation for the pseudo-labelled patches of a self-training student (the "noised student").

Noisy Student (Xie et al. 2020) trains an un-noised teacher's pseudo-labels into a noised student, and
removing the noise removes the gain; ST++ (Yang et al. 2022) uses strong intensity jitter, blur and cutout on
the student's unlabelled images. Here, on top of the standard pipeline and only for patches of pseudo-labelled
cases:

1. intensity jitter (p ``p_intensity``): a multiplicative brightness and a contrast change, each drawn from
   the wide ``intensity_range``;
2. Gaussian blur (p ``p_blur``), sigma in ``blur_sigma`` voxels;
3. 3D cutout (p ``p_cutout``): a box covering ``cutout_share`` of the patch (random aspect) is set to 0 (the
   mean foreground intensity after CT normalisation) and its labels to the ignore label, so the student is
   never taught what the box hid.

Random numbers come from torch's generator, which ``BatchTransforms`` reseeds in every worker process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform


@dataclass(frozen=True)
class StrongAugmentationSettings:
    p_intensity: float = 0.8
    intensity_range: tuple[float, float] = (0.5, 1.5)
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    p_cutout: float = 0.5
    cutout_share: tuple[float, float] = (0.02, 0.4)


class CutoutTransform(BasicTransform):
    """Blank a random box holding ``share`` (drawn in ``share_range``) of the sample's voxels: image to
    ``image_value``, segmentation to ``ignore_label``."""

    def __init__(self, share_range: tuple[float, float], ignore_label: int, image_value: float = 0.0):
        super().__init__()
        low, high = share_range
        if not 0 < low <= high <= 1:
            raise ValueError(f"cutout share range must lie in (0, 1], not {share_range}")
        self.share_range, self.ignore_label, self.image_value = (float(low), float(high)), ignore_label, image_value

    def get_parameters(self, **sample) -> dict:
        shape = sample["image"].shape[1:]
        low, high = self.share_range
        share = low + (high - low) * torch.rand(1).item()
        # Side lengths: share^(1/3) of each axis, stretched by a random aspect whose product is 1.
        aspect = torch.exp(torch.empty(3).uniform_(-0.5, 0.5))
        aspect = aspect / aspect.prod() ** (1 / 3)
        sides = [max(1, min(size, round(size * share ** (1 / 3) * float(a)))) for size, a in zip(shape, aspect)]
        starts = [int(torch.randint(0, size - side + 1, (1,)).item()) for size, side in zip(shape, sides)]
        return {"box": tuple(slice(start, start + side) for start, side in zip(starts, sides))}

    def _apply_to_image(self, image: torch.Tensor, box) -> torch.Tensor:
        image[(slice(None), *box)] = self.image_value
        return image

    def _apply_to_segmentation(self, segmentation: torch.Tensor, box) -> torch.Tensor:
        segmentation[(slice(None), *box)] = self.ignore_label
        return segmentation


def strong_augmentation_transforms(ignore_label: int,
                                   settings: StrongAugmentationSettings = StrongAugmentationSettings()
                                   ) -> list[BasicTransform]:
    """The extra per-sample transforms of a pseudo-labelled patch, applied after the standard intensity
    transforms and before mirroring."""
    s = settings
    jitter = [MultiplicativeBrightnessTransform(multiplier_range=BGContrast(s.intensity_range),
                                                synchronize_channels=False, p_per_channel=1),
              ContrastTransform(contrast_range=BGContrast(s.intensity_range), preserve_range=True,
                                synchronize_channels=False, p_per_channel=1)]
    return [RandomTransform(jitter[0], apply_probability=s.p_intensity),
            RandomTransform(jitter[1], apply_probability=s.p_intensity),
            RandomTransform(GaussianBlurTransform(blur_sigma=s.blur_sigma, synchronize_channels=False,
                                                  synchronize_axes=False, p_per_channel=1, benchmark=False),
                            apply_probability=s.p_blur),
            RandomTransform(CutoutTransform(s.cutout_share, ignore_label), apply_probability=s.p_cutout)]
