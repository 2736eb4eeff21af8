"""What travels to the GPU machine, made small enough for its 64 MiB: wheels and the chest CT, both lossless.

* ``recompress_wheel``: a wheel is a zip; rewritten with LZMA members (the zip format's method 14, which
  Python's ``zipfile`` and therefore pip read) instead of deflate, SimpleITK's shrinks from 50 to 27 MiB. The
  file names and every member's bytes stay the same, so RECORD still holds.
* ``pack_nifti`` / ``unpack_nifti``: a NIfTI-1 file (``.nii`` or ``.nii.gz``) as an xz stream of its header and,
  for integer voxels, the residuals of the planar predictor (left + above - above-left, JPEG-LS's simplest),
  zigzagged to small unsigned numbers and split into byte planes (all low bytes, then all high bytes). On the
  512×512×141 chest CT that is 24.4 MiB against 25.4 for the raw voxels' byte planes and 35.4 for the
  original gzip file; the CT's noise sets the floor (its low bytes alone take 23.8 MiB). Decoding is two
  cumulative sums (numpy); unpacking restores the exact ``.nii`` bytes, checked against their SHA-256, and
  gzips them again (level 1: reading speed does not depend on the level).

    python -m benchmarks.gpu_check.packing recompress-wheels DIR
    python -m benchmarks.gpu_check.packing pack SOURCE.nii.gz PACKED
    python -m benchmarks.gpu_check.packing unpack PACKED FOLDER      # writes FOLDER/<original name>
"""
from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import lzma
import os
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

MAGIC = b"covnet-nifti-pack 1\n"
PACK_SUFFIX = ".pack"
NIFTI1_HEADER_SIZE = 348


def recompress_wheel(path: str | os.PathLike) -> bool:
    """Rewrite the wheel at ``path`` with LZMA members; False when it already has them (nothing written)."""
    path = Path(path)
    with zipfile.ZipFile(path) as source:
        members = source.infolist()
        if all(member.compress_type == zipfile.ZIP_LZMA for member in members if member.file_size):
            return False
        temporary = path.with_name(path.name + ".tmp")
        try:
            with zipfile.ZipFile(temporary, "w") as target:
                for member in members:
                    data = source.read(member)
                    copied = copy.copy(member)
                    copied.compress_type = zipfile.ZIP_LZMA
                    target.writestr(copied, data)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    os.replace(temporary, path)
    return True


# NIfTI-1 integer datatype codes and their numpy types (the predictor works on integers only).
INTEGER_TYPES = {2: "u1", 4: "i2", 8: "i4", 256: "i1", 512: "u2", 768: "u4"}


def _integer_voxels(nifti: bytes) -> tuple[int, np.ndarray] | None:
    """(header bytes, voxels as a (slices, rows, columns) array) of a NIfTI-1 file of integers; None else."""
    for order in "<>":
        if len(nifti) < NIFTI1_HEADER_SIZE or struct.unpack(order + "i", nifti[:4])[0] != NIFTI1_HEADER_SIZE:
            continue
        dims = struct.unpack(order + "8h", nifti[40:56])
        datatype = struct.unpack(order + "h", nifti[70:72])[0]
        offset = int(struct.unpack(order + "f", nifti[108:112])[0])
        if datatype not in INTEGER_TYPES or not 2 <= dims[0] <= 7 or min(dims[1:dims[0] + 1]) < 1:
            return None
        dtype = np.dtype(order + INTEGER_TYPES[datatype])
        count = int(np.prod(dims[1:dims[0] + 1]))
        if offset < NIFTI1_HEADER_SIZE or offset + count * dtype.itemsize != len(nifti):
            return None
        return offset, np.frombuffer(nifti, dtype, count, offset).reshape(-1, dims[2], dims[1])
    return None


def _encode(voxels: np.ndarray) -> tuple[bytes, int]:
    """Residuals of the planar predictor (left + above - above-left), zigzagged to unsigned integers of the
    smallest width that holds them, as byte planes; and that width."""
    values = voxels.astype(np.int64)
    residual = np.diff(np.diff(values, axis=-1, prepend=0), axis=-2, prepend=0)
    zigzag = (residual << 1) ^ (residual >> 63)
    width = next(width for width in (1, 2, 4, 8) if int(zigzag.max(initial=0)) < 2 ** (8 * width))
    planes = zigzag.astype(f"<u{width}").view(np.uint8).reshape(-1, width).T
    return planes.tobytes(), width


