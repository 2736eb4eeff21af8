"""Training and validation transforms for the batches of ``covnet.training.data``, on batchgeneratorsv2.

batchgeneratorsv2 rather than batchgenerators v1: the same pipeline ran 2.6-5x faster with it (1.5-2x against
v1 with linear instead of cubic image interpolation; ``benchmarks/augmentation_speed.py``, 2-core CPU). Its
transforms work on one sample at a time, as torch tensors; ``BatchTransforms`` runs them over a batch from the
sampler and collates the result, so it can be handed to batchgenerators' ``MultiThreadedAugmenter`` as its
``transform``.

Input batches: ``{"data": float32 (B, C, z, y, x), "target": (B, 1, z, y, x)}``, target -1 marking voxels
outside the case. ``training_transforms`` applies nnU-Net's default augmentation with its probabilities and
ranges (``covnet.training.settings.AugmentationSettings``), in its order:

1. rotation (p 0.2 per sample; ±30° about each axis, or only in-plane ±180° for "dummy 2D" patches, those
   with ``max(patch) / patch[0] > 3``) and scaling (p 0.2, 0.7-1.4, one factor for all axes) of the
   pre-augmentation patch, then a centre crop to the patch size; no elastic deformation. Image: trilinear
   (batchgeneratorsv2 has no cubic 3D sampling), border 0. Target: trilinear interpolation of each label's
   indicator, the highest score wins (ties: the nearest voxel's label), border -1.
2. Gaussian noise (p 0.1, variance 0-0.1), Gaussian blur (p 0.2, sigma 0.5-1, each channel p 0.5; direct
   separable convolution, since kernels of at most 7 voxels gain nothing from FFT and batchgeneratorsv2's
   FFT auto-tuning would spend 18 trial blurs per new shape and kernel size in every worker),
   multiplicative brightness (p 0.15, 0.75-1.25), contrast (p 0.15, 0.75-1.25), simulated low resolution
   (p 0.25, zoom 0.5-1, each channel p 0.5), gamma on the inverted image (p 0.1) and plain gamma (p 0.3),
   0.7-1.5, both keeping mean and standard deviation.
3. mirroring, p 0.5 per allowed axis and sample (``LateralMirrorTransform``): a flip along the left-right
   axis (x, the last axis) also exchanges lateral label pairs (left lung <-> right lung), because a mirrored
   left lung looks like a right one. A rotation is no reflection and keeps the labels as they are.
4. target -1 -> 0 (background), or -> the ignore label when the dataset has one.

Then, for the batch: deep-supervision targets (one per network output, nearest-neighbour downsampling) and
tensors (data float32, targets int16). ``validation_transforms`` does only step 4 and the batch part.

Random numbers: numpy's global generator (which ``MultiThreadedAugmenter`` seeds per worker) and torch's.
A forked worker inherits torch's generator state from its parent, so in every process other than the one that
built the transforms, ``BatchTransforms`` first reseeds torch from numpy and limits torch to one thread.
"""
from __future__ import annotations

import itertools
import os
from typing import Collection, Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform

from covnet.image.orientation import LEFT_RIGHT_AXIS
from covnet.training.data import OUTSIDE_CASE_LABEL
from covnet.training.settings import AugmentationSettings
from covnet.training.strong_augmentation import strong_augmentation_transforms

DUMMY_2D_ANISOTROPY = 3.0
ROTATION_GRID_STEP_DEGREES = 2.0
MAX_ANGLES_PER_AXIS = 31


DEFAULT_AUGMENTATION = AugmentationSettings()


# ---------------------------------------------------------------------------------------------- geometry

def is_dummy_2d(patch_size: Sequence[int]) -> bool:
    """Patches much thinner in z than in-plane are augmented slice-wise (in-plane rotation and scaling only)."""
    return max(patch_size) / patch_size[0] > DUMMY_2D_ANISOTROPY


