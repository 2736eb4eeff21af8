"""The planning rules, as pure functions. Each returns its value and a one-line reason.

The rules are nnU-Net v2's published ones (Isensee et al., Nature Methods 2021, and the v2 residual-encoder
planners), applied to covnet's own network and memory model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from covnet.image.grid import ANISOTROPY_THRESHOLD
from covnet.network.topology import Topology
from covnet.planning.cpu_time import CALIBRATION_MACHINE, CpuMachine, IterationEstimate, estimate_iteration
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
    # what bounded the choice, where a budget did: "memory", "time" or "median shape"
    limit: str | None = None


@dataclass(frozen=True)
class NetworkSize:
    """Width and depth of the residual-encoder UNet: features base·2^i capped at ``max_features``, and
    ``encoder_blocks`` residual blocks per stage (later stages repeat the last value)."""
    base_features: int
    max_features: int
    encoder_blocks: tuple[int, ...]

    def features(self, stages: int) -> list[int]:
        return [min(self.base_features * 2 ** i, self.max_features) for i in range(stages)]

    def blocks(self, stages: int) -> list[int]:
        return [self.encoder_blocks[min(i, len(self.encoder_blocks) - 1)] for i in range(stages)]

    def describe(self) -> str:
        blocks = "-".join(str(b) for b in self.encoder_blocks)
        return f"features {self.base_features}·2^i ≤ {self.max_features}, residual blocks {blocks}"


# nnU-Net's ResEnc "M" network, what a CUDA plan trains.
RESENC_M = NetworkSize(BASE_FEATURES, MAX_FEATURES, ENCODER_BLOCKS)
# CPU plans try these, largest first (each costs less time per voxel than the one before).
CPU_NETWORK_SIZES = (
    RESENC_M,
    NetworkSize(32, 320, (1, 2, 3, 4, 4, 4)),
    NetworkSize(24, 256, (1, 2, 3, 3, 3, 3)),
    NetworkSize(16, 256, (1, 2, 2, 2, 2, 2)),
    NetworkSize(16, 128, (1, 2, 2, 2, 2, 2)),
    NetworkSize(8, 64, (1, 2, 2, 2, 2, 2)),
    NetworkSize(8, 64, (1, 1, 1, 1, 1, 1)),
)
# A CPU plan keeps the largest network that still trains a patch of at least this many voxels (or the whole
# median case, if smaller) within the time budget; below it, context matters more than width.
CPU_MIN_PATCH_VOXELS = 48 ** 3


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


def network_topology(target_spacing, patch_size, in_channels: int, num_classes: int,
                     network_size: NetworkSize = RESENC_M) -> Topology:
    """Strides, kernels, features and blocks per stage for a patch at the target spacing (nnU-Net's rules).

    Why: pooling an axis whose spacing is much coarser than the others would make the receptive field
    lopsided in millimetres. So an axis is pooled only while its feature map stays ≥ 4 voxels and its spacing
    is within 2× of the finest axis that can still be pooled; a lone poolable axis needs ≥ 12 voxels. Kernels
    are 1 wide along an axis until its spacing comes within 2× of the finest, then 3; the bottleneck's are 3.
    Width and blocks per stage come from ``network_size`` (ResEnc M unless a CPU plan picks a smaller one).
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
                    features_per_stage=network_size.features(stages), kernel_sizes=kernel_sizes, strides=strides,
                    n_blocks_per_stage=network_size.blocks(stages),
                    n_conv_per_stage_decoder=[1] * (stages - 1), deep_supervision=True)


def fit_patch_to_network(target_spacing, patch_size, in_channels: int, num_classes: int,
                         network_size: NetworkSize = RESENC_M) -> tuple[list[int], Topology]:
    """Round the patch down to a multiple of the total pooling per axis (a UNet needs it) and re-derive."""
    patch = [int(p) for p in patch_size]
    while True:
        network = network_topology(target_spacing, patch, in_channels, num_classes, network_size)
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


def shrink_until_it_fits(target_spacing, median_shape, in_channels: int, num_classes: int, exceeds,
                         network_size: NetworkSize = RESENC_M) -> tuple[list[int], list[int], Topology, str | None]:
    """Walk the patch down from the 256³ start until ``exceeds(patch, network)`` returns None.

    ``exceeds`` names what a candidate exceeds ("memory", "time"), or returns None when it fits. Each step
    shrinks the axis furthest above the median shape (relative to it) by one pooling unit, so the patch stays
    close to the data's shape and every later patch is smaller on every axis. Returns the start, the patch,
    its network, and what the last rejected patch exceeded (None if the start fits); a ValueError if nothing
    fits."""
    patch, network = fit_patch_to_network(target_spacing, initial_patch_size(target_spacing, median_shape),
                                          in_channels, num_classes, network_size)
    start, exceeded = list(patch), None
    while (problem := exceeds(patch, network)) is not None:
        exceeded = problem
        axis = axis_to_shrink(patch, median_shape, network.total_stride)
        if axis is None:
            raise ValueError(f"no patch fits the {problem} budget")
        patch[axis] -= network.total_stride[axis]
        patch, network = fit_patch_to_network(target_spacing, patch, in_channels, num_classes, network_size)
    return start, patch, network, exceeded


