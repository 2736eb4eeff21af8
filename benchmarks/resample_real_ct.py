#!/usr/bin/env python3
"""Resample a real chest CT to a new spacing: wall seconds, CPU seconds, peak RSS, and (--reference) the
correlation inside the body against scipy's order-3 spline on the same pixel-centre grid.

    python benchmarks/resample_real_ct.py --spacing 1.0 0.8 0.8 --reference [--no-clip]
    /tmp/nnunet_venv/bin/python benchmarks/resample_real_ct.py --spacing 1.0 0.8 0.8 --nnunet

--nnunet times nnU-Net v2's own resample_data_or_seg_to_shape instead (as its default preprocessing calls
it: data order 3, order_z 0, separate z by its rule); it needs an interpreter where nnunetv2 is installed.

Peak RSS is ru_maxrss of the whole process: it includes the interpreter, torch, the image as read (int16)
and everything else alive during the resampling. It is printed once before resampling (baseline) and once
after; the reference is computed only after both numbers are printed.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # so that --nnunet can run from another venv

from covnet.image.cropping import BODY_THRESHOLD_HU  # noqa: E402
from covnet.image.grid import compute_new_shape, separate_z_axis  # noqa: E402
from covnet.image.io import read_image  # noqa: E402
from covnet.image.resampling import resample_image  # noqa: E402
from covnet.runtime.atomic import atomic_path  # noqa: E402

DEFAULT_IMAGE = REPOSITORY.parent / "shared" / "data" / "real_ct" / "chest_ct_512x512x141.nii.gz"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def resample_with_nnunet(image: np.ndarray, spacing, target_spacing, new_shape) -> np.ndarray:
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    data = image.astype(np.float32)[None]  # nnU-Net resamples (c, z, y, x) float32 after normalisation
    result = resample_data_or_seg_to_shape(data, new_shape, spacing, target_spacing, is_seg=False, order=3,
                                           order_z=0, force_separate_z=None)
    return result[0]


def scipy_reference(image: np.ndarray, new_shape, separate_axis: int | None) -> np.ndarray:
    """Cubic B-spline (scipy, mode 'nearest') on the pixel-centre grid; nearest along a separate axis."""
    import scipy.ndimage as ndi

    from covnet.image.resampling import nearest_indices
    volume = image.astype(np.float32)
    if separate_axis is None:
        zoom = np.divide(new_shape, volume.shape)
        return ndi.zoom(volume, zoom, order=3, mode="nearest", grid_mode=True)
    moved = np.moveaxis(volume, separate_axis, 0)
    plane_shape = [n for axis, n in enumerate(new_shape) if axis != separate_axis]
    planes = np.stack([ndi.zoom(plane, np.divide(plane_shape, plane.shape), order=3, mode="nearest",
                                grid_mode=True) for plane in moved])
    planes = planes[nearest_indices(volume.shape[separate_axis], new_shape[separate_axis])]
    return np.moveaxis(planes, 0, separate_axis)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), default=(1.0, 0.8, 0.8),
                        help="target spacing in mm (default 1.0 0.8 0.8)")
    parser.add_argument("--out", type=Path, help="save the resampled image here (.npy)")
    parser.add_argument("--reference", action="store_true",
                        help="also compute scipy's order-3 reference (slow) and print the correlation")
    parser.add_argument("--nnunet", action="store_true", help="time nnU-Net v2's resampling instead")
    parser.add_argument("--no-clip", action="store_true",
                        help="keep the cubic overshoot (covnet clips to the input range by default, as nnU-Net)")
    parser.add_argument("--compare", type=Path, metavar="NPY",
                        help="also compare with another saved result (e.g. nnU-Net's, from --out)")
    args = parser.parse_args(argv)

    if not args.image.exists():
        print(f"{args.image}: image not found (pass --image PATH)", file=sys.stderr)
        return 2
    image, geometry = read_image(args.image)
    target = tuple(args.spacing)
    new_shape = compute_new_shape(image.shape, geometry.spacing, target)
    axis = separate_z_axis(geometry.spacing, target)
    print(f"image {args.image.name}: shape {image.shape} {image.dtype}, spacing {geometry.spacing}")
    print(f"target spacing {target} -> shape {new_shape}; separate z axis: {axis}")
    print(f"peak RSS before resampling (imports + image): {peak_rss_mib():.0f} MiB")

    wall, cpu = time.perf_counter(), time.process_time()
    if args.nnunet:
        result = resample_with_nnunet(image, geometry.spacing, target, new_shape)
        method = "nnU-Net v2 resample_data_or_seg_to_shape (order 3, order_z 0, separate z by its rule)"
    else:
        result = resample_image(image, geometry.spacing, target, order=3, clip_to_input_range=not args.no_clip)
        method = "covnet resample_image (order 3, separate z by the library's rule)"
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{method}: {wall:.2f} s wall, {cpu:.2f} s CPU, output {result.shape} {result.dtype}")
    print(f"peak RSS of the whole process after resampling: {peak_rss_mib():.0f} MiB")

    if args.out:
        with atomic_path(args.out) as temporary, open(temporary, "wb") as handle:
            np.save(handle, result)
        print(f"saved {args.out}")
    if args.compare:
        print(f"against {args.compare}: {agreement(np.load(args.compare), result)}")
    if args.reference:
        start = time.perf_counter()
        reference = scipy_reference(image, new_shape, axis)
        print(f"scipy order-3 reference (unclipped) computed in {time.perf_counter() - start:.1f} s; "
              f"against it: {agreement(reference, result)}")
    return 0


def agreement(reference: np.ndarray, result: np.ndarray) -> str:
    """Pearson r and |difference| inside the body (reference > -500 HU), and the max |difference| overall."""
    if reference.shape != result.shape:
        return f"shapes differ: {reference.shape} vs {result.shape}"
    body = reference > BODY_THRESHOLD_HU
    inside_ref, inside = reference[body].astype(np.float64), result[body].astype(np.float64)
    correlation = np.corrcoef(inside_ref, inside)[0, 1]
    difference = np.abs(inside_ref - inside)
    overall = float(np.abs(reference.astype(np.float64) - result).max())
    return (f"inside the body (reference > {BODY_THRESHOLD_HU:g} HU, {body.mean():.1%} of voxels) Pearson r = "
            f"{correlation:.6f}, mean |diff| {difference.mean():.4f} HU, max |diff| {difference.max():.2f} HU; "
            f"max |diff| over the whole volume {overall:.2f} HU")


if __name__ == "__main__":
    sys.exit(main())
