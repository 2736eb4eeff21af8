"""Which trained models ``covnet_predict`` (and :func:`covnet.load_model`, ``covnet_export_model``) predict with.

The rule (:func:`select_checkpoints`): the folds asked for; else the folder itself being one model's; else the
self-trained model when there is one; else the ensemble of the trained folds; else ``fold_all``. A missing
checkpoint is a one-line error that says what to do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from covnet.runtime.errors import CovnetError
from covnet.workspace import ALL_FOLDS, FOLD_PREFIX, RESULTS_FOLDER, ModelFolder, ResultsFolder, Workspace, check_fold

CHECKPOINT_CHOICES = ("final", "best")


def _model_file(folder: ModelFolder, checkpoint: str) -> Path:
    """The model's ``checkpoint_<checkpoint>.pth``; when missing, a one-line error that says what to do."""
    path = folder.checkpoint(checkpoint)
    if path.is_file():
        return path
    other = "best" if checkpoint == "final" else "final"
    if folder.checkpoint(other).is_file():
        raise CovnetError(path, f"not found, but checkpoint_{other}.pth is: pass --checkpoint {other}")
    if folder.exists():
        raise CovnetError(path, "not found; this model has not finished training (covnet_train ... --continue)")
    raise CovnetError(path, "not found; train this fold first (covnet_train) or choose other folds with -f")


def _split_folds(results: Path) -> list[str] | None:
    """The cross-validation folds of the split that ``results`` was trained on (its workspace's ``splits.json``);
    None when it has none at hand (e.g. a results folder copied on its own)."""
    workspace = Workspace(results.parent)
    if results.name == RESULTS_FOLDER and workspace.splits_json.is_file():
        return workspace.fold_names()
    return None


def _check_folds(results: Path, folds: Sequence[str]) -> list[str]:
    """``-f``'s folds as fold names: folds of the split, or without one any fold number; else a one-line error."""
    known = _split_folds(results)
    if known is None:
        present = ResultsFolder(results).numbered_folds()
        known = present + [name for name in (str(fold).strip() for fold in folds) if name.isdigit()
                           and name == str(int(name)) and name not in present]
    return [check_fold(fold, known, flag="-f") for fold in folds]


def select_checkpoints(results: Path, folds: Sequence[str] | None = None, checkpoint: str | None = None, *,
                       elsewhere: str = "pass --model") -> tuple[list[Path], str]:
    """The checkpoint files to predict with from a results folder, and a short description of the choice.

    With ``folds`` (each a fold of the split or ``all``; another name is a one-line error naming the valid
    folds): each one's ``checkpoint_<checkpoint>.pth``. Otherwise the first of: ``results`` itself being one
    model's folder; the self-trained model (``selftrain/final`` is trained); every cross-validation fold that
    finished training (the folds of the workspace's ``splits.json``); ``fold_all``. A folder holding a
    ``results/`` folder (a copied workspace) is looked into. ``checkpoint`` picks ``checkpoint_final.pth`` or
    ``checkpoint_best.pth`` of the chosen models (default: final). ``results`` may also be a checkpoint file,
    which is the model; then ``folds`` and ``checkpoint`` have nothing to choose and are a one-line error.
    ``elsewhere`` ends the error for a folder without a trained model: how the caller's user names a model
    elsewhere (covnet_predict's ``--model``).
    """
    if checkpoint is not None and checkpoint not in CHECKPOINT_CHOICES:
        raise CovnetError(None, f"--checkpoint {checkpoint!r}: choose one of {', '.join(CHECKPOINT_CHOICES)}")
    results = Path(results)
    if results.is_file():
        given = ([f"-f {' '.join(map(str, folds))}"] if folds else []) + \
            ([f"--checkpoint {checkpoint}"] if checkpoint is not None else [])
        if given:
            raise CovnetError(results, f"is one checkpoint file, so {' and '.join(given)} cannot choose among "
                                       "models; leave them out, or pass the results folder (--model) to choose")
        return [results], f"checkpoint {results}"
    checkpoint = checkpoint or "final"
    if not results.is_dir():
        raise CovnetError(results, f"not found; no trained model here: train one with covnet_train, or {elsewhere}")
    models = ResultsFolder(results)
    if not any(results.glob(f"{FOLD_PREFIX}*")) and not models.selftrain.is_dir() and \
            (results / RESULTS_FOLDER).is_dir():
        results, models = results / RESULTS_FOLDER, ResultsFolder(results / RESULTS_FOLDER)
    if folds:
        names = _check_folds(results, folds)
        paths = [_model_file(models.fold(fold), checkpoint) for fold in names]
        return paths, f"fold{'s' if len(names) > 1 else ''} {', '.join(names)} (checkpoint_{checkpoint})"
    if ModelFolder(results).checkpoint(checkpoint).is_file():
        return [ModelFolder(results).checkpoint(checkpoint)], f"{results.name} (checkpoint_{checkpoint})"
    if models.selftrain_final.is_trained:
        return [_model_file(models.selftrain_final, checkpoint)], f"the self-trained model (checkpoint_{checkpoint})"
    trained = models.trained_folds(_split_folds(results))
    if not trained and models.fold(ALL_FOLDS).is_trained:
        trained = [ALL_FOLDS]
    if not trained:
        raise CovnetError(results, "holds no trained model (no selftrain/final/, trained fold_K/ or fold_all/ "
                                   f"with checkpoint_final.pth); train one with covnet_train first, or {elsewhere}")
    paths = [_model_file(models.fold(fold), checkpoint) for fold in trained]
    what = "fold all" if trained == [ALL_FOLDS] else f"the ensemble of folds {', '.join(trained)}"
    return paths, f"{what} (checkpoint_{checkpoint})"