def choose_patch_and_network(target_spacing, median_shape, memory_budget_bytes: float,
                             in_channels: int, num_classes: int, amp: bool = False) -> tuple[Decision, Topology]:
    """Largest patch (from 256³ down) whose batch of 2 fits the memory budget (a CUDA plan: memory is the limit).

    Why: a larger patch gives more context; when it does not fit, shrink the axis that is furthest above
    the median shape (relative to it) by one pooling unit, so the patch stays close to the data's shape.
    ``amp``: the memory model of mixed-precision training (what a CUDA plan trains with).
    """
    def exceeds(patch, network):
        fits = estimate_training_memory_bytes(patch, MIN_BATCH_SIZE, network, amp) <= memory_budget_bytes
        return None if fits else "memory"

    try:
        start, patch, network, exceeded = shrink_until_it_fits(target_spacing, median_shape, in_channels,
                                                               num_classes, exceeds)
    except ValueError:
        raise ValueError(f"no patch fits a {memory_budget_bytes / 2**30:.2f} GiB budget") from None
    model = "AMP" if amp else "float32"
    if exceeded is None:
        reason = (f"isotropic-in-mm 256³ start capped by median shape {_fmt(median_shape)}; fits the budget "
                  f"({model} memory model)")
    else:
        reason = (f"shrunk from {_fmt(start)} (largest axis relative to median shape first) to fit the budget "
                  f"(limited by memory, {model} memory model)")
    reason += f"; divisible by pooling {_fmt(network.total_stride)}"
    return Decision(patch, reason, "median shape" if exceeded is None else "memory"), network


def choose_cpu_patch_and_network(target_spacing, median_shape, seconds_budget: float, memory_budget_bytes: float,
                                 in_channels: int, num_classes: int, machine: CpuMachine = CALIBRATION_MACHINE
                                 ) -> tuple[Decision, Decision, IterationEstimate]:
    """A CPU plan: time per iteration is the limit. Returns the patch, the network and its estimated iteration.

    Why: on a CPU one iteration (batch 2) of ResEnc M at a useful patch takes seconds, so training
    would crawl. Try the network sizes of ``CPU_NETWORK_SIZES`` largest first and keep the first whose largest
    patch within the budget (the network and the data pipeline's share on ``machine``, estimated by
    ``covnet.planning.cpu_time``, and also within the memory budget) has ≥ ``CPU_MIN_PATCH_VOXELS`` voxels or
    is the whole median-capped start; if none does, the smallest network with its largest fitting patch. A
    bigger budget never gives a smaller network or patch: each size's patch search walks the same shrinking
    sequence, and stops earlier.
    """
    def exceeds(patch, network):
        if estimate_iteration(patch, MIN_BATCH_SIZE, network, machine).seconds > seconds_budget:
            return "time"
        if estimate_training_memory_bytes(patch, MIN_BATCH_SIZE, network, machine.bfloat16) > memory_budget_bytes:
            return "memory"
        return None

    median_voxels = math.prod(float(v) for v in median_shape)
    wanted = min(CPU_MIN_PATCH_VOXELS, median_voxels)
    choice, rejected_by = None, None
    for index, network_size in enumerate(CPU_NETWORK_SIZES):
        try:
            start, patch, network, exceeded = shrink_until_it_fits(target_spacing, median_shape, in_channels,
                                                                   num_classes, exceeds, network_size)
        except ValueError:
            rejected_by = rejected_by or "time"
            continue
        choice = (index, network_size, start, patch, network, exceeded, rejected_by)
        if exceeded is None or math.prod(patch) >= wanted:
            break
        rejected_by = exceeded
    if choice is None:
        raise ValueError(f"no patch of even the smallest network ({CPU_NETWORK_SIZES[-1].describe()}) trains "
                         f"within {seconds_budget:g} s per iteration and {memory_budget_bytes / 2**30:.2f} GiB")
    index, network_size, start, patch, network, exceeded, rejected_by = choice
    estimate = estimate_iteration(patch, MIN_BATCH_SIZE, network, machine)
    # a smaller network than ResEnc M means a budget already limited the larger ones
    limit = exceeded or rejected_by or "median shape"
    fits = f"estimated {estimate.seconds:.2g} s/iteration ≤ budget {seconds_budget:g} s"
    if exceeded is None:
        patch_reason = f"CPU plan: isotropic-in-mm 256³ start capped by median shape {_fmt(median_shape)}; {fits}"
    else:
        patch_reason = (f"CPU plan: shrunk from {_fmt(start)} (largest axis relative to median shape first), "
                        f"limited by {exceeded}; {fits}")
    patch_reason += f"; divisible by pooling {_fmt(network.total_stride)}"
    if index == 0:
        network_reason = f"CPU plan: ResEnc M ({network_size.describe()}) fits the time budget"
    else:
        network_reason = (f"CPU plan: {network_size.describe()}, the largest of {len(CPU_NETWORK_SIZES)} sizes "
                          f"whose patch within {seconds_budget:g} s/iteration has ≥ {wanted:.0f} voxels "
                          f"({network.parameter_count() / 1e6:.1f} M parameters)")
        if math.prod(patch) < wanted:
            network_reason = (f"CPU plan: {network_size.describe()}, the smallest size; even its patch stays "
                              f"below {wanted:.0f} voxels within {seconds_budget:g} s/iteration")
    network_reason += ("; pool while ≥ 8 voxels and spacing within 2× of the finest poolable axis; kernels 3 "
                       "once within 2× of the finest")
    return Decision(patch, patch_reason, limit), Decision(network, network_reason, limit), estimate


def choose_batch_size(patch_size, network: Topology, memory_budget_bytes: float, dataset_voxels: float,
                      amp: bool = False) -> Decision:
    """Largest batch that fits the budget, but ≥ 2 and covering ≤ 5% of the dataset's voxels."""
    per_sample = (estimate_training_memory_bytes(patch_size, 2, network, amp)
                  - estimate_training_memory_bytes(patch_size, 1, network, amp))
    fixed = estimate_training_memory_bytes(patch_size, 1, network, amp) - per_sample
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
