"""SHA-256 and size of a file or stream: a model archive's manifest lists them, a model's id and the OpenVINO
cache's key are made of them."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


def hash_stream(source: BinaryIO, sink: BinaryIO | None = None, limit: int | None = None) -> FileEntry:
    """SHA-256 and size of what ``source`` yields (copied to ``sink`` if given); reading stops once more than
    ``limit`` bytes came, so an oversized member is found without unpacking it all."""
    digest, size = hashlib.sha256(), 0
    while chunk := source.read(_CHUNK):
        size += len(chunk)
        if limit is not None and size > limit:
            break
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return FileEntry(digest.hexdigest(), size)


def hash_file(path: Path) -> FileEntry:
    with open(path, "rb") as handle:
        return hash_stream(handle)
