"""Where everything for one dataset lives: ``<workspace>/raw``, ``preprocessed`` and ``results``.

The workspace owns every path: a stage asks it where another stage's files are, it never spells them out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WORKSPACE_ENV = "COVNET_WORKSPACE"
DEFAULT_WORKSPACE = "covnet_workspace"


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
        return self.root / "results"

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
    def fold(self, fold: int | str) -> Path:
        """``results/fold_<k>`` for k in 0–4, ``results/fold_all`` for the model trained on every case."""
        return self.results / f"fold_{fold}"

    @property
    def selftrain(self) -> Path:
        return self.results / "selftrain"

    def selftrain_round(self, round_index: int) -> Path:
        return self.selftrain / f"round_{round_index:02d}"

    @property
    def selftrain_final(self) -> Path:
        return self.selftrain / "final"
