"""Where everything for one dataset lives: ``<workspace>/raw``, ``preprocessed`` and ``results``.

The workspace owns every path: a stage asks it where another stage's files are, it never spells them out.
A trained model lives in a ``ModelFolder`` (``results/fold_K/``, a self-training round, ``selftrain/final/``,
or a copy of one anywhere), which names the files a training writes there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from covnet.runtime.atomic import read_json
from covnet.runtime.errors import CovnetError

WORKSPACE_ENV = "COVNET_WORKSPACE"
DEFAULT_WORKSPACE = "covnet_workspace"
RESULTS_FOLDER = "results"
FOLD_PREFIX = "fold_"
ALL_FOLDS = "all"                        # the model trained on every labelled case, validated on none
CHECKPOINT_NAMES = ("final", "best", "latest")
VALIDATION_SUMMARY = "summary.json"      # in a validation folder, beside the predicted cases
# The parts of a workspace a command locks (covnet.runtime.locking): one writer at a time, readers shared. Each
# training fold is its own part (``fold_scope``).
RAW_SCOPE, PREPROCESSED_SCOPE, SELFTRAIN_SCOPE = "raw", "preprocessed", "selftrain"


def fold_scope(fold: int | str) -> str:
    return f"{FOLD_PREFIX}{fold}"


@dataclass(frozen=True)
class ModelFolder:
    """One model's folder and the files a training writes into it. Path-like: ``os.fspath(folder)`` is its path
    and ``folder / name`` a file in it."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str | os.PathLike) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        return self.path.exists()

    def checkpoint(self, name: str = "final") -> Path:
        """``checkpoint_final.pth`` (training finished), ``checkpoint_best.pth`` (best moving-average pseudo-Dice)
        or ``checkpoint_latest.pth`` (an unfinished training's last save)."""
        if name not in CHECKPOINT_NAMES:
            raise ValueError(f"checkpoint {name!r} is not one of {', '.join(CHECKPOINT_NAMES)}")
        return self.path / f"checkpoint_{name}.pth"

    @property
    def is_trained(self) -> bool:
        return self.checkpoint("final").is_file()

    @property
    def settings_file(self) -> Path:
        """The settings, cases and draw weights the training was started with."""
        return self.path / "settings.json"

    def settings(self) -> dict | None:
        return _read_json_if_present(self.settings_file)

    @property
    def log_file(self) -> Path:
        return self.path / "training_log.txt"

    @property
    def progress_plot(self) -> Path:
        return self.path / "progress.png"

    @property
    def validation_dir(self) -> Path:
        """The validation cases predicted whole, in their original geometry, and their scores."""
        return self.path / "validation"

    @property
    def validation_summary_file(self) -> Path:
        return self.validation_dir / VALIDATION_SUMMARY

    def validation_summary(self) -> dict | None:
        """The scores of the finished validation (``covnet_evaluate``'s format); None before it is complete."""
        return _read_json_if_present(self.validation_summary_file)


def _read_json_if_present(path: Path):
    return read_json(path, "") if path.is_file() else None


