"""OpenVINO without its telemetry, and each network converted once and kept on disk.

**Telemetry.** ``import openvino`` imports its model-conversion tools (``openvino.tools.ovc``), which report the
import, and every ``convert_model`` call, to Google Analytics through the openvino-telemetry package unless the
user opted out (its consent file in ``~/intel``). covnet sends nothing over the network, so before openvino is
first imported :func:`openvino_without_telemetry` marks openvino_telemetry as absent in this process only
(``sys.modules[...] = None``): the tools then use their own do-nothing stand-in, as on an install without the
package. Nothing is written into the user's home and no other process is affected. A program that imported
openvino before covnet did is told so with a warning (covnet cannot turn the reports off there).

**Cache.** ``<cache>/openvino/<key>/`` (:func:`covnet.runtime.cache.openvino_cache_dir`) holds ``model.xml`` and
``model.bin`` (OpenVINO's IR, float32 weights as converted) and ``entry.json`` (the key's parts and each file's
SHA-256 and size). The key is the SHA-256 of what the conversion depends on: the caller's parts (the SHA-256 of
the weights in memory, the topology, the input shape, torch's version), openvino's version and this entry format. An entry
is written into a temporary folder and renamed into place whole, under a lock file that makes a second run wait
for the first one's conversion and then read it. An entry whose files do not match ``entry.json``, or that
OpenVINO cannot read, is converted again (with a warning); a cache that cannot be written is a warning, and the
network converted in memory serves this run.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Mapping

from covnet.runtime.atomic import sweep_dead_temporaries, temporary_folder, temporary_sibling, write_json
from covnet.runtime.cache import openvino_cache_dir
from covnet.runtime.errors import last_line
from covnet.runtime.hashing import hash_file
from covnet.runtime.locking import waiting
from covnet.runtime.log import logger

log = logger(__name__)
TELEMETRY_PACKAGE = "openvino_telemetry"
ENTRY_FORMAT = 1
ENTRY_NAME = "entry.json"
MODEL_NAME = "model.xml"
WEIGHTS_NAME = "model.bin"
LOCK_NAME = ".conversion.lock"


def openvino_without_telemetry():
    """The ``openvino`` module, imported with its telemetry off (see the module's docstring)."""
    if "openvino" not in sys.modules:
        sys.modules[TELEMETRY_PACKAGE] = None       # ``import openvino_telemetry`` now raises ImportError
    import openvino
    if telemetry_active():
        _warn_telemetry_active()
    return openvino


def telemetry_active() -> bool:
    """Whether openvino's conversion tools in this process report to openvino-telemetry (not its stand-in)."""
    tools = sys.modules.get("openvino.tools.ovc.telemetry_utils")
    return getattr(getattr(tools, "tm", None), "__name__", None) == TELEMETRY_PACKAGE


@functools.cache
def _warn_telemetry_active() -> None:
    log.warning("openvino was imported before covnet, with its telemetry on: its conversions may report usage to "
                "Intel; import covnet before openvino, or opt out with openvino-telemetry's `opt_in_out --opt_out`")


def entry_key(parts: Mapping) -> dict:
    """The whole key of a conversion: the caller's ``parts``, openvino's version and the entry format."""
    return {**parts, "openvino": openvino_without_telemetry().get_version(), "format": ENTRY_FORMAT}


def entry_folder(key: Mapping, cache_dir: Path) -> Path:
    return cache_dir / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def entry_problem(entry: Path, key: Mapping) -> str | None:
    """What is wrong with the cache entry ``entry`` for ``key`` ("absent" when there is none), or None."""
    if not entry.is_dir():
        return "absent"
    try:
        record = json.loads((entry / ENTRY_NAME).read_text())
        if record.get("key") != json.loads(json.dumps(key)):
            return f"{ENTRY_NAME} holds another key"
        for name in (MODEL_NAME, WEIGHTS_NAME):
            found = hash_file(entry / name)
            if [found.sha256, found.size] != [record["files"][name]["sha256"], record["files"][name]["size"]]:
                return f"{name} does not match the SHA-256 and size in {ENTRY_NAME}"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _read(core, entry: Path, key: Mapping):
    """(the entry's model, None) or (None, what is wrong with the entry)."""
    problem = entry_problem(entry, key)
    if problem is not None:
        return None, problem
    try:
        return core.read_model(entry / MODEL_NAME, entry / WEIGHTS_NAME), None
    except RuntimeError as error:          # what OpenVINO raises for an IR it cannot read
        return None, f"OpenVINO cannot read it ({last_line(error)})"


def _write(model, entry: Path, key: Mapping) -> None:
    """Save ``model`` as the entry ``entry`` (built in a temporary folder, renamed into place whole; a damaged
    entry there is replaced)."""
    openvino = openvino_without_telemetry()
    staging = temporary_folder(entry.parent, "openvino")
    try:
        openvino.save_model(model, staging / MODEL_NAME, compress_to_fp16=False)   # exactly the converted weights
        files = {}
        for name in (MODEL_NAME, WEIGHTS_NAME):
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
            found = hash_file(staging / name)
            files[name] = {"sha256": found.sha256, "size": found.size}
        write_json(staging / ENTRY_NAME, {"key": key, "files": files})
        if entry.exists():                   # damaged (the caller holds the lock): moved aside, then removed
            stale = temporary_sibling(entry)
            os.rename(entry, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, entry)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise                        # else another thread of this process wrote it meanwhile
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_or_convert(core, parts: Mapping, convert: Callable[[], object], *, cache_dir: Path | None = None):
    """The OpenVINO model that ``convert()`` makes, read from the cache entry of ``parts`` when there is a sound
    one; otherwise converted, saved there and read back. ``core``: the ``openvino.Core`` that reads it."""
    cache_dir = Path(cache_dir) if cache_dir is not None else openvino_cache_dir()
    key = entry_key(parts)
    entry = entry_folder(key, cache_dir)
    model, _ = _read(core, entry, key)
    if model is not None:
        return model
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(waiting(cache_dir / LOCK_NAME))
        except OSError as error:
            _cannot_keep(cache_dir, error)
            return convert()
        model, problem = _read(core, entry, key)          # another run may have converted it meanwhile
        if model is not None:
            return model
        if problem != "absent":
            log.warning(f"{entry}: the cached OpenVINO conversion is damaged ({problem}); converting again")
        converted = convert()
        try:
            sweep_dead_temporaries(cache_dir, recursive=False)
            _write(converted, entry, key)
        except (OSError, RuntimeError) as error:         # RuntimeError: OpenVINO's save_model on a full disk
            _cannot_keep(cache_dir, error)
            return converted
        model, problem = _read(core, entry, key)
        if model is None:
            log.warning(f"{entry}: the OpenVINO conversion just saved cannot be read back ({problem}); using it "
                        f"from memory")
            return converted
        log.debug(f"converted the network for OpenVINO into {entry}")
        return model


def _cannot_keep(cache_dir: Path, error: Exception) -> None:
    detail = getattr(error, "strerror", None) or last_line(error)
    log.warning(f"{cache_dir}: cannot keep the OpenVINO conversion there ({detail}); converting in memory, again "
                f"on each run")
