"""What the NIfTI header promises, checked against the bytes on disk.

ITK reads a ``.nii``/``.nii.gz`` that ends early without a word and fills the missing part with zeros,
and it turns NaN/inf in float data into 0. Both are checked here, from the header and the raw bytes.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FLOAT_TYPES = {16: "f4", 64: "f8"}
_CHUNK = 1 << 22


@dataclass(frozen=True)
class NiftiHeader:
    endian: str
    datatype: int
    bits_per_voxel: int
    voxel_count: int
    data_offset: int

    @property
    def expected_bytes(self) -> int:
        """Header, extensions and voxel data: a complete file holds at least this many bytes."""
        return self.data_offset + self.voxel_count * self.bits_per_voxel // 8


def parse_header(raw: bytes) -> NiftiHeader | None:
    """NIfTI-1 (348-byte) or NIfTI-2 (540-byte) header; None when ``raw`` is neither."""
    if len(raw) < 348:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", raw[:4])[0]
        if size == 348:
            dims = struct.unpack(endian + "8h", raw[40:56])
            datatype, bits = struct.unpack(endian + "hh", raw[70:74])
            offset = int(struct.unpack(endian + "f", raw[108:112])[0])
            break
        if size == 540 and len(raw) >= 540:
            datatype, bits = struct.unpack(endian + "hh", raw[12:16])
            dims = struct.unpack(endian + "8q", raw[16:80])
            offset = int(struct.unpack(endian + "q", raw[168:176])[0])
            break
    else:
        return None
    rank = max(0, min(int(dims[0]), 7))
    voxels = int(np.prod([max(1, int(d)) for d in dims[1:rank + 1]], dtype=np.int64)) if rank else 0
    return NiftiHeader(endian, int(datatype), int(bits), voxels, max(offset, size))


def _is_gzip(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _read_head(path: Path) -> bytes:
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rb") as handle:
            return handle.read(540)
    except (OSError, EOFError):
        return b""


def _gzip_stream_is_complete(path: Path, expected_bytes: int) -> bool:
    """Decompress the whole file: every gzip member must end with its trailer and hold the voxels."""
    with open(path, "rb") as handle:
        # The trailer's last 4 bytes are the uncompressed size mod 2^32: when they agree with the header,
        # the file ended where it should (a cut-off file ends in arbitrary compressed bytes instead).
        handle.seek(0, 2)
        if handle.tell() >= 18:
            handle.seek(-4, 2)
            if struct.unpack("<I", handle.read(4))[0] == expected_bytes % (1 << 32):
                return True
        handle.seek(0)
        total, decompressor = 0, zlib.decompressobj(zlib.MAX_WBITS | 16)
        while True:
            chunk = handle.read(_CHUNK)
            if not chunk:
                return decompressor.eof and total >= expected_bytes
            while chunk:
                total += len(decompressor.decompress(chunk))
                if decompressor.eof:  # another member may follow
                    chunk = decompressor.unused_data
                    if chunk:
                        decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
                else:
                    chunk = b""


def truncation_problem(path: Path) -> str | None:
    """Why a NIfTI file is shorter than its header says, or None when it is complete (or not NIfTI)."""
    header = parse_header(_read_head(path))
    if header is None:
        return None
    if _is_gzip(path):
        try:
            complete = _gzip_stream_is_complete(path, header.expected_bytes)
        except zlib.error as error:
            return f"is truncated or corrupt (gzip data: {error})"
        return None if complete else "is truncated: the gzip stream ends before the voxel data the header declares"
    size = path.stat().st_size
    if size < header.expected_bytes:
        return f"is truncated: {size} bytes where the header declares {header.expected_bytes}"
    return None


def count_non_finite(path: Path) -> int:
    """NaN/inf voxels stored in a float NIfTI (ITK reads them as 0)."""
    header = parse_header(_read_head(path))
    if header is None or header.datatype not in FLOAT_TYPES:
        return 0
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as handle:
        handle.seek(header.data_offset)
        data = np.frombuffer(handle.read(), dtype=np.dtype(header.endian + FLOAT_TYPES[header.datatype]))
    return int((~np.isfinite(data)).sum())
