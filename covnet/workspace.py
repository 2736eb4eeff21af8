"""Where everything for one dataset lives: ``<workspace>/raw``, ``preprocessed`` and ``results``."""
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
    def images_ts(self) -> Path:
        return self.raw / "imagesTs"

    @property
    def labels_ts(self) -> Path:
        return self.raw / "labelsTs"
