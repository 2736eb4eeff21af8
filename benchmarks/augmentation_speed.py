"""Training augmentation on batchgenerators v1 against batchgeneratorsv2 (covnet's pipeline), single process.

Usage: python benchmarks/augmentation_speed.py [--patch Z Y X ...] [--batches N] [--forced-batches N]
                                               [--v1-image-order 3|1] [--torch-threads T] [--sampler]

For each patch size: batches of 2 one-channel samples at covnet's pre-augmentation size
(``training_read_size``), with structured labels 0-3 and a strip of -1 ("outside the case") as the sampler
delivers them. "v2" is covnet's pipeline, ``covnet.training.augmentation.training_transforms``. "v1" is the
same augmentation (same probabilities and ranges, nnU-Net's v1-era choices: cubic image interpolation,
per-label linear target interpolation) built from batchgenerators v1 transforms in this script, with v1's
own mirroring (no lateral label swap; the swap costs well under 1% either way). Both end with tensors and
the deep-supervision targets of a typical topology. Per-transform rows say where the time goes; the first
batches are warm-up and not counted.

Each pipeline runs twice: at nnU-Net's probabilities (a mean over many batches, since only ~36% of samples
get rotated or scaled, and those dominate) and with every sample rotated and scaled (the cost of such a
sample, with little variance). ``--sampler`` also times ``PatchSampler`` reading batches at the
pre-augmentation size from a memory-mapped 240x320x320 case (warm page cache).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from batchgenerators.transforms.utility_transforms import RemoveLabelTransform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from covnet.training.augmentation import (  # noqa: E402
    DEFAULT_AUGMENTATION,
    AugmentationSettings,
    deep_supervision_scales,
    downsample_nearest,
    is_dummy_2d,
    training_read_size,
    training_transforms,
)

BATCH_SIZE = 2
WARMUP_BATCHES = 2
DEFAULT_PATCHES = [(48, 128, 128), (32, 64, 64)]


def typical_strides(patch):
    """Halve every axis still >= 8 voxels, 5 times (an nnU-Net-like topology, for the DS targets only)."""
    strides, size = [[1, 1, 1]], np.array(patch)
    for _ in range(5):
        step = [2 if s >= 8 else 1 for s in size]
        strides.append(step)
        size = size // step
    return strides


def make_batch(read_size, rng):
    data = rng.normal(size=(BATCH_SIZE, 1, *read_size)).astype(np.float32)
    z, y, x = np.indices(read_size)
    target = np.zeros(read_size, np.int16)
    lung = (np.abs(z - read_size[0] / 2) < read_size[0] / 3) & (np.abs(y - read_size[1] / 2) < read_size[1] / 3)
    target[lung & (x < read_size[2] / 2 - 2)] = 2
    target[lung & (x > read_size[2] / 2 + 2)] = 1
    target[(z - read_size[0] / 2) ** 2 + (y - read_size[1] / 2) ** 2 + (x - read_size[2] / 3) ** 2 < 100] = 3
    target[:, :, : read_size[2] // 10] = -1
    return data, np.broadcast_to(target, (BATCH_SIZE, 1, *read_size)).copy()


class V1Tensors:
    """The batch part of the v1 pipeline: tensors and deep-supervision targets."""

    def __init__(self, scales):
        self.scales = scales

    def __call__(self, **batch):
        batch["data"] = torch.from_numpy(batch["data"])
        target = torch.from_numpy(batch["target"].astype(np.int16))
        batch["target"] = [downsample_nearest(target, scale) for scale in self.scales]
        return batch


def v1_transforms(patch, scales, s: AugmentationSettings, image_order: int):
    if is_dummy_2d(patch):
        raise SystemExit(f"the v1 comparison pipeline is 3D only; {patch} is a dummy-2D patch")
    limit = np.deg2rad(s.rotation_degrees)
    return [
        SpatialTransform(patch, patch_center_dist_from_border=None, do_elastic_deform=False, do_rotation=True,
                         angle_x=(-limit, limit), angle_y=(-limit, limit), angle_z=(-limit, limit), p_rot_per_axis=1,
                         do_scale=True, scale=s.scale_range, border_mode_data="constant", border_cval_data=0,
                         order_data=image_order, border_mode_seg="constant", border_cval_seg=-1, order_seg=1,
                         random_crop=False, label_key="target", p_el_per_sample=0, p_scale_per_sample=s.p_scaling,
                         p_rot_per_sample=s.p_rotation, independent_scale_for_each_axis=False),
        GaussianNoiseTransform(noise_variance=s.noise_variance, p_per_sample=s.p_noise),
        GaussianBlurTransform(s.blur_sigma, different_sigma_per_channel=True, p_per_sample=s.p_blur,
                              p_per_channel=s.p_blur_per_channel),
        BrightnessMultiplicativeTransform(multiplier_range=s.brightness_range, p_per_sample=s.p_brightness),
        ContrastAugmentationTransform(contrast_range=s.contrast_range, p_per_sample=s.p_contrast),
        SimulateLowResolutionTransform(zoom_range=s.low_resolution_zoom, per_channel=True,
                                       p_per_channel=s.p_low_resolution_per_channel, order_downsample=0,
                                       order_upsample=3, p_per_sample=s.p_low_resolution),
        GammaTransform(s.gamma_range, invert_image=True, per_channel=True, retain_stats=True,
                       p_per_sample=s.p_inverted_gamma),
        GammaTransform(s.gamma_range, invert_image=False, per_channel=True, retain_stats=True, p_per_sample=s.p_gamma),
        MirrorTransform((0, 1, 2), label_key="target"),
        RemoveLabelTransform(-1, 0, input_key="target", output_key="target"),
        V1Tensors(scales),
    ]


def time_v1(patch, read_size, scales, batches, rng, settings, image_order):
    transforms = v1_transforms(patch, scales, settings, image_order)
    per_transform, totals = defaultdict(float), []
    for index in range(batches + WARMUP_BATCHES):
        data, target = make_batch(read_size, rng)
        batch = {"data": data, "target": target}
        start = time.perf_counter()
        for transform in transforms:
            before = time.perf_counter()
            batch = transform(**batch)
            if index >= WARMUP_BATCHES:
                per_transform[type(transform).__name__] += time.perf_counter() - before
        if index >= WARMUP_BATCHES:
            totals.append(time.perf_counter() - start)
    assert tuple(batch["data"].shape) == (BATCH_SIZE, 1, *patch)
    return totals, per_transform


class TimedSampleTransforms(list):
    """The per-sample transforms of covnet's pipeline, each timed."""

    def __init__(self, transforms, per_transform, counting):
        super().__init__(transforms)
        self.per_transform, self.counting = per_transform, counting

    def __iter__(self):
        for transform in list.__iter__(self):
            inner = getattr(transform, "transform", transform)
            yield _Timed(transform, type(inner).__name__, self.per_transform, self.counting)


