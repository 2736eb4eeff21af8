"""``covnet_predict``'s work: a folder of CTs in, one label map per case and a report out.

* **Cases** come from :mod:`covnet.inference.inputs` (``find_cohort``: what is a case and its name, label maps
  skipped, inputs that are not CTs refused). Each output keeps its input's format (``.mhd``/``.nhdr`` become
  ``.mha``/``.nrrd``, one file that can be renamed atomically); a DICOM series becomes ``<folder name>.nii.gz``.
* **Models** (:func:`select_checkpoints`): the self-trained model when there is one, else the ensemble of the
  trained folds, else ``fold_all``.
* **Per case**, in this order, each file atomically: probabilities (``<case>.npz``, optional), preview
  (``<case>.png``, optional), the report row (``.reports/<case>.json``), and the label map last. A label map
  under its final name therefore means the case is complete, which is what ``resume`` relies on, and
  ``report.csv``/``report.json`` are rebuilt from the rows at the end, so a killed run loses nothing.
* **Failures.** A case that cannot be read (damaged, empty, 2D, ...) or is no CT that can be segmented
  (:func:`check_input`: not in HU, degenerate, implausible spacing) is logged as one ``error:`` line naming the
  file, and the other cases go on; the caller gets the failures in the summary.
* **Throughput.** ``num_parts``/``part_id`` shard the sorted cases (case i goes to part i % num_parts); while
  the network works on one case, a background thread reads and preprocesses the next.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from covnet.dataset import IGNORE_LABEL_NAME
from covnet.image.io import Geometry, read_image, write_image
from covnet.inference.inputs import REPORTS_FOLDER, CohortCase, LabelMapInput, check_input, check_output_folder
from covnet.inference.predictor import Predictor
from covnet.inference.preview import write_preview
from covnet.inference.report import REQUIRED_LABELS, case_report, write_report
from covnet.preprocessing.case import CaseProperties, preprocess_case
from covnet.runtime.atomic import atomic_path, read_json, sweep_dead_temporaries, temporary_sibling, write_json
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.runtime.sharding import shard
from covnet.workspace import ALL_FOLDS, FOLD_PREFIX, RESULTS_FOLDER, ModelFolder, ResultsFolder, Workspace, check_fold

log = logger(__name__)
# Reading an image redirects the process's stdout/stderr for a moment (covnet.image.io keeps ITK's console messages
# off the terminal and puts them in the error): while the reader thread does that, the main thread must not
# write to the console, or its lines would be lost or end up in a read error.
_CONSOLE = threading.Lock()

CHECKPOINT_CHOICES = ("final", "best")


# ---------------------------------------------------------------------------------------------- models
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


def select_checkpoints(results: Path, folds: Sequence[str] | None = None, checkpoint: str = "final"
                       ) -> tuple[list[Path], str]:
    """The checkpoint files to predict with from a results folder, and a short description of the choice.

    With ``folds`` (each a fold of the split or ``all``; another name is a one-line error naming the valid
    folds): each one's ``checkpoint_<checkpoint>.pth``. Otherwise the first of: ``results`` itself being one
    model's folder; the self-trained model (``selftrain/final`` is trained); every cross-validation fold that
    finished training (the folds of the workspace's ``splits.json``); ``fold_all``. A folder holding a
    ``results/`` folder (a copied workspace) is looked into. ``checkpoint`` picks ``checkpoint_final.pth`` or
    ``checkpoint_best.pth`` of the chosen models.
    """
    if checkpoint not in CHECKPOINT_CHOICES:
        raise CovnetError(None, f"--checkpoint {checkpoint!r}: choose one of {', '.join(CHECKPOINT_CHOICES)}")
    results = Path(results)
    if results.is_file():
        return [results], f"checkpoint {results}"
    if not results.is_dir():
        raise CovnetError(results, "not found; no trained model to predict with (train with covnet_train, or "
                                   "pass --model)")
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
                                   "with checkpoint_final.pth); train one with covnet_train first, or pass --model")
    paths = [_model_file(models.fold(fold), checkpoint) for fold in trained]
    what = "fold all" if trained == [ALL_FOLDS] else f"the ensemble of folds {', '.join(trained)}"
    return paths, f"{what} (checkpoint_{checkpoint})"


# ---------------------------------------------------------------------------------------------- prediction
@dataclass(frozen=True)
class CohortSettings:
    save_probabilities: bool = False
    preview: bool = False
    resume: bool = False            # keep the cases already complete
    num_parts: int = 1
    part_id: int = 0


@dataclass
class CohortSummary:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)          # complete before this run (--continue)
    label_maps: list[str] = field(default_factory=list)       # inputs that were label maps, not CTs
    failed: dict[str, str] = field(default_factory=dict)     # case -> the one-line error
    report_files: tuple[Path, ...] = ()


@dataclass
class _LoadedCase:
    image: np.ndarray
    geometry: Geometry
    preprocessed: np.ndarray
    properties: CaseProperties


def is_complete(case: CohortCase, settings: CohortSettings) -> bool:
    """Every file this run would write for the case is there (the label map is written last)."""
    wanted = [case.output, case.report_file]
    wanted += [case.probabilities_file] if settings.save_probabilities else []
    wanted += [case.preview_file] if settings.preview else []
    return all(path.is_file() for path in wanted)


def prepare_output_folder(output_dir: Path) -> None:
    """Create ``output_dir``, check that it is writable and remove what a killed run left half-written.
    ``.reports/`` is made by the first row written, so a run that writes none leaves no empty folder."""
    check_output_folder(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    probe = temporary_sibling(output_dir / "write-check")
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise CovnetError(output_dir, f"cannot write here ({error.strerror or error})") from None
    sweep_dead_temporaries(output_dir, recursive=False)
    sweep_dead_temporaries(output_dir / REPORTS_FOLDER, recursive=False)
    remove_empty_reports_folder(output_dir)


def remove_empty_reports_folder(output_dir: Path) -> None:
    """``OUT/.reports`` holds the rows of finished cases; without any it is only clutter (a failed run's)."""
    with contextlib.suppress(OSError):
        (output_dir / REPORTS_FOLDER).rmdir()     # only when empty


def prediction_labels(predictor: Predictor) -> dict[str, int]:
    return {name: value for name, value in predictor.plan.labels.items() if name != IGNORE_LABEL_NAME}


def _load(case: CohortCase, predictor: Predictor) -> _LoadedCase:
    with _CONSOLE:
        image, geometry = read_image(case.source)
    check_input(case, image, geometry, predictor.plan)
    preprocessed, _, properties = preprocess_case(case.case, [image], geometry, predictor.plan)
    return _LoadedCase(image, geometry, preprocessed, properties)


def _failure_line(error: Exception, case: CohortCase) -> str:
    if isinstance(error, CovnetError):
        return str(error)
    if isinstance(error, OSError):
        return f"{error.filename or case.source}: {error.strerror or error}"
    return f"{case.source}: {error}"


def _save_probabilities(path: Path, probabilities: np.ndarray, labels: dict[str, int]) -> None:
    names = [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez_compressed(handle, probabilities=probabilities.astype(np.float16),
                                class_names=np.array(names, dtype=str))


def _predict_one(predictor: Predictor, case: CohortCase, loaded: _LoadedCase, settings: CohortSettings,
                 labels: dict[str, int]) -> dict:
    segmentation, probabilities = predictor.predict_preprocessed(loaded.preprocessed, loaded.properties)
    if segmentation.shape != loaded.geometry.shape:
        raise RuntimeError(f"{case.case}: prediction of shape {segmentation.shape} for an image of shape "
                           f"{loaded.geometry.shape}")
    row = {"case": case.case}
    if all(name in labels for name in REQUIRED_LABELS):
        row.update(case_report(segmentation, loaded.geometry.spacing, probabilities, labels))
    if settings.save_probabilities:
        _save_probabilities(case.probabilities_file, probabilities, labels)
    if settings.preview:
        write_preview(loaded.image, segmentation, loaded.geometry, case.preview_file, labels, title=case.case)
    write_json(case.report_file, row)
    write_image(segmentation, loaded.geometry, case.output)   # last: its presence means the case is complete
    return row


def _describe(row: dict) -> str:
    if "infection_percent_lungs" not in row:
        return "written"
    lungs = row["left_lung_ml"] + row["right_lung_ml"]
    percent = row["infection_percent_lungs"]
    return f"lungs {lungs:.0f} mL, infection {row['infection_ml']:.1f} mL" + \
        ("" if percent is None else f" ({percent:.1f}% of the lungs)")


def predict_cohort(predictor: Predictor, cases: Sequence[CohortCase], output_dir: str | os.PathLike,
                   settings: CohortSettings = CohortSettings()) -> CohortSummary:
    """Predict this part's share of ``cases`` into ``output_dir`` and rebuild the report over all ``cases``."""
    output_dir = Path(output_dir)
    if predictor.plan.in_channels != 1:
        raise CovnetError(None, f"the model needs {predictor.plan.in_channels} images per case; covnet_predict "
                                f"reads one CT per case")
    mine = shard(cases, settings.num_parts, settings.part_id)
    prepare_output_folder(output_dir)
    labels = prediction_labels(predictor)
    summary = CohortSummary()
    todo = []
    for case in mine:
        (summary.skipped if settings.resume and is_complete(case, settings) else todo).append(case)
    if summary.skipped:
        log.info(f"{len(summary.skipped)} case(s) already complete, skipped (--continue)")
    progress = tqdm(total=len(todo), desc="predict", unit="case", leave=False, disable=None)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covnet-predict-reader")
    try:
        upcoming: Future | None = reader.submit(_load, todo[0], predictor) if todo else None
        for index, case in enumerate(todo):
            current = upcoming
            upcoming = reader.submit(_load, todo[index + 1], predictor) if index + 1 < len(todo) else None
            started = time.monotonic()
            try:
                loaded = current.result()
            except LabelMapInput as skipped:
                summary.label_maps.append(case.case)
                with _CONSOLE:
                    log.warning(str(skipped))
                    progress.update()
                continue
            except (CovnetError, OSError, ValueError) as error:
                summary.failed[case.case] = _failure_line(error, case)
                with _CONSOLE:
                    log.error(summary.failed[case.case])
                    progress.update()
                continue
            row = _predict_one(predictor, case, loaded, settings, labels)
            del loaded
            summary.written.append(case.case)
            with _CONSOLE:
                progress.update()
                log.info(f"[{index + 1}/{len(todo)}] {case.case}: {_describe(row)} -> {case.output.name} "
                         f"({time.monotonic() - started:.1f} s)")
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        progress.close()
    summary.report_files = rebuild_report(cases, output_dir, exclude=set(summary.failed))
    remove_empty_reports_folder(output_dir)
    return summary


def rebuild_report(cases: Sequence[CohortCase], output_dir: Path, exclude: set[str] = frozenset()
                   ) -> tuple[Path, ...]:
    """``report.csv`` and ``report.json`` from the row of every case with a label map and a row, in case order.

    Cases in ``exclude`` (those that failed in this run) are left out even if an older run wrote them."""
    rows = []
    for case in sorted(cases, key=lambda item: item.case):
        if case.case in exclude or not case.output.is_file() or not case.report_file.is_file():
            continue
        row = read_json(case.report_file, "")
        if isinstance(row, dict) and row.get("case") == case.case:
            rows.append(row)
    return write_report(rows, output_dir)
