"""Memory-mapped .npy vs blosc2 chunks for preprocessed cases: size on disk, write time, patch-read time.

Usage: python benchmarks/storage_formats.py [--image CT] [--spacing Z Y X] [--patch Z Y X] [--reads N]

Preprocesses one CT with covnet (body crop, CT normalization, order-3 resampling), stores the result both
ways and reads N random patches from each, as the training loader would. Reads run twice: after dropping
the files from the page cache where the OS allows it (posix_fadvise DONTNEED: "cold") and again "warm".
blosc2 is not a covnet dependency of its own (it arrives with acvl-utils), so this script imports it lazily.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from covnet.image.cropping import body_bounding_box  # noqa: E402
from covnet.image.grid import crop  # noqa: E402
from covnet.image.io import read_image  # noqa: E402
from covnet.image.resampling import resample_image  # noqa: E402
from covnet.planning.plans import NormalizationScheme  # noqa: E402
from covnet.preprocessing.normalization import normalize  # noqa: E402
from covnet.runtime.cpus import usable_cpu_count  # noqa: E402

DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_ct" / "chest_ct_512x512x141.nii.gz"


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def random_corners(shape, patch, count, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(int(rng.integers(0, max(1, s - p + 1))) for s, p in zip(shape, patch)) for _ in range(count)]


def time_reads(read_patch, corners, patch) -> float:
    started = time.perf_counter()
    for corner in corners:
        window = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        np.asarray(read_patch(window)).sum()
    return (time.perf_counter() - started) / len(corners) * 1000


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.8, 0.8])
    parser.add_argument("--patch", type=int, nargs=3, default=[96, 160, 160])
    parser.add_argument("--reads", type=int, default=50)
    args = parser.parse_args()
    if not args.image.is_file():
        sys.exit(f"{args.image}: not found (the real CT lives in ../shared/data/real_ct)")
    import blosc2

    image, geometry = read_image(args.image, dtype=np.float32)
    box = body_bounding_box(image)
    scheme = NormalizationScheme.from_json({"scheme": "CT", "clip": [-1000.0, 400.0], "mean": -500.0, "std": 400.0})
    array = resample_image(normalize(crop(image, box), scheme), geometry.spacing, args.spacing)[None]
    patch = [min(p, s) for p, s in zip(args.patch, array.shape[1:])]
    corners = random_corners(array.shape[1:], patch, args.reads)
    print(f"case {array.shape} float32 = {array.nbytes / 2**20:.0f} MiB; {args.reads} random patches {patch}")

    work = Path(tempfile.mkdtemp(prefix="covnet-storage-"))
    try:
        results = []
        npy_dir, blosc_dir = work / "npy", work / "blosc2"
        npy_dir.mkdir(), blosc_dir.mkdir()
        started = time.perf_counter()
        np.save(npy_dir / "case.npy", array)
        npy_write = time.perf_counter() - started
        mapped = np.load(npy_dir / "case.npy", mmap_mode="r")
        drop_from_page_cache(npy_dir)
        npy_cold = time_reads(lambda w: mapped[(0,) + w], corners, patch)
        npy_warm = time_reads(lambda w: mapped[(0,) + w], corners, patch)
        results.append(("npy + mmap", npy_write, folder_size(npy_dir), npy_cold, npy_warm))

        chunks = (1,) + tuple(min(s, c) for s, c in zip(array.shape[1:], (64, 64, 64)))
        blocks = (1,) + tuple(min(s, c) for s, c in zip(array.shape[1:], (16, 32, 32)))
        started = time.perf_counter()
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(blosc_dir / "case.b2nd"), mode="w",
                       chunks=chunks, blocks=blocks,
                       cparams={"codec": blosc2.Codec.ZSTD, "clevel": 5, "nthreads": usable_cpu_count()})
        blosc_write = time.perf_counter() - started
        stored = blosc2.open(str(blosc_dir / "case.b2nd"), mode="r", dparams={"nthreads": 1})
        drop_from_page_cache(blosc_dir)
        blosc_cold = time_reads(lambda w: stored[(slice(0, 1),) + w], corners, patch)
        blosc_warm = time_reads(lambda w: stored[(slice(0, 1),) + w], corners, patch)
        results.append((f"blosc2 zstd5 chunks {chunks[1:]}", blosc_write, folder_size(blosc_dir), blosc_cold, blosc_warm))

        print(f"{'format':<34} {'write s':>8} {'disk MiB':>9} {'cold ms/patch':>14} {'warm ms/patch':>14}")
        for name, write, size, cold, warm in results:
            print(f"{name:<34} {write:8.2f} {size / 2**20:9.0f} {cold:14.1f} {warm:14.1f}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
