"""A training checkpoint: everything inference needs, and everything a resumed run needs, as plain types.

It loads with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only, so loading
a checkpoint never runs code, and a file that fails that load is refused as it is (never with PyTorch's advice to
load it unsafely). Writing is atomic and verified (temporary name, zip archive complete, fsync, rename): a kill or
a full disk while saving never leaves a partial checkpoint under the final name.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from covnet.planning.plans import Plan
from covnet.runtime.atomic import atomic_path
from covnet.runtime.errors import CovnetError, last_line

CHECKPOINT_FORMAT = 1


@dataclass
class Checkpoint:
    plan: dict                              # plans.json content: labels, topology, spacing, normalization, ...
    fold: str                               # "0".."4" or "all" (or "selftrain_round_NN")
    settings: dict                          # every training flag
    network_state: dict                     # state_dict of the UNet
    epoch: int = 0                          # epochs completed
    optimizer_state: dict | None = None
    grad_scaler_state: dict | None = None
    rng_state: dict | None = None           # python, numpy and torch RNG states
    history: dict = field(default_factory=dict)   # per-epoch curves for progress.png and the log
    best_ema_dice: float | None = None
    environment: dict = field(default_factory=dict)   # the software that trained it (covnet.runtime.environment)
    format: int = CHECKPOINT_FORMAT

    @property
    def typed_plan(self) -> Plan:
        return Plan.from_json(self.plan, "checkpoint plan")

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path, verify=archive_problem) as temporary:
            torch.save(asdict(self), temporary)   # a full disk: torch's "unexpected pos …", made one line there

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "Checkpoint":
        path = Path(path)
        if not path.is_file():
            raise CovnetError(path, "checkpoint not found")
        problem = archive_problem(path)
        if problem is None:
            try:
                data = torch.load(path, map_location=map_location, weights_only=True)
            except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, KeyError,
                    ValueError, TypeError, IndexError, AttributeError) as error:
                problem = _load_failure(error)
        if problem is not None:
            raise CovnetError(path, f"is truncated or not a covnet checkpoint ({problem})")
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            raise CovnetError(path, f"is not a covnet checkpoint of format {CHECKPOINT_FORMAT}")
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


def archive_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete zip archive (``torch.save``'s format), from its directory at the end of the
    file (cheap: nothing is decompressed); None when every member lies within the file."""
    size = path.stat().st_size if path.is_file() else 0
    try:
        with zipfile.ZipFile(path) as archive:
            end = max((member.header_offset + member.compress_size for member in archive.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return f"{size} bytes, no complete zip archive: {error}"
    return None if end <= size else f"{size} bytes where its zip directory declares at least {end}"


def _load_failure(error: Exception) -> str:
    """PyTorch's reason, without its advice to retry with ``weights_only=False`` (which would run any code the
    file holds): for a weights-only refusal, only the unpickler's own complaint."""
    text = str(error)
    if "weights_only" in text or "Weights only load failed" in text:
        reason = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line), "")
        reason = reason.split("WeightsUnpickler error:", 1)[-1].split(". ")[0].strip()
        return f"it holds objects a safe weights-only load refuses{': ' + reason if reason else ''}"
    return last_line(error).split(". ")[0] if text.strip() else type(error).__name__


def capture_rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {"python": _plain(random.getstate()),
            "numpy": {"key": numpy_state[0], "state": torch.from_numpy(numpy_state[1].astype(np.int64)),
                      "position": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                      "cached_gaussian": float(numpy_state[4])},
            "torch": torch.get_rng_state()}


def restore_rng_state(state: dict | None) -> None:
    if not state:
        return
    random.setstate(_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["key"], numpy_state["state"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])


def _plain(value):
    return [_plain(item) for item in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value