def _rotation(axis: int, angles: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotations by ``angles`` (radians) in the plane of the two axes other than ``axis``."""
    first, second = [a for a in range(3) if a != axis]
    matrices = np.zeros((len(angles), 3, 3))
    matrices[:, axis, axis] = 1
    matrices[:, first, first] = matrices[:, second, second] = np.cos(angles)
    matrices[:, first, second] = -np.sin(angles)
    matrices[:, second, first] = np.sin(angles)
    return matrices


def _angle_grid(max_degrees: float) -> np.ndarray:
    """Angles (radians) from -max to +max in steps of at most 2°, at most 31 of them."""
    max_degrees = min(abs(max_degrees), 180.0)
    count = min(1 + 2 * int(np.ceil(max_degrees / ROTATION_GRID_STEP_DEGREES)), MAX_ANGLES_PER_AXIS)
    return np.deg2rad(np.linspace(-max_degrees, max_degrees, count))


def get_pre_augmentation_patch_size(patch_size: Sequence[int], rotation_degrees: float,
                                    scale_range: Sequence[float], dummy_2d: bool | None = None) -> tuple[int, ...]:
    """The patch to read so that rotating by up to ``±rotation_degrees`` (about every axis, or only in-plane
    for dummy-2D patches) and scaling the sampling coordinates by up to ``max(scale_range)`` stays inside it:
    no empty corners.

    The worst rotation is searched on a grid of angles. Between grid points (``step`` apart) a corner's
    coordinate, as a function of any one angle, is a constant plus a sinusoid of amplitude at most the corner's
    distance ``r`` from the centre, so the grid misses at most ``r (1 - cos(step / 2))`` per rotated axis;
    that is added, and no coordinate can exceed ``r`` itself: an upper bound, tight to a small fraction of a
    voxel for ±30°."""
    patch_size = tuple(int(v) for v in patch_size)
    if dummy_2d is None:
        dummy_2d = is_dummy_2d(patch_size)
    rotated_axes = (0,) if dummy_2d else (0, 1, 2)
    angles = _angle_grid(rotation_degrees)
    step = angles[1] - angles[0] if len(angles) > 1 else 0.0
    rotations = np.eye(3)[None]
    for axis in rotated_axes:
        rotations = (_rotation(axis, angles)[:, None] @ rotations[None]).reshape(-1, 3, 3)
    half_extent = (np.array(patch_size) - 1) / 2
    if dummy_2d:
        half_extent[0] = 0.0    # slices are rotated one by one
    corners = np.array(list(itertools.product(*[(-h, h) for h in half_extent])))    # (8, 3)
    radius = float(np.linalg.norm(half_extent))
    on_grid = np.abs(np.einsum("nij,kj->nki", rotations, corners)).max(axis=(0, 1))  # (3,)
    reach = np.minimum(on_grid + len(rotated_axes) * radius * (1 - np.cos(step / 2)), radius)
    reach = np.maximum(reach, half_extent)
    zoom = max(1.0, float(max(scale_range)))
    needed = np.ceil(2 * reach * zoom + 1 - 1e-6).astype(int)
    size = np.maximum(needed, patch_size)
    if dummy_2d:
        size[0] = patch_size[0]
    return tuple(int(v) for v in size)


def training_read_size(patch_size: Sequence[int], settings: AugmentationSettings = DEFAULT_AUGMENTATION
                       ) -> tuple[int, ...]:
    """``get_pre_augmentation_patch_size`` for the rotation and scaling of ``settings``."""
    dummy_2d = is_dummy_2d(patch_size)
    degrees = settings.dummy_2d_rotation_degrees if dummy_2d else settings.rotation_degrees
    if settings.p_rotation == 0:
        degrees = 0.0
    scale = settings.scale_range if settings.p_scaling > 0 else (1.0, 1.0)
    return get_pre_augmentation_patch_size(patch_size, degrees, scale, dummy_2d)


def downsample_nearest(target: torch.Tensor, scale: Sequence[float]) -> torch.Tensor:
    """(B, C, *spatial) -> spatial size ``round(size * scale)``, each new voxel taking the voxel whose centre
    is nearest to its own."""
    spatial = target.shape[2:]
    new_shape = [max(1, int(round(size * s))) for size, s in zip(spatial, scale)]
    for axis, (new, size) in enumerate(zip(new_shape, spatial)):
        if new != size:
            index = torch.clamp(((torch.arange(new) + 0.5) * size / new).long(), max=size - 1)
            target = target.index_select(axis + 2, index)
    return target


# ---------------------------------------------------------------------------------------------- transforms

class LateralMirrorTransform(BasicTransform):
    """Flip a sample along each of ``axes`` (spatial, 0 = z) with probability ``p_per_axis``; a flip along
    ``lateral_axis`` also exchanges the two labels of every pair in ``lateral_pairs`` in the segmentation."""

    def __init__(self, axes: Sequence[int] = (0, 1, 2), lateral_pairs: Sequence[tuple[int, int]] = (),
                 lateral_axis: int = LEFT_RIGHT_AXIS, p_per_axis: float = 0.5):
        super().__init__()
        if any(axis not in (0, 1, 2) for axis in axes):
            raise ValueError(f"mirror axes are spatial axes 0, 1, 2, not {tuple(axes)}")
        self.axes = tuple(axes)
        self.lateral_pairs = [(int(a), int(b)) for a, b in lateral_pairs]
        self.lateral_axis = lateral_axis
        self.p_per_axis = p_per_axis

    def get_parameters(self, **sample) -> dict:
        return {"axes": [axis for axis in self.axes if torch.rand(1).item() < self.p_per_axis]}

    def _apply_to_image(self, image: torch.Tensor, axes: list[int]) -> torch.Tensor:
        return torch.flip(image, [axis + 1 for axis in axes]) if axes else image

    def _apply_to_segmentation(self, segmentation: torch.Tensor, axes: list[int]) -> torch.Tensor:
        if not axes:
            return segmentation
        flipped = torch.flip(segmentation, [axis + 1 for axis in axes])
        if self.lateral_axis in axes:
            flipped = self.swap_lateral_labels(flipped)
        return flipped

    def swap_lateral_labels(self, segmentation: torch.Tensor) -> torch.Tensor:
        swapped = segmentation.clone()
        for left, right in self.lateral_pairs:
            swapped[segmentation == left] = right
            swapped[segmentation == right] = left
        return swapped

    def _apply_to_regr_target(self, regression_target, **params):
        raise NotImplementedError("covnet has no regression targets")


class BatchTransforms:
    """Apply per-sample batchgeneratorsv2 transforms to each sample of a sampler batch, collate, and add the
    deep-supervision targets. Callable as ``transforms(**batch) -> batch`` (batchgenerators' convention).
    The samples' images are not copied first: transforms may change the input ``data`` array in place."""

    def __init__(self, sample_transforms: Sequence[BasicTransform],
                 deep_supervision: Sequence[Sequence[float]] | None = None, *,
                 noised_cases: Collection[str] = (), noise_transforms: Sequence[BasicTransform] = (),
                 noise_position: int = 0):
        """Samples of ``noised_cases`` (a self-training student's pseudo-labelled cases) also get
        ``noise_transforms``, inserted before ``sample_transforms[noise_position]``."""
        self.sample_transforms = list(sample_transforms)
        self.deep_supervision = None if deep_supervision is None else [list(s) for s in deep_supervision]
        self.noised_cases = frozenset(noised_cases)
        self.noised_transforms = self.sample_transforms[:noise_position] + list(noise_transforms) + \
            self.sample_transforms[noise_position:]
        self._prepared_process = os.getpid()

    def _prepare_worker(self) -> None:
        if os.getpid() != self._prepared_process:
            torch.manual_seed(int(np.random.randint(0, 2 ** 31 - 1)))
            torch.set_num_threads(1)
            self._prepared_process = os.getpid()

    def __call__(self, **batch) -> dict:
        self._prepare_worker()
        images, targets = [], []
        with torch.no_grad():
            for sample in range(len(batch["data"])):
                item = {"image": torch.as_tensor(np.asarray(batch["data"][sample], dtype=np.float32)),
                        "segmentation": torch.as_tensor(np.asarray(batch["target"][sample]).astype(np.int16))}
                noised = batch.get("cases") is not None and batch["cases"][sample] in self.noised_cases
                for transform in self.noised_transforms if noised else self.sample_transforms:
                    item = transform(**item)
                images.append(item["image"])
                targets.append(item["segmentation"])
            target = torch.stack(targets).to(torch.int16)
            batch["data"] = torch.stack(images).to(torch.float32).contiguous()
            batch["target"] = target if self.deep_supervision is None else \
                [downsample_nearest(target, scale).contiguous() for scale in self.deep_supervision]
        return batch


# ---------------------------------------------------------------------------------------------- pipelines

def _spatial_transforms(patch_size: Sequence[int], settings: AugmentationSettings) -> list[BasicTransform]:
    dummy_2d = is_dummy_2d(patch_size)
    degrees = settings.dummy_2d_rotation_degrees if dummy_2d else settings.rotation_degrees
    limit = float(np.deg2rad(degrees))
    spatial = SpatialTransform(
        tuple(patch_size[1:]) if dummy_2d else tuple(patch_size), patch_center_dist_from_border=0,
        random_crop=False, p_elastic_deform=0, p_rotation=settings.p_rotation, rotation=(-limit, limit),
        p_rot_per_axis=1, p_scaling=settings.p_scaling, scaling=tuple(settings.scale_range),
        p_synchronize_scaling_across_axes=1, mode_seg="bilinear", border_mode_seg="constant",
        padding_value_seg=OUTSIDE_CASE_LABEL, mode_image="bilinear", padding_mode_image="zeros")
    return [Convert3DTo2DTransform(), spatial, Convert2DTo3DTransform()] if dummy_2d else [spatial]


def _intensity_transforms(patch_size: Sequence[int], settings: AugmentationSettings) -> list[BasicTransform]:
    s = settings
    low_resolution = SimulateLowResolutionTransform(
        scale=s.low_resolution_zoom, synchronize_channels=False, synchronize_axes=True,
        ignore_axes=(0,) if is_dummy_2d(patch_size) else None, allowed_channels=None,
        p_per_channel=s.p_low_resolution_per_channel)
    gamma = [GammaTransform(gamma=BGContrast(s.gamma_range), p_invert_image=invert, synchronize_channels=False,
                            p_per_channel=1, p_retain_stats=1) for invert in (1, 0)]
    chance = [
        (GaussianNoiseTransform(noise_variance=s.noise_variance, p_per_channel=1, synchronize_channels=True),
         s.p_noise),
        (GaussianBlurTransform(blur_sigma=s.blur_sigma, synchronize_channels=False, synchronize_axes=False,
                               p_per_channel=s.p_blur_per_channel, benchmark=False), s.p_blur),
        (MultiplicativeBrightnessTransform(multiplier_range=BGContrast(s.brightness_range), synchronize_channels=False,
                                           p_per_channel=1), s.p_brightness),
        (ContrastTransform(contrast_range=BGContrast(s.contrast_range), preserve_range=True, synchronize_channels=False,
                           p_per_channel=1), s.p_contrast),
        (low_resolution, s.p_low_resolution),
        (gamma[0], s.p_inverted_gamma),
        (gamma[1], s.p_gamma),
    ]
    return [RandomTransform(transform, apply_probability=p) for transform, p in chance]


def _outside_case(ignore_label: int | None) -> RemoveLabelTransform:
    return RemoveLabelTransform(OUTSIDE_CASE_LABEL, 0 if ignore_label is None else ignore_label)


def training_transforms(patch_size: Sequence[int], deep_supervision: Sequence[Sequence[float]] | None = None,
                        mirror_axes: Sequence[int] = (0, 1, 2), lateral_pairs: Sequence[tuple[int, int]] = (),
                        ignore_label: int | None = None,
                        settings: AugmentationSettings = DEFAULT_AUGMENTATION, *,
                        noised_cases: Collection[str] = ()) -> BatchTransforms:
    """The training augmentation for batches read at ``training_read_size(patch_size, settings)``; returns
    patches of ``patch_size``. ``deep_supervision``: the topology's ``deep_supervision_scales`` or None for a
    single target; ``lateral_pairs``: the plan's ``lateral_pairs``. Patches of ``noised_cases`` also get the
    strong augmentation of ``covnet.training.strong_augmentation`` (they need an ignore label), after the
    standard intensity transforms."""
    transforms = _spatial_transforms(patch_size, settings) + _intensity_transforms(patch_size, settings)
    noise_position = len(transforms)
    if mirror_axes:
        transforms.append(LateralMirrorTransform(mirror_axes, lateral_pairs, p_per_axis=settings.p_mirror_per_axis))
    transforms.append(_outside_case(ignore_label))
    if noised_cases and ignore_label is None:
        raise ValueError("strong augmentation blanks labels to the ignore label: the plan needs one")
    noise = strong_augmentation_transforms(ignore_label) if noised_cases else []
    return BatchTransforms(transforms, deep_supervision, noised_cases=noised_cases, noise_transforms=noise,
                           noise_position=noise_position)


def validation_transforms(deep_supervision: Sequence[Sequence[float]] | None = None,
                          ignore_label: int | None = None) -> BatchTransforms:
    """No augmentation: outside-the-case labels, deep-supervision targets and tensors only (batches read at
    the patch size)."""
    return BatchTransforms([_outside_case(ignore_label)], deep_supervision)