class _Timed:
    def __init__(self, transform, name, per_transform, counting):
        self.transform, self.name, self.per_transform, self.counting = transform, name, per_transform, counting

    def __call__(self, **item):
        before = time.perf_counter()
        item = self.transform(**item)
        if self.counting[0]:
            self.per_transform[self.name] += time.perf_counter() - before
        return item


def time_v2(patch, read_size, scales, batches, rng, settings):
    pipeline = training_transforms(patch, scales, lateral_pairs=[(1, 2)], settings=settings)
    per_transform, totals, counting = defaultdict(float), [], [False]
    pipeline.sample_transforms = TimedSampleTransforms(pipeline.sample_transforms, per_transform, counting)
    for index in range(batches + WARMUP_BATCHES):
        data, target = make_batch(read_size, rng)
        counting[0] = index >= WARMUP_BATCHES
        start = time.perf_counter()
        batch = pipeline(data=data, target=target)
        if counting[0]:
            totals.append(time.perf_counter() - start)
    per_transform["collate + deep supervision"] = sum(totals) - sum(per_transform.values())
    assert tuple(batch["data"].shape) == (BATCH_SIZE, 1, *patch)
    return totals, per_transform


def time_sampler(patch, read_size, batches):
    from covnet.image.io import Geometry
    from covnet.preprocessing.case import CaseProperties
    from covnet.preprocessing.storage import save_case
    from covnet.training.data import PatchSampler
    shape = (240, 320, 320)
    with tempfile.TemporaryDirectory() as folder:
        segmentation = np.zeros(shape, np.uint8)
        segmentation[100:140, 100:200, 100:200] = 1
        identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)
        properties = CaseProperties("big", Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), identity, shape),
                                    [[0, s] for s in shape], list(shape), [1.0, 1.0, 1.0], list(shape),
                                    {"1": [[120, 150, 150], [101, 101, 101]]})
        save_case(Path(folder), np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32), segmentation,
                  properties, plan_key={}, source=[])
        sampler = PatchSampler(folder, ["big"], patch, BATCH_SIZE, pre_augmentation_patch_size=read_size, seed=0)
        for _ in range(WARMUP_BATCHES):
            next(sampler)
        start = time.perf_counter()
        for _ in range(batches):
            next(sampler)
        return (time.perf_counter() - start) / batches


