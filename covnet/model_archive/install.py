"""``covnet_install_model``'s work: check a model archive and unpack it, once, into the user's model cache.

* **Where.** ``$XDG_CACHE_HOME/covnet/models/<model id>/`` (``~/.cache`` without it), the id being the SHA-256 of
  the archive's manifest. A model already there is not unpacked again.
* **What is refused**, each with one line naming the archive and what is wrong: a zip that cannot be read
  (truncated, damaged), a member whose path is absolute, steps out with ``..`` or is a link, a member the manifest
  does not list or a listed file that is missing, and a file whose bytes do not match the manifest's SHA-256 and
  size (the zip's own CRC is checked too, but a deliberate edit can recompute that).
* **How.** Every name is checked before anything is written; the files are then unpacked into a hidden temporary
  folder beside the target, hashed as they are written, and only when every one matched is the folder renamed to
  its final name (one rename: a kill leaves a temporary folder that the next install removes, never a
  half-installed model). After a refusal nothing is left in the cache.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from covnet.model_archive.manifest import MANIFEST_NAME, ModelManifest, model_id, path_problem
from covnet.planning.plans import PLANS_VERSION
from covnet.runtime.atomic import sweep_dead_temporaries, temporary_folder
from covnet.runtime.cache import model_cache_dir
from covnet.runtime.errors import CovnetError
from covnet.runtime.hashing import hash_stream
from covnet.runtime.log import logger

log = logger(__name__)
ARCHIVE_SUFFIX = ".zip"


@dataclass(frozen=True)
class InstalledModel:
    folder: Path                     # a results folder: fold_<k>/ and/or selftrain/final/, plans.json, ...
    model_id: str
    manifest: ModelManifest
    newly_installed: bool            # False when it was already in the cache


def _open(archive_path: Path) -> zipfile.ZipFile:
    if not archive_path.is_file():
        raise CovnetError(archive_path, "not found" if not archive_path.exists() else "is not a file")
    try:
        return zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        raise CovnetError(archive_path, f"is not a readable zip archive; truncated or damaged? ({error})") from None


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    return path_problem(info.filename)


def _checked_members(archive: zipfile.ZipFile, archive_path: Path) -> tuple[ModelManifest, bytes]:
    """The manifest and its bytes, once every member name is safe and the members are exactly the listed files."""
    names = []
    for info in archive.infolist():
        problem = _member_problem(info)
        if problem:
            raise CovnetError(archive_path, f"member {info.filename!r} {problem}; refused, nothing was installed")
        if not info.is_dir():
            names.append(info.filename)
    if len(names) != len(set(names)):
        raise CovnetError(archive_path, "holds a member name twice; refused, nothing was installed")
    if MANIFEST_NAME not in names:
        raise CovnetError(archive_path, f"has no {MANIFEST_NAME}: not a covnet model archive (covnet_export_model)")
    manifest_bytes = _read_member(archive, archive_path, MANIFEST_NAME)
    manifest = ModelManifest.from_bytes(manifest_bytes, archive_path)
    for name in manifest.files:
        problem = path_problem(name)
        if problem:
            raise CovnetError(archive_path, f"its manifest lists {name!r}, which {problem}; refused")
    unlisted = sorted(set(names) - set(manifest.files) - {MANIFEST_NAME})
    missing = sorted(set(manifest.files) - set(names))
    if unlisted:
        raise CovnetError(archive_path, f"holds {unlisted[0]}, which its manifest does not list; refused")
    if missing:
        raise CovnetError(archive_path, f"lacks {missing[0]}, which its manifest lists; truncated or altered?")
    if manifest.plans_version != PLANS_VERSION:
        raise CovnetError(archive_path, f"holds a model of plans version {manifest.plans_version} (covnet "
                                        f"{manifest.covnet_version}); this covnet reads plans version {PLANS_VERSION}")
    return manifest, manifest_bytes


def _read_member(archive: zipfile.ZipFile, archive_path: Path, name: str) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise CovnetError(archive_path, f"{name} cannot be read from the archive; damaged? ({error})") from None


def _unpack_verified(archive: zipfile.ZipFile, archive_path: Path, manifest: ModelManifest, manifest_bytes: bytes,
                     folder: Path) -> None:
    """Write every listed file into ``folder``, each checked against its SHA-256 and size."""
    for name, expected in sorted(manifest.files.items()):
        target = folder / name
        if not target.resolve().is_relative_to(folder.resolve()):
            raise CovnetError(archive_path, f"member {name!r} would be written outside its folder; refused")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with archive.open(name) as source, open(target, "wb") as sink:
                found = hash_stream(source, sink, limit=expected.size)
                sink.flush()
                os.fsync(sink.fileno())
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise CovnetError(archive_path, f"{name} is damaged in the archive ({error}); nothing was installed") \
                from None
        if found != expected:
            raise CovnetError(archive_path, f"{name} does not match the SHA-256 and size in its manifest (altered or "
                                            f"damaged); nothing was installed")
    (folder / MANIFEST_NAME).write_bytes(manifest_bytes)


def install_model_archive(archive_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                          ) -> InstalledModel:
    """Check ``archive_path`` and unpack it into ``cache_dir`` (default :func:`model_cache_dir`) unless it is
    already there; return the installed folder."""
    archive_path = Path(archive_path)
    cache_dir = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    with _open(archive_path) as archive:
        manifest, manifest_bytes = _checked_members(archive, archive_path)
        identifier = model_id(manifest_bytes)
        target = cache_dir / identifier
        if target.is_dir():
            return InstalledModel(target, identifier, manifest, newly_installed=False)
        cache_dir.mkdir(parents=True, exist_ok=True)
        sweep_dead_temporaries(cache_dir, recursive=False)
        staging = temporary_folder(cache_dir, identifier[:16])
        try:
            _unpack_verified(archive, archive_path, manifest, manifest_bytes, staging)
            try:
                os.rename(staging, target)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
                    raise
                return InstalledModel(target, identifier, manifest, newly_installed=False)  # installed meanwhile
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return InstalledModel(target, identifier, manifest, newly_installed=True)


def read_installed_manifest(folder: str | os.PathLike) -> ModelManifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise CovnetError(path, "not found; this folder is not an installed covnet model")
    return ModelManifest.from_bytes(path.read_bytes(), path)


def resolve_model_archive(path: str | os.PathLike) -> Path:
    """What ``--model`` names, as a folder or file covnet_predict can read: a ``.zip`` model archive is installed
    (once) and its folder returned; anything else is returned as it is."""
    path = Path(path)
    if path.name.lower().endswith(ARCHIVE_SUFFIX):
        installed = install_model_archive(path)
        if installed.newly_installed:
            log.info(f"installed model {installed.model_id[:12]} from {path} into {installed.folder}")
        return installed.folder
    return path
