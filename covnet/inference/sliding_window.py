"""Whole-image prediction from a patch-based network: overlapping windows blended with a Gaussian weight.

The network only ever sees patches of the training patch size. The image is covered by windows whose starts
are evenly spaced (neighbouring windows overlap by at least ``1 - step_size`` of the patch), each window's
softmax is weighted by a Gaussian that trusts the patch centre more than its borders, and the weighted sum is
divided by the summed weights. Optionally every window is also predicted on flipped copies (test-time
mirroring) and the un-flipped probabilities are averaged.

Lateral labels and mirroring: a network trained with left/right swapping augmentation sees a mirrored left
lung as a right lung. After un-flipping a prediction made on an image flipped along the left-right axis, the
channels of each lateral pair (``lateral_pairs``, e.g. ``((1, 2),)``) are therefore swapped back.

The returned array holds *probabilities* (softmax averaged over windows and mirrorings), not logits: they
sum to 1 at every voxel, can be averaged over the folds of an ensemble directly, and their per-voxel maximum
is the confidence that :func:`covnet.inference.report.case_report` summarises.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np
import torch

from covnet.image.orientation import LEFT_RIGHT_AXIS
from covnet.runtime.precision import autocast_available

SPATIAL_DIMS = 3


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """A float32 weight map of shape ``patch_size``: 1 at the patch centre, falling off as a Gaussian.

    The standard deviation along each axis is ``sigma_scale * patch_size[axis]``. The centre is the geometric
    centre ``(size - 1) / 2``, so the map is symmetric under flips (an even size has a flat top of two voxels
    per axis). Values that underflow to 0 are raised to the smallest positive value, so every voxel of a
    window contributes and the accumulated weights are never 0.
    """
    patch_size = tuple(int(size) for size in patch_size)
    if any(size < 1 for size in patch_size) or sigma_scale <= 0:
        raise ValueError(f"need positive patch sizes and sigma_scale, got {patch_size} and {sigma_scale}")
    weights = np.ones((), dtype=np.float64)
    for size in patch_size:
        offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        sigma = sigma_scale * size
        profile = np.exp(-0.5 * (offsets / sigma) ** 2)
        weights = np.multiply.outer(weights, profile)
    weights = (weights / weights.max()).astype(np.float32)
    positive = weights[weights > 0]
    smallest_positive = positive.min() if positive.size else np.float32(1.0)
    return np.maximum(weights, smallest_positive)


def window_starts_along_axis(image_size: int, patch_size: int, step_size: float) -> list[int]:
    """Evenly spaced starts from 0 to ``image_size - patch_size``, at most ``step_size * patch_size`` apart."""
    if image_size < patch_size:
        raise ValueError(f"image axis of {image_size} voxels is smaller than the patch ({patch_size}); pad it first")
    free_space = image_size - patch_size
    num_windows = math.ceil(free_space / (patch_size * step_size)) + 1
    if num_windows == 1:
        return [0]
    spacing = free_space / (num_windows - 1)
    return [int(round(spacing * index)) for index in range(num_windows)]


def window_starts(image_shape: Sequence[int], patch_size: Sequence[int],
                  step_size: float | Sequence[float] = 0.5) -> list[list[int]]:
    """Per axis, the window starts that tile ``image_shape`` with patches of ``patch_size``.

    Along each axis there are ``ceil((size - patch) / (patch * step_size)) + 1`` windows, the first starting
    at 0 and the last ending at the image border. ``step_size``: one fraction for every axis or one per axis.
    Every axis must be at least the patch size (pad first).
    """
    if len(image_shape) != len(patch_size):
        raise ValueError(f"image shape {tuple(image_shape)} and patch size {tuple(patch_size)} differ in length")
    steps = [float(step_size)] * len(patch_size) if isinstance(step_size, (int, float)) else list(step_size)
    if len(steps) != len(patch_size) or not all(0 < step <= 1 for step in steps):
        raise ValueError(f"step_size must be in (0, 1], one or one per axis, got {step_size}")
    return [window_starts_along_axis(int(size), int(patch), step)
            for size, patch, step in zip(image_shape, patch_size, steps)]


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``mirror_axes`` (the empty one first): the flips that test-time mirroring averages."""
    axes = tuple(sorted(set(int(axis) for axis in mirror_axes)))
    return [subset for count in range(len(axes) + 1) for subset in itertools.combinations(axes, count)]