def _decode(planes: bytes, width: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    zigzag = np.frombuffer(planes, np.uint8).reshape(width, -1).T.copy().view(f"<u{width}").reshape(shape)
    residual = (zigzag >> 1).astype(np.int64) ^ -(zigzag & 1).astype(np.int64)
    return np.cumsum(np.cumsum(residual, axis=-2), axis=-1).astype(dtype)


def pack_nifti(source: str | os.PathLike, packed: str | os.PathLike, preset: int = 9 | lzma.PRESET_EXTREME) -> dict:
    """Write ``source`` losslessly packed to ``packed``; returns the description stored with it."""
    source = Path(source)
    raw = source.read_bytes()
    gzipped = raw[:2] == b"\x1f\x8b"
    nifti = gzip.decompress(raw) if gzipped else raw
    info = {"name": source.name, "gzipped": gzipped, "nifti_bytes": len(nifti),
            "sha256": hashlib.sha256(nifti).hexdigest()}
    layout = _integer_voxels(nifti)
    if layout is None:                        # anything else is packed as it is
        info.update(header_bytes=len(nifti))
        payload = b""
    else:
        header_bytes, voxels = layout
        payload, width = _encode(voxels)
        info.update(header_bytes=header_bytes, shape=list(voxels.shape), dtype=voxels.dtype.str, width=width)
    description = json.dumps(info).encode()
    body = MAGIC + struct.pack("<Q", len(description)) + description + nifti[:info["header_bytes"]] + payload
    temporary = Path(str(packed) + ".tmp")
    temporary.write_bytes(lzma.compress(body, preset=preset))
    os.replace(temporary, packed)
    return info


def unpack_nifti(packed: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Restore a packed NIfTI into ``folder`` under its original name; its bytes are checked (SHA-256)."""
    body = lzma.decompress(Path(packed).read_bytes())
    if not body.startswith(MAGIC):
        raise ValueError(f"{packed}: not a covnet NIfTI pack")
    start = len(MAGIC) + 8
    (length,) = struct.unpack("<Q", body[len(MAGIC):start])
    info = json.loads(body[start:start + length])
    header_end = start + length + info["header_bytes"]
    nifti = body[start + length:header_end]
    if "width" in info:
        nifti += _decode(body[header_end:], info["width"], tuple(info["shape"]), info["dtype"]).tobytes()
    if hashlib.sha256(nifti).hexdigest() != info["sha256"]:
        raise ValueError(f"{packed}: unpacked bytes do not match their SHA-256")
    target = Path(folder) / info["name"]
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_bytes(gzip.compress(nifti, compresslevel=1) if info["gzipped"] else nifti)
    os.replace(temporary, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.packing",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    wheels = commands.add_parser("recompress-wheels", help="rewrite every *.whl of a folder with LZMA members")
    wheels.add_argument("folder", type=Path)
    pack = commands.add_parser("pack", help="pack a NIfTI file losslessly")
    pack.add_argument("source", type=Path)
    pack.add_argument("packed", type=Path)
    unpack = commands.add_parser("unpack", help="restore a packed NIfTI into a folder")
    unpack.add_argument("packed", type=Path)
    unpack.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "recompress-wheels":
        for wheel in sorted(args.folder.glob("*.whl")):
            print(f"{wheel.name}: {'recompressed' if recompress_wheel(wheel) else 'already LZMA'}", flush=True)
    elif args.command == "pack":
        info = pack_nifti(args.source, args.packed)
        print(f"{args.packed}: {args.packed.stat().st_size / 2 ** 20:.1f} MiB ({info['nifti_bytes'] / 2 ** 20:.1f} "
              f"MiB of NIfTI, residuals in {info.get('width', '-')} byte planes)")
    else:
        print(unpack_nifti(args.packed, args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
