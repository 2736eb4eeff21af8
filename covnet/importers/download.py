"""Download the COVID-19-CT-Seg zips from Zenodo, resumably and checksum-verified (standard library only).

Bytes go to ``<name>.part``; an interrupted transfer is continued with an HTTP ``Range`` request (a server that
ignores it, answering 200, makes us start again from zero). Only a file whose checksum matches is renamed to
its final name, so a finished-looking zip is always a verified one.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger

log = logger(__name__)

ZENODO_RECORD_ID = "3757476"
ZENODO_FILES_URL = f"https://zenodo.org/records/{ZENODO_RECORD_ID}/files"
ZENODO_RECORD_API_URL = f"https://zenodo.org/api/records/{ZENODO_RECORD_ID}"
COVID19CTSEG_ZIPS = ("COVID-19-CT-Seg_20cases.zip", "Lung_Mask.zip", "Infection_Mask.zip",
                     "Lung_and_Infection_Mask.zip")

# SHA-256 sums as published by torch-em (github.com/constantinpape/torch-em,
# torch_em/data/datasets/medical/covid19_seg.py). A zip missing here is checked against the MD5 that Zenodo's
# record API lists instead.
KNOWN_SHA256 = {
    "COVID-19-CT-Seg_20cases.zip": "a5060480eff9315b069b086312dac4872777901fb80d268a5a83edd9f4e7b440",
    "Lung_and_Infection_Mask.zip": "34f5a573cb8fb53cb15abe81868395d9addf436854826a6fd6e70c2b294f19c3",
    "Lung_Mask.zip": "f060b0d0299939a6d95ddefdbfa281de1a779c4d230a5adbd32414711d6d8187",
    "Infection_Mask.zip": "87901c73fdd2230260e61d2dbc57bf56026efc28264006b8ea2bf411453c1694",
}

CHUNK_SIZE = 1 << 20
DEFAULT_ATTEMPTS = 5
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Checksum:
    algorithm: str  # a hashlib name: "sha256" or "md5"
    hexdigest: str

    @classmethod
    def parse(cls, text: str) -> "Checksum":
        """``"md5:0123…"`` (Zenodo's form) or ``"sha256:…"``."""
        algorithm, _, digest = text.partition(":")
        if not digest or algorithm.lower() not in hashlib.algorithms_available:
            raise ValueError(f"not a checksum of the form 'algorithm:hexdigest': {text!r}")
        return cls(algorithm.lower(), digest.strip().lower())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_url(base_url: str, name: str) -> str:
    return f"{base_url.rstrip('/')}/{name}?download=1"


class _Interrupted(Exception):
    """The transfer stopped early; what arrived is kept in the ``.part`` file."""


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", header or "")
    return int(match.group(1)) if match else None


def _total_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    """Size of the whole file, from ``Content-Range`` (206) or ``Content-Length`` (200), if the server says."""
    content_range = re.match(r"bytes\s+\d+-\d+/(\d+)", response.headers.get("Content-Range") or "")
    if content_range:
        return int(content_range.group(1))
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _fetch_into_part(url: str, part: Path, timeout: float) -> None:
    """One HTTP request: append the missing bytes to ``part`` (or rewrite it when the server ignores Range)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            return  # nothing left to send: the part is whole, the checksum will tell
        raise CovnetError(url, f"download failed: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        raise _Interrupted(f"cannot connect: {getattr(error, 'reason', error)}") from None
    with response:
        if response.status == 206:
            if _content_range_start(response.headers.get("Content-Range")) != offset:
                part.unlink()  # resumed somewhere else: the part can no longer be trusted
                raise _Interrupted("server resumed at a different offset than asked; restarting")
            mode = "ab"
        else:
            offset, mode = 0, "wb"
        total = _total_size(response, offset)
        received = offset
        with open(part, mode) as stream:
            try:
                for chunk in iter(lambda: response.read(CHUNK_SIZE), b""):
                    stream.write(chunk)
                    received += len(chunk)
            except (http.client.HTTPException, OSError) as error:
                raise _Interrupted(f"connection lost after {received} bytes ({error})") from None
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes")


def download_file(url: str, destination: str | os.PathLike, checksum: Checksum,
                  attempts: int = DEFAULT_ATTEMPTS, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Download ``url`` to ``destination`` unless a verified copy is there; resume broken transfers."""
    destination = Path(destination)
    if destination.is_file():
        if file_digest(destination, checksum.algorithm) == checksum.hexdigest:
            log.info(f"{destination.name}: already downloaded and verified")
            return destination
        log.info(f"{destination.name}: existing file does not match {checksum}; downloading it again")
        destination.unlink()
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            _fetch_into_part(url, part, timeout)
            break
        except _Interrupted as interruption:
            if attempt == attempts:
                raise CovnetError(part, f"download interrupted ({interruption}); run again to resume") from None
            log.info(f"{destination.name}: {interruption}; resuming (attempt {attempt + 1} of {attempts})")
    actual = file_digest(part, checksum.algorithm)
    if actual != checksum.hexdigest:
        part.unlink()
        raise CovnetError(destination, f"checksum mismatch: expected {checksum}, got {checksum.algorithm}:{actual}; "
                                       "the download was deleted")
    os.replace(part, destination)
    log.info(f"{destination.name}: downloaded and verified ({checksum.algorithm})")
    return destination


def fetch_record_checksums(record_api_url: str = ZENODO_RECORD_API_URL,
                           timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Checksum]:
    """File name → checksum as listed by a Zenodo record API (``files[].key`` / ``files[].checksum``)."""
    request = urllib.request.Request(record_api_url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            record = json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise CovnetError(record_api_url, f"cannot read the Zenodo record ({error})") from None
    files = record.get("files", [])
    if isinstance(files, dict):  # InvenioRDM's files endpoint nests them under "entries"
        files = files.get("entries", [])
    if isinstance(files, dict):
        files = list(files.values())
    checksums = {}
    for entry in files:
        name, checksum = entry.get("key") or entry.get("filename"), entry.get("checksum")
        if name and checksum:
            try:
                checksums[name] = Checksum.parse(checksum)
            except ValueError:
                continue
    return checksums


def download_covid19ctseg(directory: str | os.PathLike, base_url: str = ZENODO_FILES_URL,
                          record_api_url: str = ZENODO_RECORD_API_URL, names: Iterable[str] = COVID19CTSEG_ZIPS,
                          known_sha256: dict[str, str] | None = None, attempts: int = DEFAULT_ATTEMPTS,
                          timeout: float = DEFAULT_TIMEOUT_S) -> list[Path]:
    """Fetch the release zips into ``directory``; SHA-256 where known, else Zenodo's published MD5."""
    directory = Path(directory)
    known_sha256 = KNOWN_SHA256 if known_sha256 is None else known_sha256
    record_checksums: dict[str, Checksum] | None = None
    downloaded = []
    for name in names:
        if name in known_sha256:
            checksum = Checksum("sha256", known_sha256[name].lower())
        else:
            if record_checksums is None:
                record_checksums = fetch_record_checksums(record_api_url, timeout)
            if name not in record_checksums:
                raise CovnetError(record_api_url, f"lists no checksum for {name}; refusing an unverified download")
            checksum = record_checksums[name]
        path = download_file(file_url(base_url, name), directory / name, checksum, attempts, timeout)
        if checksum.algorithm != "sha256":
            log.warning(f"{name}: sha256 {file_digest(path)} (verified via {checksum.algorithm}; "
                        "record it in covnet.importers.download.KNOWN_SHA256)")
        downloaded.append(path)
    return downloaded