def lateral_channel_order(num_classes: int, lateral_pairs: Sequence[Sequence[int]]) -> list[int]:
    """The channel permutation that swaps each lateral pair (e.g. left lung <-> right lung)."""
    order = list(range(num_classes))
    for first, second in lateral_pairs:
        if not (0 <= first < num_classes and 0 <= second < num_classes) or first == second:
            raise ValueError(f"lateral pair ({first}, {second}) is not two distinct labels below {num_classes}")
        order[first], order[second] = order[second], order[first]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"lateral pairs {tuple(map(tuple, lateral_pairs))} overlap")
    return order


def padding_to_patch(image_shape: Sequence[int], patch_size: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) padding per spatial axis that grows each axis to at least the patch, centred."""
    padding = []
    for size, patch in zip(image_shape, patch_size):
        missing = max(int(patch) - int(size), 0)
        padding.append((missing // 2, missing - missing // 2))
    return padding


def _first_output(output) -> torch.Tensor:
    """The full-resolution logits: with deep supervision the network returns a list, finest first."""
    if isinstance(output, (list, tuple)):
        return output[0]
    return output


def _allocate_accumulators(num_classes: int, spatial_shape: Sequence[int], device: torch.device):
    """Summed weighted probabilities and summed weights, on ``device`` if they fit there, else on the CPU."""
    try:
        probabilities = torch.zeros((num_classes, *spatial_shape), dtype=torch.float32, device=device)
        weights = torch.zeros(tuple(spatial_shape), dtype=torch.float32, device=device)
        return probabilities, weights
    except torch.cuda.OutOfMemoryError:
        probabilities = weights = None
        torch.cuda.empty_cache()
        cpu = torch.device("cpu")
        return (torch.zeros((num_classes, *spatial_shape), dtype=torch.float32, device=cpu),
                torch.zeros(tuple(spatial_shape), dtype=torch.float32, device=cpu))


def _predict_windows(network: Callable, windows: torch.Tensor, num_classes: int,
                     flips: list[tuple[int, ...]], swapped_order: list[int] | None, left_right_axis: int,
                     use_amp: bool) -> torch.Tensor:
    """Softmax of a batch of windows (B, C, *patch), averaged over the flips, un-flipped and de-swapped."""
    summed = None
    for flip in flips:
        tensor_dims = [2 + axis for axis in flip]
        network_input = torch.flip(windows, tensor_dims) if flip else windows
        with torch.autocast(device_type=windows.device.type, enabled=use_amp):
            logits = _first_output(network(network_input))
        if logits.shape[0] != windows.shape[0] or logits.shape[1] != num_classes \
                or tuple(logits.shape[2:]) != tuple(windows.shape[2:]):
            raise ValueError(f"network returned shape {tuple(logits.shape)} for input {tuple(windows.shape)}; "
                             f"expected {num_classes} classes at the input's spatial size")
        probabilities = torch.softmax(logits.float(), dim=1)
        if flip:
            probabilities = torch.flip(probabilities, tensor_dims)
        if swapped_order is not None and left_right_axis in flip:
            probabilities = probabilities[:, swapped_order]
        summed = probabilities if summed is None else summed + probabilities
    return summed / len(flips)


@torch.inference_mode()
def predict_sliding_window(network: Callable, image: np.ndarray | torch.Tensor, patch_size: Sequence[int],
                           num_classes: int, step_size: float | Sequence[float] = 0.5, mirror_axes: Sequence[int] = (),
                           lateral_pairs: Sequence[Sequence[int]] = (), left_right_axis: int = LEFT_RIGHT_AXIS,
                           batch_windows: int = 1, device: torch.device = torch.device("cpu"),
                           use_amp: bool = False, pad_value: float = 0.0) -> torch.Tensor:
    """Class probabilities for a whole preprocessed image, as a float32 CPU tensor ``(num_classes, z, y, x)``.

    ``network(x)`` maps ``(B, C, *patch_size)`` to logits ``(B, num_classes, *patch_size)`` or to a list of
    such tensors (deep supervision), of which the first (full resolution) is used; put it in eval mode and on
    ``device`` first. ``image`` is ``(C, z, y, x)``. Axes smaller than the patch are padded (centred) with
    ``pad_value`` (0, the normalised mean intensity, which is also what training patches are padded with)
    and the result is cropped back to the image.

    ``mirror_axes`` are spatial axes (0, 1, 2 = z, y, x) to mirror for test-time augmentation: all
    ``2 ** len(mirror_axes)`` flip combinations are averaged. When a flip includes ``left_right_axis``, the
    channels of each pair in ``lateral_pairs`` are swapped after un-flipping. ``batch_windows`` windows go
    through the network per forward pass. ``use_amp`` runs the network under autocast where
    :func:`autocast_available` (float16 on CUDA, bfloat16 on CPUs with native support; softmax and sums stay
    float32). On CUDA the sums live on the GPU unless allocating them there runs out of memory, in which
    case they live on the CPU.
    """
    device = torch.device(device)
    image = torch.as_tensor(image, dtype=torch.float32)
    patch_size = tuple(int(size) for size in patch_size)
    if image.ndim != SPATIAL_DIMS + 1 or len(patch_size) != SPATIAL_DIMS:
        raise ValueError(f"need a (C, z, y, x) image and a 3D patch, got {tuple(image.shape)} and {patch_size}")
    if batch_windows < 1:
        raise ValueError(f"batch_windows must be at least 1, got {batch_windows}")
    if any(axis not in range(SPATIAL_DIMS) for axis in mirror_axes):
        raise ValueError(f"mirror axes must be spatial axes 0, 1 or 2 of (z, y, x), got {tuple(mirror_axes)}")
    flips = mirror_combinations(mirror_axes)
    swapped_order = lateral_channel_order(num_classes, lateral_pairs) if lateral_pairs else None
    use_amp = bool(use_amp) and autocast_available(device)

    padding = padding_to_patch(image.shape[1:], patch_size)
    if any(before or after for before, after in padding):
        flat_padding = [amount for pair in reversed(padding) for amount in pair]  # torch pads the last axis first
        image = torch.nn.functional.pad(image, flat_padding, mode="constant", value=pad_value)
    padded_shape = tuple(image.shape[1:])

    gaussian = torch.from_numpy(gaussian_importance_map(patch_size))
    summed_probabilities, summed_weights = _allocate_accumulators(num_classes, padded_shape, device)
    gaussian = gaussian.to(summed_weights.device)

    corners = list(itertools.product(*window_starts(padded_shape, patch_size, step_size)))
    for first in range(0, len(corners), batch_windows):
        batch_corners = corners[first:first + batch_windows]
        regions = [tuple(slice(start, start + size) for start, size in zip(corner, patch_size))
                   for corner in batch_corners]
        windows = torch.stack([image[(slice(None), *region)] for region in regions]).to(device, non_blocking=True)
        probabilities = _predict_windows(network, windows, num_classes, flips, swapped_order, left_right_axis,
                                         use_amp)
        probabilities = probabilities.to(summed_probabilities.device)
        for index, region in enumerate(regions):
            summed_probabilities[(slice(None), *region)] += probabilities[index] * gaussian
            summed_weights[region] += gaussian

    summed_probabilities /= summed_weights
    crop = tuple(slice(before, size - after) for (before, after), size in zip(padding, padded_shape))
    return summed_probabilities[(slice(None), *crop)].to("cpu").contiguous()