@dataclass(frozen=True)
class ResultsFolder:
    """``results/``: a model folder per cross-validation fold (``fold_K``, ``fold_all``) and ``selftrain/`` with a
    model folder per round and the final model. The workspace's, or one copied on its own."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def fold(self, fold: int | str) -> ModelFolder:
        """``fold_<k>`` for a cross-validation fold k, ``fold_all`` for the model trained on every case."""
        return ModelFolder(self.path / f"{FOLD_PREFIX}{fold}")

    def numbered_folds(self) -> list[str]:
        """The cross-validation folds with a folder here (``fold_0``, ``fold_1``, ...), in order."""
        if not self.path.is_dir():
            return []
        names = [path.name[len(FOLD_PREFIX):] for path in self.path.glob(f"{FOLD_PREFIX}*") if path.is_dir()]
        return [str(number) for number in sorted(int(name) for name in names if name.isdigit()
                                                 and name == str(int(name)))]

    def trained_folds(self, fold_names: Sequence[str] | None = None) -> list[str]:
        """The cross-validation folds that finished training, in fold order: of ``fold_names`` (a workspace's are
        those of its ``splits.json``), by default of the numbered fold folders present."""
        names = self.numbered_folds() if fold_names is None else fold_names
        return [name for name in names if self.fold(name).is_trained]

    @property
    def selftrain(self) -> Path:
        return self.path / "selftrain"

    def selftrain_round(self, round_index: int) -> ModelFolder:
        return ModelFolder(self.selftrain / f"round_{round_index:02d}")

    @property
    def selftrain_final(self) -> ModelFolder:
        return ModelFolder(self.selftrain / "final")


def describe_folds(fold_names: Sequence[str]) -> str:
    """"0 to 4", "0, 2", or "none" for the folds a message offers."""
    if not fold_names:
        return "none"
    if list(fold_names) == [str(k) for k in range(len(fold_names))] and len(fold_names) > 2:
        return f"0 to {len(fold_names) - 1}"
    return ", ".join(fold_names)


def check_fold(fold: int | str, fold_names: Sequence[str], flag: str = "fold") -> str:
    """``fold`` as a fold name: one of ``fold_names`` (the cross-validation folds "0".."K-1") or "all"; a
    one-line error naming the valid folds otherwise."""
    name = str(fold).strip().lower()
    if isinstance(fold, bool) or (name != ALL_FOLDS and name not in fold_names):
        raise CovnetError(None, f"{flag} {str(fold)!r} does not exist; choose {describe_folds(fold_names)} "
                                f"or '{ALL_FOLDS}'")
    return name


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, explicit: str | os.PathLike | None = None) -> "Workspace":
        """``--workspace`` if given, else ``$COVNET_WORKSPACE``, else ``./covnet_workspace``."""
        chosen = explicit or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
        return cls(Path(chosen).expanduser().absolute())

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed"

    @property
    def results(self) -> Path:
        return self.root / RESULTS_FOLDER

    @property
    def dataset_json(self) -> Path:
        return self.raw / "dataset.json"

    @property
    def images_tr(self) -> Path:
        return self.raw / "imagesTr"

    @property
    def labels_tr(self) -> Path:
        return self.raw / "labelsTr"

    @property
    def images_unlabelled(self) -> Path:
        return self.raw / "imagesUnlabelled"

    @property
    def labels_unlabelled(self) -> Path:
        """Phantoms only: the pool's true labels, for diagnostics and oracle experiments; training never reads
        them."""
        return self.raw / "labelsUnlabelled"

    @property
    def images_ts(self) -> Path:
        return self.raw / "imagesTs"

    @property
    def labels_ts(self) -> Path:
        return self.raw / "labelsTs"

    # ------------------------------------------------------------------ preprocessed/: planning and preprocessing
    @property
    def fingerprint_json(self) -> Path:
        return self.preprocessed / "dataset_fingerprint.json"

    @property
    def plans_json(self) -> Path:
        return self.preprocessed / "plans.json"

    @property
    def planned_plans_json(self) -> Path:
        """What the planner chose, beside plans.json: anything that differs between the two is a hand edit."""
        return self.preprocessed / "plans.planned.json"

    @property
    def preprocessed_cases(self) -> Path:
        """The labelled cases on the plan's grid (``<case>.npy``, ``<case>_seg.npy``, ``<case>.json``)."""
        return self.preprocessed / "cases"

    @property
    def preprocessed_pool(self) -> Path:
        """The unlabelled CTs on the plan's grid."""
        return self.preprocessed / "unlabelled"

    @property
    def splits_json(self) -> Path:
        return self.preprocessed / "splits.json"

    # ------------------------------------------------------------------ results/: training and self-training
    @property
    def models(self) -> ResultsFolder:
        return ResultsFolder(self.results)

    def fold(self, fold: int | str) -> ModelFolder:
        """``results/fold_<k>`` for a cross-validation fold k, ``results/fold_all`` for the model trained on every
        case."""
        return self.models.fold(fold)

    def fold_names(self) -> list[str]:
        """The cross-validation folds "0".."K-1" of ``splits.json`` (a list with one entry per fold); before there
        is one, the numbered fold folders present."""
        if self.splits_json.is_file():
            stored = _read_json_if_present(self.splits_json)
            if isinstance(stored, list):
                return [str(index) for index in range(len(stored))]
        return self.models.numbered_folds()

    def trained_folds(self) -> list[str]:
        """The cross-validation folds whose training finished (``checkpoint_final.pth``), in fold order."""
        return self.models.trained_folds(self.fold_names())

    @property
    def selftrain(self) -> Path:
        return self.models.selftrain

    def selftrain_round(self, round_index: int) -> ModelFolder:
        return self.models.selftrain_round(round_index)

    @property
    def selftrain_final(self) -> ModelFolder:
        return self.models.selftrain_final
