"""Resampling 3D volumes to a new spacing or shape (pure functions: numpy in, numpy out).

Grid: pixel-centre aligned (``align_corners=False``). Along an axis resampled from ``n_in`` to ``n_out``
samples, output sample ``i`` sits at input coordinate ``(i + 0.5) * n_in / n_out - 0.5``, so the field of
view (shape × spacing) is preserved. Outside the input the edge value is replicated.

Every interpolation order used here is separable, so a 3D resampling is three 1-D resamplings, one per
axis. Along one axis it is a linear map ``out = W @ in`` with a banded ``W`` (n_out × n_in); we apply it
as float32 matrix products (torch) on tiles of the band, one axis at a time, shrinking axes first so
that intermediate arrays stay small. The products run single-threaded on a pool of as many Python
threads as torch was set to use (``torch.set_num_threads``), which is set to 1 for the duration.

Orders: 0 = nearest (a gather), 1 = linear, 3 = cubic B-spline with its prefilter and scipy's
``mode='nearest'`` boundary, i.e. the same interpolant as ``scipy.ndimage.map_coordinates(order=3)``
(and so as nnU-Net's default skimage ``resize(order=3)``).

Separate z (nnU-Net v2's rule): when the current spacing (or else the target spacing) is anisotropic,
the coarse axis is resampled with order 0 and the other two with the requested order.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Iterator, Sequence

import numpy as np
import scipy.ndimage
import torch

from covnet.image.boxed import BoxedProbabilities, background_probabilities
from covnet.image.grid import ANISOTROPY_THRESHOLD, coarse_axis, compute_new_shape, separate_z_axis

# Tile height for the banded products and the weight below which a B-spline tap is dropped
# (the cubic cardinal spline decays like 0.268^k: |k| > 10 taps are below 1e-6).
_TILE_ROWS = 64
_WEIGHT_EPSILON = 1e-6
# Output elements per parallel task (~1 MiB of float32): many tasks, each still a sizeable product.
_TASK_ELEMENTS = 1 << 18
# Output voxels per slab when label maps are resampled slab by slab along axis 0 (bounds memory).
_SLAB_VOXELS = 1 << 23


def source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    """Input coordinate of each output sample's centre (pixel-centre aligned grid).

    Written as ((2i + 1) n_in - n_out) / (2 n_out) so that the numerator is exact and a coordinate that
    is exactly halfway between two samples stays so (it decides order 0's ties)."""
    doubled = (2 * np.arange(n_out, dtype=np.int64) + 1) * n_in - n_out
    return doubled / (2.0 * n_out)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Order 0: index of the input sample nearest to each output centre (ties go up, as in scipy).

    floor(coordinate + 1/2) in integer arithmetic: floor((2i + 1) n_in / (2 n_out))."""
    return np.minimum((2 * np.arange(n_out, dtype=np.int64) + 1) * n_in // (2 * n_out), n_in - 1)


@lru_cache(maxsize=16)
def interpolation_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    """The 1-D resampling operator W (n_out × n_in, float64): ``resampled = W @ samples``."""
    coordinates = source_coordinates(n_in, n_out)
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if order == 0:
        matrix[rows, nearest_indices(n_in, n_out)] = 1.0
    elif order == 1:
        clamped = np.clip(coordinates, 0, n_in - 1)
        lower = np.minimum(np.floor(clamped).astype(np.int64), n_in - 1)
        upper = np.minimum(lower + 1, n_in - 1)
        fraction = clamped - lower
        np.add.at(matrix, (rows, lower), 1.0 - fraction)
        np.add.at(matrix, (rows, upper), fraction)
    elif order == 3:
        # The B-spline prefilter makes the operator dense in principle; its columns are the impulse
        # responses of scipy's 1-D order-3 interpolator, which is exactly the interpolant we want.
        impulse = np.zeros(n_in)
        for column in range(n_in):
            impulse[column] = 1.0
            matrix[:, column] = scipy.ndimage.map_coordinates(impulse, coordinates[None], order=3,
                                                              mode="nearest")
            impulse[column] = 0.0
        matrix[np.abs(matrix) < _WEIGHT_EPSILON] = 0.0
    else:
        raise ValueError(f"interpolation order must be 0, 1 or 3, not {order}")
    matrix.setflags(write=False)
    return matrix


class _BandedOperator:
    """A 1-D operator (n_out × n_in matrix) cut into tiles of output rows, each with the input window that
    its rows need, as float32 tensors."""

    def __init__(self, matrix: np.ndarray):
        self.n_out, self.n_in = matrix.shape
        self.tiles: list[tuple[int, int, torch.Tensor, torch.Tensor, int, int]] = []
        for start in range(0, self.n_out, _TILE_ROWS):
            stop = min(start + _TILE_ROWS, self.n_out)
            used = np.flatnonzero(np.any(matrix[start:stop] != 0, axis=0))
            first, last = int(used[0]), int(used[-1]) + 1
            block = torch.from_numpy(np.ascontiguousarray(matrix[start:stop, first:last], dtype=np.float32))
            self.tiles.append((start, stop, block, block.T.contiguous(), first, last))

    def multiply_left(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """target (n_out × k) = W @ source (n_in × k); both may be column slices of larger matrices."""
        for start, stop, block, _, first, last in self.tiles:
            torch.mm(block, source[first:last], out=target[start:stop])

    def multiply_right(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """target (k × n_out) = source (k × n_in) @ W.T."""
        for start, stop, _, block_t, first, last in self.tiles:
            torch.mm(source[:, first:last], block_t, out=target[:, start:stop])


def _run_in_parallel(tasks: list, workers: int) -> None:
    """Run zero-argument callables on ``workers`` threads (the products release the GIL).

    Many small tasks handed out on demand, rather than torch's own threads, keep the speed when other
    processes share the cores: an OpenMP team waits for its slowest thread at every product."""
    if workers <= 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(task) for task in tasks]:
            future.result()


def _chunks(length: int, size: int) -> list[slice]:
    size = max(1, size)
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def _apply_along_axis(volume: torch.Tensor, axis: int, matrix: np.ndarray, order: int,
                      workers: int) -> torch.Tensor:
    """``matrix`` (n_out × n_in) applied along ``axis`` of a 3D float32 tensor."""
    n_out, n_in = matrix.shape
    if order == 0:
        return torch.index_select(volume, axis, torch.from_numpy(matrix.argmax(axis=1)))
    operator = _BandedOperator(matrix)
    shape = list(volume.shape)
    shape[axis] = n_out
    result = torch.empty(shape, dtype=torch.float32)
    if axis == 0:  # (n_in, y·x) matrices, cut into column chunks
        source, target = volume.reshape(n_in, -1), result.reshape(n_out, -1)
        tasks = [partial(operator.multiply_left, source[:, part], target[:, part])
                 for part in _chunks(source.shape[1], _TASK_ELEMENTS // n_out)]
    elif axis == 1:  # one (n_in, x) matrix per z slice
        tasks = [partial(operator.multiply_left, volume[index], result[index]) for index in range(shape[0])]
    else:  # (z·y, n_in) matrices, cut into row chunks
        source, target = volume.reshape(-1, n_in), result.reshape(-1, n_out)
        tasks = [partial(operator.multiply_right, source[part], target[part])
                 for part in _chunks(source.shape[0], _TASK_ELEMENTS // n_out)]
    _run_in_parallel(tasks, workers)
    return result


_threads_lock = threading.Lock()
_threads_state = {"active": 0, "saved": 1}


@contextmanager
def _single_threaded_torch() -> Iterator[int]:
    """Yield the number of threads torch was set to use, while it uses one; restore it when the last
    concurrent resampling ends (so that two callers on two threads cannot leave it at 1)."""
    with _threads_lock:
        if _threads_state["active"] == 0:
            _threads_state["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_state["active"] += 1
        workers = _threads_state["saved"]
    try:
        yield workers
    finally:
        with _threads_lock:
            _threads_state["active"] -= 1
            if _threads_state["active"] == 0:
                torch.set_num_threads(_threads_state["saved"])


def _axis_matrices(shape: Sequence[int], new_shape: Sequence[int], orders: Sequence[int]) -> list:
    """The 1-D operator of each axis; None where the axis keeps its size."""
    return [None if n_in == n_out else interpolation_matrix(n_in, n_out, order)
            for n_in, n_out, order in zip(shape, new_shape, orders)]


def _resample_volume(volume: np.ndarray, matrices: Sequence[np.ndarray | None], orders: Sequence[int],
                     clip_range: tuple | None = None) -> np.ndarray:
    """Separable resampling of one 3D volume: ``matrices[axis]`` along each axis (None: unchanged);
    ``clip_range``: (low, high) as numbers or tensors that broadcast against the output."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    changed = [axis for axis in range(3) if matrices[axis] is not None]
    if not changed:  # never hand back the caller's own array
        tensor = tensor.clone()
    with _single_threaded_torch() as workers:
        # Shrinking axes first, growing axes last: the intermediates stay as small as possible.
        for axis in sorted(changed, key=lambda a: matrices[a].shape[0] / matrices[a].shape[1]):
            tensor = _apply_along_axis(tensor, axis, matrices[axis], orders[axis], workers)
    if clip_range is not None:
        tensor.clamp_(*clip_range)
    return tensor.numpy()


def _resolve_target(shape: Sequence[int], current_spacing: Sequence[float],
                    target_spacing: Sequence[float] | None,
                    new_shape: Sequence[int] | None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    if len(shape) != 3 or len(current_spacing) != 3:
        raise ValueError(f"expected a 3D volume and 3 spacings, got shape {tuple(shape)} "
                         f"and spacing {tuple(current_spacing)}")
    if (target_spacing is None) == (new_shape is None):
        raise ValueError("give exactly one of target_spacing and new_shape")
    if new_shape is None:
        new_shape = compute_new_shape(shape, current_spacing, target_spacing)
    new_shape = tuple(int(v) for v in new_shape)
    if len(new_shape) != 3 or min(new_shape) < 1:
        raise ValueError(f"invalid new shape {new_shape}")
    if target_spacing is None:
        target_spacing = tuple(float(c) * s / n for c, s, n in zip(current_spacing, shape, new_shape))
    return new_shape, tuple(float(v) for v in target_spacing)


def _axis_orders(current_spacing: Sequence[float], target_spacing: Sequence[float], order: int,
                 separate_z: bool | None, order_z: int, anisotropy_threshold: float) -> list[int]:
    if separate_z is None:
        axis = separate_z_axis(current_spacing, target_spacing, anisotropy_threshold)
    else:
        axis = coarse_axis(current_spacing) if separate_z else None
    orders = [order] * 3
    if axis is not None:
        orders[axis] = order_z
    return orders


def resample_image(image: np.ndarray, current_spacing: Sequence[float],
                   target_spacing: Sequence[float] | None = None, *, new_shape: Sequence[int] | None = None,
                   order: int = 3, separate_z: bool | None = None, order_z: int = 0,
                   anisotropy_threshold: float = ANISOTROPY_THRESHOLD, clip_to_input_range: bool = True) -> np.ndarray:
    """Resample a (z, y, x) image to ``target_spacing`` or ``new_shape``; float32 out.

    ``separate_z``: None applies nnU-Net v2's anisotropy rule (order ``order_z``, default 0, along the coarse
    axis when the current or target spacing is anisotropic beyond ``anisotropy_threshold``); True forces it
    along the coarse axis of the current spacing; False resamples all axes with ``order``.
    ``clip_to_input_range``: clip the cubic spline's overshoot at sharp edges (e.g. bone next to air) to
    the input's [min, max], as skimage's resize, and so nnU-Net, does; under separate z, each output slice
    to the range of the input slice it comes from (nnU-Net resizes slice by slice). Orders 0 and 1 never
    overshoot.
    """
    new_shape, target_spacing = _resolve_target(image.shape, current_spacing, target_spacing, new_shape)
    orders = _axis_orders(current_spacing, target_spacing, order, separate_z, order_z, anisotropy_threshold)
    matrices = _axis_matrices(image.shape, new_shape, orders)
    clip_range = _input_range(image, matrices, orders) if clip_to_input_range and max(orders) > 1 else None
    return _resample_volume(image, matrices, orders, clip_range)


def _input_range(image: np.ndarray, matrices: list, orders: Sequence[int]) -> tuple:
    """(low, high) bounds for the output: scalars, or per output slice along a nearest-resampled axis."""
    if 0 not in orders:
        return float(image.min()), float(image.max())
    axis = orders.index(0)
    others = tuple(a for a in range(3) if a != axis)
    shape = [1, 1, 1]
    shape[axis] = -1
    bounds = []
    for reduce in (np.min, np.max):
        per_slice = reduce(image, axis=others).astype(np.float32)
        if matrices[axis] is not None:
            per_slice = per_slice[matrices[axis].argmax(axis=1)]
        bounds.append(torch.from_numpy(np.ascontiguousarray(per_slice)).reshape(shape))
    return tuple(bounds)


def resample_probabilities(probabilities: np.ndarray, current_spacing: Sequence[float],
                           target_spacing: Sequence[float] | None = None, *,
                           new_shape: Sequence[int] | None = None, order: int = 1,
                           separate_z: bool | None = None, order_z: int = 0,
                           anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> np.ndarray:
    """Resample (C, z, y, x) class probabilities channel by channel (linear, same separate-z rule)."""
    if probabilities.ndim != 4:
        raise ValueError(f"expected (C, z, y, x) probabilities, got shape {probabilities.shape}")
    return resample_boxed_probabilities(BoxedProbabilities.everywhere(probabilities), current_spacing,
                                        target_spacing, new_shape=new_shape, order=order, separate_z=separate_z,
                                        order_z=order_z, anisotropy_threshold=anisotropy_threshold).values


def resample_boxed_probabilities(probabilities: BoxedProbabilities, current_spacing: Sequence[float],
                                 target_spacing: Sequence[float] | None = None, *,
                                 new_shape: Sequence[int] | None = None, order: int = 1,
                                 separate_z: bool | None = None, order_z: int = 0,
                                 anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> BoxedProbabilities:
    """:func:`resample_probabilities` of the whole image, computed on its box alone: the full result (up to float
    rounding, about 1e-7), since every row of an interpolation operator sums to 1 and so maps certain background
    to certain background. The new box holds the output samples that any voxel of the old box reaches (none: an
    empty box); the operators' rows for them are applied to the old box widened to their support (a voxel or
    two, filled with background)."""
    new_shape, target_spacing = _resolve_target(probabilities.shape, current_spacing, target_spacing, new_shape)
    orders = _axis_orders(current_spacing, target_spacing, order, separate_z, order_z, anisotropy_threshold)
    matrices, rows, columns = [], [], []
    for part, matrix in zip(probabilities.box, _axis_matrices(probabilities.shape, new_shape, orders)):
        if matrix is None:
            matrices.append(None)
            rows.append(part)
            columns.append(part)
            continue
        reached = np.flatnonzero(np.any(matrix[:, part] != 0, axis=1))
        if reached.size == 0:          # an empty box, or one that shrinking skips: every output is background
            empty = np.zeros((probabilities.num_classes, 0, 0, 0), dtype=np.float32)
            return BoxedProbabilities(empty, (slice(0, 0),) * 3, new_shape)
        row_part = slice(int(reached[0]), int(reached[-1]) + 1)
        support = np.flatnonzero(np.any(matrix[row_part] != 0, axis=0))
        column_part = slice(min(int(support[0]), part.start), max(int(support[-1]) + 1, part.stop))
        matrices.append(matrix[row_part, column_part])
        rows.append(row_part)
        columns.append(column_part)
    if tuple(columns) == tuple(probabilities.box):
        source = probabilities.values
    else:
        source = background_probabilities(probabilities.num_classes, [part.stop - part.start for part in columns])
        source[(slice(None), *(slice(part.start - column.start, part.stop - column.start)
                               for part, column in zip(probabilities.box, columns)))] = probabilities.values
    result = np.empty((probabilities.num_classes, *(part.stop - part.start for part in rows)), dtype=np.float32)
    for channel in range(probabilities.num_classes):
        result[channel] = _resample_volume(source[channel], matrices, orders)
    return BoxedProbabilities(result, tuple(rows), new_shape)


def resample_segmentation(segmentation: np.ndarray, current_spacing: Sequence[float],
                          target_spacing: Sequence[float] | None = None, *,
                          new_shape: Sequence[int] | None = None, labels: Sequence[int] | None = None,
                          order: int = 1, separate_z: bool | None = None, order_z: int = 0,
                          anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> np.ndarray:
    """Resample a (z, y, x) label map; uint8 out.

    Each label's mask is interpolated with ``order`` (0 or 1; ``order_z`` along the coarse axis under
    separate z) and every
    output voxel takes the label whose interpolated mask is highest (ties: the lowest label). Unlike
    nnU-Net's "mask ≥ 0.5" rule this never leaves a voxel unassigned. ``labels`` defaults to the values
    present; a voxel whose value is not in ``labels`` contributes to no mask. Works slab by slab along
    axis 0, so memory stays near the size of the input and output.
    """
    new_shape, target_spacing = _resolve_target(segmentation.shape, current_spacing, target_spacing,
                                                new_shape)
    labels = sorted(int(v) for v in (_values_present(segmentation) if labels is None else labels))
    if not labels or labels[0] < 0 or labels[-1] > 255:
        raise ValueError(f"labels must be in 0..255, got {labels}")
    if order not in (0, 1) or order_z not in (0, 1):
        raise ValueError(f"label maps are resampled with order 0 or 1, not {order} / {order_z}")
    orders = _axis_orders(current_spacing, target_spacing, order, separate_z, order_z, anisotropy_threshold)
    matrices = _axis_matrices(segmentation.shape, new_shape, orders)
    result = np.empty(new_shape, dtype=np.uint8)
    slab_rows = _SLAB_VOXELS // (new_shape[1] * new_shape[2])
    for rows in _chunks(new_shape[0], slab_rows):
        if matrices[0] is None:
            window, slab_matrices = rows, [None] + matrices[1:]
        else:
            used = np.flatnonzero(np.any(matrices[0][rows] != 0, axis=0))
            window = slice(int(used[0]), int(used[-1]) + 1)
            slab_matrices = [matrices[0][rows, window]] + matrices[1:]
        result[rows] = _label_of_highest_mask(segmentation[window], labels, slab_matrices, orders)
    return result


def _label_of_highest_mask(segmentation: np.ndarray, labels: list[int], matrices: list,
                           orders: Sequence[int]) -> np.ndarray:
    values = set(_values_present(segmentation))
    present = [label for label in labels if label in values]
    out_shape = tuple(segmentation.shape[a] if m is None else m.shape[0] for a, m in enumerate(matrices))
    if len(values) == 1 and present:  # one label fills the slab
        return np.full(out_shape, present[0], dtype=np.uint8)
    best_label = np.full(out_shape, labels[0], dtype=np.uint8)
    best_score = np.zeros(out_shape, dtype=np.float32)  # absent labels score 0 and never win a tie
    for label in present:
        score = _resample_volume(segmentation == label, matrices, orders)
        better = score > best_score
        best_label[better] = label
        np.maximum(best_score, score, out=best_score)
    return best_label


def _values_present(segmentation: np.ndarray) -> list[int]:
    if segmentation.dtype == np.uint8:  # a histogram is much faster than sorting
        return np.flatnonzero(np.bincount(segmentation.ravel(), minlength=256)).tolist()
    return np.unique(segmentation).tolist()
