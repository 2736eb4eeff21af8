"""The lung box: a coarse first pass of the same network finds the lungs, and the full-resolution sliding window
then covers only them (plus a margin) instead of the whole body box.

Why: lungs and infection lie inside the lungs, yet the body box preprocessing crops to also holds the neck,
shoulders, mediastinal soft tissue and abdomen that a chest CT scans; every window over them is network time for
background (BENCHMARKS.md, "Fast prediction on the CPU", measures the share).

How, in the spirit of nnU-Net's ``3d_lowres`` cascade but without a second network or a second plan: the
preprocessed image is averaged down to a coarse grid (``coarse_factor`` times the plan's finest spacing on every
axis, never finer than the plan's own spacing), the same network predicts it with ``coarse_step_size`` (by
default windows that do not overlap) and no mirroring, and the foreground that postprocessing would keep (the
largest lung components and the infection touching them) gives a box. Mapped back to the plan's grid, the box
grows by ``margin_mm`` on every side and at least to one inference window. When the coarse pass finds nothing,
the whole image is predicted.

Outside the box the probabilities are those of certain background (1 for label 0), which is what the full
prediction's argmax says there whenever the box holds all the lung it finds (tests/test_lung_box.py checks this
on trained phantoms; the margin absorbs the coarse grid's blur).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from covnet.image.grid import bounding_box
from covnet.inference.postprocessing import postprocess_segmentation
from covnet.inference.sliding_window import predict_sliding_window
from covnet.planning.plans import Plan

Region = tuple[slice, slice, slice]


@dataclass(frozen=True)
class LungBoxSettings:
    coarse_factor: float = 4.0       # coarse spacing = this × the plan's finest spacing (each axis at least its own)
    coarse_step_size: float = 1.0    # windows of the coarse pass: 1.0 = side by side, no overlap
    margin_mm: float = 20.0          # added to the coarse box on every side, in mm

    def __post_init__(self):
        if not self.coarse_factor >= 1:
            raise ValueError(f"coarse_factor must be at least 1, got {self.coarse_factor}")
        if not 0 < self.coarse_step_size <= 1:
            raise ValueError(f"coarse_step_size must be in (0, 1], got {self.coarse_step_size}")
        if not self.margin_mm >= 0:
            raise ValueError(f"margin_mm must be 0 or more, got {self.margin_mm}")


def coarse_shape(shape: Sequence[int], spacing: Sequence[float], coarse_factor: float) -> tuple[int, ...]:
    """The image's shape on the coarse grid: each axis' spacing becomes ``coarse_factor`` × the finest spacing,
    or stays its own where that is already coarser."""
    finest = min(spacing)
    return tuple(max(1, round(size * axis_spacing / max(axis_spacing, coarse_factor * finest)))
                 for size, axis_spacing in zip(shape, spacing))


def downsample(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(C, z, y, x) averaged down to (C, *shape): each coarse voxel is the mean of the fine voxels it covers."""
    return torch.nn.functional.interpolate(image[None], size=tuple(shape), mode="area")[0]


def kept_foreground_box(segmentation: np.ndarray, plan: Plan) -> tuple[tuple[int, int], ...] | None:
    """Per axis, (start, stop) of the foreground that postprocessing keeps (the largest lung components and the
    infection touching them; all foreground for datasets without lung labels); None when there is none."""
    kept = postprocess_segmentation(segmentation, plan)
    foreground = kept > 0
    return bounding_box(foreground) if foreground.any() else None


def grown_region(coarse_box: Sequence[tuple[int, int]], coarse: Sequence[int], fine: Sequence[int],
                 spacing: Sequence[float], margin_mm: float, min_size: Sequence[int]) -> Region:
    """A box on the coarse grid → the fine grid's region that covers it, grown by ``margin_mm`` on every side
    and, centred, to at least ``min_size`` (the inference window), clipped to the fine image."""
    region = []
    for (start, stop), coarse_size, fine_size, axis_spacing, minimum in zip(coarse_box, coarse, fine, spacing,
                                                                             min_size):
        scale = fine_size / coarse_size
        margin = math.ceil(margin_mm / axis_spacing)
        low = max(0, math.floor(start * scale) - margin)
        high = min(fine_size, math.ceil(stop * scale) + margin)
        wanted = min(int(minimum), fine_size)
        if high - low < wanted:
            low = min(max(0, round((low + high - wanted) / 2)), fine_size - wanted)
            high = low + wanted
        region.append(slice(low, high))
    return tuple(region)


def union(regions: Sequence[Region]) -> Region:
    return tuple(slice(min(region[axis].start for region in regions), max(region[axis].stop for region in regions))
                 for axis in range(len(regions[0])))


def region_fraction(region: Region | None, shape: Sequence[int]) -> float:
    """The share of the image's voxels inside ``region`` (1 for the whole image)."""
    if region is None:
        return 1.0
    return math.prod(part.stop - part.start for part in region) / math.prod(shape)


@torch.inference_mode()
def find_lung_region(network: Callable, image: torch.Tensor, plan: Plan, settings: LungBoxSettings, *,
                     window_size: Sequence[int], batch_windows: int, device: torch.device,
                     use_amp: bool) -> Region | None:
    """The region of the (C, z, y, x) preprocessed ``image`` that the full-resolution pass needs (module doc), or
    None when the coarse pass finds no lung."""
    fine = tuple(image.shape[1:])
    coarse = coarse_shape(fine, plan.target_spacing, settings.coarse_factor)
    probabilities = predict_sliding_window(network, downsample(image, coarse), plan.patch_size, plan.num_classes,
                                           step_size=settings.coarse_step_size, batch_windows=batch_windows,
                                           device=device, use_amp=use_amp)
    box = kept_foreground_box(probabilities.argmax(dim=0).numpy().astype(np.uint8), plan)
    if box is None:
        return None
    return grown_region(box, coarse, fine, plan.target_spacing, settings.margin_mm, window_size)


def paste_into_background(inside: torch.Tensor, region: Region, shape: Sequence[int]) -> torch.Tensor:
    """(classes, *region) probabilities → (classes, *shape), certain background (label 0) outside the region."""
    probabilities = torch.zeros((inside.shape[0], *shape), dtype=inside.dtype)
    probabilities[0] = 1
    probabilities[(slice(None), *region)] = inside
    return probabilities