def report(name, totals, per_transform):
    mean_ms = 1000 * np.mean(totals)
    print(f"  {name}: {mean_ms:.1f} ms/batch (median {1000 * np.median(totals):.1f}, "
          f"min {1000 * np.min(totals):.1f}, max {1000 * np.max(totals):.1f}, {len(totals)} batches)")
    for transform, seconds in sorted(per_transform.items(), key=lambda item: -item[1]):
        print(f"      {transform:<40} {1000 * seconds / len(totals):8.1f} ms/batch")
    return mean_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=3, action="append", metavar=("Z", "Y", "X"))
    parser.add_argument("--batches", type=int, default=40, help="timed batches at nnU-Net's probabilities")
    parser.add_argument("--forced-batches", type=int, default=5,
                        help="timed batches with every sample rotated and scaled (0: skip)")
    parser.add_argument("--v1-image-order", type=int, default=3, help="spline order of v1's image interpolation")
    parser.add_argument("--torch-threads", type=int, default=1, help="as in a data-loading worker (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    modes = [("nnU-Net probabilities", DEFAULT_AUGMENTATION, args.batches),
             ("every sample rotated and scaled", replace(DEFAULT_AUGMENTATION, p_rotation=1, p_scaling=1),
              args.forced_batches)]
    for patch in [tuple(p) for p in (args.patch or DEFAULT_PATCHES)]:
        read_size = training_read_size(patch)
        scales = deep_supervision_scales(typical_strides(patch))
        print(f"patch {patch}, read (pre-augmentation) {read_size}, batch {BATCH_SIZE}, "
              f"{len(scales)} deep-supervision targets, torch threads {args.torch_threads}")
        for mode, settings, batches in modes:
            if batches <= 0:
                continue
            print(f" {mode}:")
            np.random.seed(args.seed)
            v1 = report(f"batchgenerators v1 (image order {args.v1_image_order})",
                        *time_v1(patch, read_size, scales, batches, np.random.default_rng(args.seed), settings,
                                 args.v1_image_order))
            np.random.seed(args.seed)
            torch.manual_seed(args.seed)
            v2 = report("batchgeneratorsv2 (covnet)", *time_v2(patch, read_size, scales, batches,
                                                               np.random.default_rng(args.seed), settings))
            print(f"  v1 / v2 = {v1 / v2:.2f}")
        if args.sampler:
            print(f" PatchSampler read at {read_size}: {1000 * time_sampler(patch, read_size, args.batches):.1f} "
                  "ms/batch (warm page cache)")


if __name__ == "__main__":
    main()
