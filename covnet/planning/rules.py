"""The planning rules, as pure functions. Each returns its value and a one-line reason.

The rules are nnU-Net v2's published ones (Isensee et al., Nature Methods 2021, and the v2 residual-encoder
planners), applied to covnet's own network and memory model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from covnet.geometry import ANISOTROPY_THRESHOLD
from covnet.network.topology import Topology
from covnet.planning.memory import estimate_training_memory_bytes
from covnet.planning.plans import CT_SCHEME, NormalizationScheme

# nnU-Net v2 sizes the initial 3D patch to 256³ voxels, shaped like the target spacing's aspect ratio.
INITIAL_PATCH_VOXELS = 256 ** 3
# Pool an axis only while its feature map stays at least this big after pooling (nnU-Net: 4).
MIN_FEATURE_MAP_SIZE = 4
# Pool / use 3-wide kernels only on axes whose spacing is within this factor of the finest.
SPACING_RATIO_FOR_POOLING = 2.0
BASE_FEATURES = 32
MAX_FEATURES = 320
# Residual blocks per encoder stage of nnU-Net's ResEnc "M" UNet; later stages repeat the last value.
ENCODER_BLOCKS = (1, 3, 4, 6, 6, 6)
MIN_BATCH_SIZE = 2
# One batch may cover at most this fraction of the dataset's voxels, so small datasets are not overfit
# by huge batches (nnU-Net's rule).
MAX_BATCH_DATASET_FRACTION = 0.05


@dataclass(frozen=True)
class Decision:
    value: object
    reason: str


def _fmt(values) -> str:
    return "×".join(f"{v:.3g}" for v in values)


def choose_target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> Decision:
    """Median spacing; for a strongly anisotropic dataset, the 10th percentile along the coarse axis.

    Why: resampling coarse slices to the median would throw away the finer cases' detail when the data
    is a mix; nnU-Net takes the 10th percentile when the coarse axis is > 3× the next coarsest axis AND
    the median number of slices along it, ×3, is still below the smallest other axis size.
    """
    spacings, shapes = np.asarray(spacings, float), np.asarray(shapes, float)
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    coarse_axis = int(np.argmax(target))
    other_axes = [axis for axis in range(3) if axis != coarse_axis]
    ratio = target[coarse_axis] / max(target[other_axes])
    few_slices = median_shape[coarse_axis] * ANISOTROPY_THRESHOLD < min(median_shape[other_axes])
    if ratio > ANISOTROPY_THRESHOLD and few_slices:
        coarse = float(np.percentile(spacings[:, coarse_axis], 10))
        # Never make the coarse axis finer than the other axes.
        target[coarse_axis] = max(coarse, max(target[other_axes]) * 1.00001)
        return Decision([float(v) for v in target],
                        f"median spacing, but axis {'zyx'[coarse_axis]} = 10th percentile: anisotropy "
                        f"{ratio:.1f} > {ANISOTROPY_THRESHOLD:g} and {median_shape[coarse_axis]:.0f}×3 < "
                        f"{min(median_shape[other_axes]):.0f} voxels")
    why = (f"anisotropy {ratio:.1f} ≤ {ANISOTROPY_THRESHOLD:g}" if ratio <= ANISOTROPY_THRESHOLD
           else f"anisotropy {ratio:.1f} > {ANISOTROPY_THRESHOLD:g} but {median_shape[coarse_axis]:.0f} slices ×3 "
                f"≥ {min(median_shape[other_axes]):.0f}")
    return Decision([float(v) for v in target], f"median spacing ({why})")


def resampled_shapes(shapes: np.ndarray, spacings: np.ndarray, target_spacing) -> np.ndarray:
    return np.round(np.asarray(shapes, float) * np.asarray(spacings, float) / np.asarray(target_spacing, float))


def network_topology(target_spacing, patch_size, in_channels: int, num_classes: int) -> Topology:
    """Strides, kernels, features and blocks per stage for a patch at the target spacing (nnU-Net's rules).

    Why: pooling an axis whose spacing is much coarser than the others would make the receptive field
    lopsided in millimetres. So an axis is pooled only while its feature map stays ≥ 4 voxels and its spacing
    is within 2× of the finest axis that can still be pooled; a lone poolable axis needs ≥ 12 voxels. Kernels
    are 1 wide along an axis until its spacing comes within 2× of the finest, then 3; the bottleneck's are 3.
    """
    spacing = [float(s) for s in target_spacing]
    size = [int(s) for s in patch_size]
    kernel = [1, 1, 1]
    kernel_sizes, strides = [], [[1, 1, 1]]
    while True:
        poolable = [a for a in range(3) if size[a] >= 2 * MIN_FEATURE_MAP_SIZE]
        if poolable:
            finest_poolable = min(spacing[a] for a in poolable)
            poolable = [a for a in poolable if spacing[a] / finest_poolable < SPACING_RATIO_FOR_POOLING]
        if len(poolable) == 1 and size[poolable[0]] < 3 * MIN_FEATURE_MAP_SIZE:
            poolable = []
        if not poolable:
            kernel_sizes.append([3, 3, 3])
            break
        finest = min(spacing)
        kernel = [3 if kernel[a] == 3 or spacing[a] / finest < SPACING_RATIO_FOR_POOLING else 1 for a in range(3)]
        kernel_sizes.append(list(kernel))
        pool = [2 if a in poolable else 1 for a in range(3)]
        strides.append(pool)
        size = [s // p for s, p in zip(size, pool)]
        spacing = [s * p for s, p in zip(spacing, pool)]
    stages = len(kernel_sizes)
    return Topology(in_channels=in_channels, num_classes=num_classes,
                    features_per_stage=[min(BASE_FEATURES * 2 ** i, MAX_FEATURES) for i in range(stages)],
                    kernel_sizes=kernel_sizes, strides=strides,
                    n_blocks_per_stage=[ENCODER_BLOCKS[min(i, len(ENCODER_BLOCKS) - 1)] for i in range(stages)],
                    n_conv_per_stage_decoder=[1] * (stages - 1), deep_supervision=True)


def fit_patch_to_network(target_spacing, patch_size, in_channels: int, num_classes: int) -> tuple[list[int], Topology]:
    """Round the patch down to a multiple of the total pooling per axis (a UNet needs it) and re-derive."""
    patch = [int(p) for p in patch_size]
    while True:
        network = network_topology(target_spacing, patch, in_channels, num_classes)
        divisor = network.total_stride
        rounded = [max(d, (p // d) * d) for p, d in zip(patch, divisor)]
        if rounded == patch:
            return patch, network
        patch = rounded


def initial_patch_size(target_spacing, median_shape) -> list[int]:
    """256³ voxels shaped isotropic in millimetres, capped by the median resampled case shape."""
    inverse = 1.0 / np.asarray(target_spacing, float)
    patch = inverse * (INITIAL_PATCH_VOXELS / np.prod(inverse)) ** (1 / 3)
    return [int(v) for v in np.minimum(np.round(patch), np.asarray(median_shape))]


def axis_to_shrink(patch_size, median_shape, divisor) -> int | None:
    """The axis with the largest patch/median-shape ratio that can still lose one pooling unit."""
    ratios = np.asarray(patch_size, float) / np.asarray(median_shape, float)
    for axis in np.argsort(-ratios, kind="stable"):
        if patch_size[axis] - divisor[axis] >= max(divisor[axis], 2 * MIN_FEATURE_MAP_SIZE):
            return int(axis)
    return None


def choose_patch_and_network(target_spacing, median_shape, memory_budget_bytes: float,
                             in_channels: int, num_classes: int) -> tuple[Decision, Topology]:
    """Largest patch (from 256³ down) whose batch of 2 fits the memory budget.

    Why: a larger patch gives more context; when it does not fit, shrink the axis that is furthest above
    the median shape (relative to it) by one pooling unit, so the patch stays close to the data's shape.
    """
    patch, network = fit_patch_to_network(target_spacing, initial_patch_size(target_spacing, median_shape),
                                          in_channels, num_classes)
    start = list(patch)
    while estimate_training_memory_bytes(patch, MIN_BATCH_SIZE, network) > memory_budget_bytes:
        divisor = network.total_stride
        axis = axis_to_shrink(patch, median_shape, divisor)
        if axis is None:
            raise ValueError(f"no patch fits a {memory_budget_bytes / 2**30:.2f} GiB budget")
        patch[axis] -= divisor[axis]
        patch, network = fit_patch_to_network(target_spacing, patch, in_channels, num_classes)
    if patch == start:
        reason = f"isotropic-in-mm 256³ start capped by median shape {_fmt(median_shape)}; fits the budget"
    else:
        reason = f"shrunk from {_fmt(start)} (largest axis relative to median shape first) to fit the budget"
    reason += f"; divisible by pooling {_fmt(network.total_stride)}"
    return Decision(patch, reason), network


def choose_batch_size(patch_size, network: Topology, memory_budget_bytes: float, dataset_voxels: float) -> Decision:
    """Largest batch that fits the budget, but ≥ 2 and covering ≤ 5% of the dataset's voxels."""
    per_sample = (estimate_training_memory_bytes(patch_size, 2, network)
                  - estimate_training_memory_bytes(patch_size, 1, network))
    fixed = estimate_training_memory_bytes(patch_size, 1, network) - per_sample
    fits = int((memory_budget_bytes - fixed) // per_sample) if per_sample > 0 else MIN_BATCH_SIZE
    cap = round(dataset_voxels * MAX_BATCH_DATASET_FRACTION / math.prod(patch_size))
    batch = max(MIN_BATCH_SIZE, min(fits, cap))
    if batch == MIN_BATCH_SIZE and min(fits, cap) < MIN_BATCH_SIZE:
        reason = f"minimum {MIN_BATCH_SIZE} (the budget fits {fits}, the 5% dataset cap allows {cap})"
    elif cap < fits:
        reason = f"the budget fits {fits}; capped at {cap} so one batch covers ≤ 5% of the dataset's voxels"
    else:
        reason = f"the largest batch that fits the budget (the 5% dataset cap allows {cap})"
    return Decision(batch, reason)


def ct_normalization(foreground_intensity: dict) -> Decision:
    """Clip to the foreground's 0.5–99.5 percentiles, then z-score with the foreground mean and std.

    Why: CT intensities are quantitative (HU), so one dataset-wide mapping keeps tissue classes comparable
    across scans, and clipping removes metal and air outliers (nnU-Net's "CT" scheme).
    """
    low, high = foreground_intensity["percentile_00_5"], foreground_intensity["percentile_99_5"]
    value = NormalizationScheme(CT_SCHEME, clip=(low, high), mean=foreground_intensity["mean"],
                                std=max(foreground_intensity["std"], 1e-8))
    return Decision(value, f"CT: clip to foreground [{low:.0f}, {high:.0f}] HU, z-score "
                           f"mean {value.mean:.0f} std {value.std:.0f}")
