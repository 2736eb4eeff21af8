"""``manifest.json`` of a model archive: what the model is and the SHA-256 and size of every other file in it.

The model id is the SHA-256 of the manifest's bytes: since the manifest holds every file's checksum, the id
names the archive's whole content, and the same checkpoints exported twice get the same id.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Sequence

from covnet.runtime.errors import CovnetError
from covnet.runtime.hashing import FileEntry

MANIFEST_NAME = "manifest.json"
ARCHIVE_FORMAT = 1
PLANS_NAME = "plans.json"
DATASET_NAME = "dataset.json"


@dataclass(frozen=True)
class ArchivedModel:
    """One checkpoint of the archive: ``fold_<k>`` or ``selftrain``, its file, and its validation means
    (``{structure: {"dice": .., "nsd": ..}}``) when the workspace had them."""
    name: str
    file: str
    validation: dict | None = None


@dataclass(frozen=True)
class ModelManifest:
    covnet_version: str
    plans_version: int
    preprocessing_version: int
    checkpoint_format: int
    checkpoint: str                              # "final" or "best": which checkpoint of each model
    folds: list[str]                             # the folds exported; empty for the self-trained model
    models: list[ArchivedModel]
    files: dict[str, FileEntry]                  # every file but the manifest, by its path in the archive
    dataset: str = ""
    labels: dict[str, int] = field(default_factory=dict)
    format: int = ARCHIVE_FORMAT

    def to_bytes(self) -> bytes:
        """The manifest as it is stored (sorted keys, so the same content always has the same bytes)."""
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str | os.PathLike) -> "ModelManifest":
        try:
            raw = json.loads(data)
            if raw.get("format") != ARCHIVE_FORMAT:
                raise CovnetError(source, f"{MANIFEST_NAME} is of format {raw.get('format')!r}; this covnet reads "
                                          f"format {ARCHIVE_FORMAT}")
            files = {str(name): FileEntry(str(entry["sha256"]), int(entry["size"]))
                     for name, entry in raw["files"].items()}
            models = [ArchivedModel(str(model["name"]), str(model["file"]), model.get("validation"))
                      for model in raw["models"]]
            manifest = cls(covnet_version=str(raw["covnet_version"]), plans_version=int(raw["plans_version"]),
                           preprocessing_version=int(raw["preprocessing_version"]),
                           checkpoint_format=int(raw["checkpoint_format"]), checkpoint=str(raw["checkpoint"]),
                           folds=[str(fold) for fold in raw["folds"]], models=models, files=files,
                           dataset=str(raw.get("dataset", "")),
                           labels={str(name): int(value) for name, value in raw.get("labels", {}).items()})
        except CovnetError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CovnetError(source, f"{MANIFEST_NAME} is not a covnet model manifest ({type(error).__name__}: "
                                      f"{error})") from None
        for model in manifest.models:
            if model.file not in manifest.files:
                raise CovnetError(source, f"{MANIFEST_NAME} names the model file {model.file}, which it does not list")
        return manifest


def choice_problem(manifest: ModelManifest, folds: Sequence[str] | None, checkpoint: str | None) -> str | None:
    """Why ``-f folds`` or ``--checkpoint`` asks an archive for a model it does not hold (it holds the models and the
    checkpoint it was exported with, ``manifest.folds`` and ``manifest.checkpoint``); None when it holds them."""
    held = (f"fold{'s' if len(manifest.folds) > 1 else ''} {', '.join(manifest.folds)}" if manifest.folds
            else "the self-trained model") + f" (checkpoint_{manifest.checkpoint})"
    if checkpoint is not None and checkpoint != manifest.checkpoint:
        return f"holds {held} only, not checkpoint_{checkpoint}: leave out --checkpoint, or export the model with " \
               f"--checkpoint {checkpoint}"
    missing = [str(fold) for fold in folds or () if str(fold).strip().lower() not in manifest.folds]
    if missing:
        return f"holds {held} only, not -f {' '.join(missing)}: leave out -f to use what it holds, or export " \
               f"the folds you want (covnet_export_model -f)"
    return None


def model_id(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()


def path_problem(name: str) -> str | None:
    """Why an archive member name could write outside the folder it is unpacked into (or is not a plain relative
    path), or None."""
    if not name or "\\" in name or "\x00" in name:
        return "is not a plain relative path"
    path = PurePosixPath(name)
    if path.is_absolute() or (len(path.parts[0]) >= 2 and path.parts[0][1] == ":"):
        return "is an absolute path"
    if any(part in ("..", ".") for part in path.parts):
        return "steps out of its folder ('..')"
    return None
