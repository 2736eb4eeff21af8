"""``covnet_export_model``'s work: a trained model of a workspace as one zip that another machine can check and use.

The archive holds the chosen checkpoints under their results-folder paths (``fold_<k>/checkpoint_<final|best>.pth``
or ``selftrain/final/checkpoint_final.pth``), ``plans.json`` (the plan the checkpoints were trained under),
``dataset.json`` and ``manifest.json`` (:mod:`covnet.model_archive.manifest`). Unpacked, it is a results folder
that ``covnet_predict`` reads like a workspace's. The zip's bytes depend on the files only (fixed member
timestamps), and it is written atomically.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from covnet import __version__
from covnet.checkpoint import CHECKPOINT_FORMAT, Checkpoint
from covnet.inference.model_choice import CHECKPOINT_CHOICES, select_checkpoints
from covnet.model_archive.manifest import (
    DATASET_NAME,
    MANIFEST_NAME,
    PLANS_NAME,
    ArchivedModel,
    ModelManifest,
    model_id,
)
from covnet.preprocessing.case import PREPROCESSING_VERSION
from covnet.runtime.hashing import FileEntry, hash_stream
from covnet.runtime.atomic import atomic_path, read_json
from covnet.runtime.errors import CovnetError
from covnet.workspace import Workspace

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)     # the zip format's earliest date: the same files make the same archive
_SELFTRAIN = "selftrain"


@dataclass(frozen=True)
class ExportedArchive:
    path: Path
    model_id: str
    manifest: ModelManifest

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _selftrained_folder(workspace: Workspace) -> Path:
    return Path(os.fspath(workspace.selftrain_final))


def chosen_checkpoints(workspace: Workspace, folds: Sequence[str] | None, *, selftrain: bool,
                       checkpoint: str) -> list[Path]:
    """The checkpoint files to export: the self-trained model, the given folds, or else what covnet_predict
    would use from this workspace (its ``select_checkpoints``)."""
    if selftrain and folds:
        raise CovnetError(None, "choose either --selftrain or -f FOLDS, not both")
    if not selftrain:
        return select_checkpoints(workspace.results, folds, checkpoint,
                                  elsewhere="point --workspace at the workspace that trained one")[0]
    path = _selftrained_folder(workspace) / f"checkpoint_{checkpoint}.pth"
    if checkpoint != "final":
        raise CovnetError(path, "the self-trained model has only checkpoint_final.pth; drop --checkpoint best")
    if not path.is_file():
        raise CovnetError(path, "not found; run covnet_selftrain first, or export folds with -f")
    return [path]


def _archived_model(workspace: Workspace, path: Path) -> ArchivedModel:
    """The model's name, archive path and validation means (``validation/summary.json`` of a fold,
    ``model.json`` of the self-trained model)."""
    name = path.relative_to(workspace.results).as_posix()
    if path.parent == _selftrained_folder(workspace):
        record = path.parent / "model.json"
        validation = read_json(record, "").get("validation") if record.is_file() else None
        return ArchivedModel(_SELFTRAIN, name, validation)
    summary = path.parent / "validation" / "summary.json"
    validation = read_json(summary, "").get("mean") if summary.is_file() else None
    return ArchivedModel(path.parent.name, name, validation)


def _shared_plan(paths: Sequence[Path]) -> dict:
    """The plan every checkpoint was trained under (models trained under different plans cannot be ensembled)."""
    plans = [(path, Checkpoint.load(path).plan) for path in paths]
    for path, plan in plans[1:]:
        if plan != plans[0][1]:
            raise CovnetError(path, f"was trained under another plan than {plans[0][0]}; export them separately")
    return plans[0][1]


def _add(archive: zipfile.ZipFile, name: str, source: bytes | Path, *, compress: bool) -> FileEntry:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    with archive.open(info, "w") as sink, (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) \
            as handle:
        return hash_stream(handle, sink)


def export_model(workspace: Workspace, output: str | os.PathLike, folds: Sequence[str] | None = None, *,
                 selftrain: bool = False, checkpoint: str = "final") -> ExportedArchive:
    """Write the chosen model of ``workspace`` to the zip ``output``; return its path, id and manifest."""
    if checkpoint not in CHECKPOINT_CHOICES:
        raise CovnetError(None, f"--checkpoint {checkpoint!r}: choose one of {', '.join(CHECKPOINT_CHOICES)}")
    output = Path(output)
    paths = chosen_checkpoints(workspace, folds, selftrain=selftrain, checkpoint=checkpoint)
    models = [_archived_model(workspace, path) for path in paths]
    plan = _shared_plan(paths)
    dataset = read_json(workspace.dataset_json, "the workspace has no dataset description")
    plan_bytes = (json.dumps(plan, indent=2) + "\n").encode()
    with atomic_path(output) as temporary:
        with zipfile.ZipFile(temporary, "w") as archive:
            files = {PLANS_NAME: _add(archive, PLANS_NAME, plan_bytes, compress=True),
                     DATASET_NAME: _add(archive, DATASET_NAME, workspace.dataset_json, compress=True)}
            for model, path in zip(models, paths):
                # Checkpoints are float weights that deflate barely shrinks: stored, they unpack at disk speed.
                files[model.file] = _add(archive, model.file, path, compress=False)
            manifest = ModelManifest(
                covnet_version=__version__, plans_version=int(plan.get("version", 0)),
                preprocessing_version=PREPROCESSING_VERSION, checkpoint_format=CHECKPOINT_FORMAT,
                checkpoint=checkpoint, folds=[] if selftrain or models[0].name == _SELFTRAIN else
                [model.name.removeprefix("fold_") for model in models],
                models=models, files=files, dataset=str(dataset.get("name", "")),
                labels={str(name): int(value) for name, value in dataset.get("labels", {}).items()})
            manifest_bytes = manifest.to_bytes()
            _add(archive, MANIFEST_NAME, manifest_bytes, compress=True)
    return ExportedArchive(output, model_id(manifest_bytes), manifest)
