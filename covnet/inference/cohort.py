"""``covnet_predict``'s work: a folder of CTs in, one label map and/or DICOM-SEG per case and a report out.

* **Cases** come from :mod:`covnet.inference.inputs` (``find_cohort``: what is a case and its name, what it
  writes, label maps skipped, inputs that are not CTs refused). A label map keeps its input's format
  (``.mhd``/``.nhdr`` become ``.mha``/``.nrrd``, one file that can be renamed atomically; a DICOM series becomes
  ``<folder name>.nii.gz``); a DICOM series gets a DICOM-SEG of itself (``<case>.seg.dcm``) by default.
* **The model** is a :class:`covnet.api.Model` (``covnet.load_model``): each case is read (:func:`read_input`) and
  prepared (``Model.prepare``) in a background thread, then segmented with ``Model.segment``, the method the
  Python API exposes, so that ``covnet_predict`` and the API give the same labels and report rows.
* **Per case**, in this order, each file atomically: probabilities (``<case>.npz``, optional), preview
  (``<case>.png``, optional), the report row (``.reports/<case>.json``), the DICOM-SEG, and the label map last
  (without a label map, the SEG is last). That last file under its final name therefore means the case is
  complete, which is what ``resume`` relies on, and ``report.csv``/``report.json`` are rebuilt from the rows at
  the end, so a killed run loses nothing (a run with no complete case leaves no report).
* **Other output types** are kept: a run removes and rewrites only the files of its own ``--output-type``, so a
  ``.seg.dcm`` of an earlier run stays beside a ``nifti`` run's label maps (and the other way round), unless
  another model or other settings wrote them (``claim_output_folder``).
* **Failures.** A case that cannot be read (damaged, empty, 2D, ...), is no CT that can be segmented
  (``check_input``: not in HU, degenerate, implausible spacing) or, for a DICOM-SEG, whose series does not lie
  on the grid it was read onto is logged as one ``error:`` line naming the file, before the network runs, and
  the other cases go on; the caller gets the failures in the summary.
* **Throughput.** ``num_parts``/``part_id`` shard the sorted cases (case i goes to part i % num_parts); while
  the network works on one case, a background thread reads and preprocesses the next.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from tqdm import tqdm

from covnet.api import Model, PreparedImage, Segmentation, read_input
from covnet.image.io import write_image
from covnet.inference.cpu_runtime import OPENVINO
from covnet.inference.inputs import REPORTS_FOLDER, RUN_FILE, CohortCase, LabelMapInput, check_output_folder
from covnet.inference.preview import write_preview
from covnet.inference.report import REPORT_CSV, REPORT_JSON, write_report
from covnet.planning.plans import plan_differences
from covnet.runtime.atomic import atomic_path, read_json, sweep_dead_temporaries, temporary_sibling, write_json
from covnet.runtime.environment import environment_record
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import CONSOLE_LOCK, logger
from covnet.runtime.sharding import shard

if TYPE_CHECKING:
    import pydicom

log = logger(__name__)


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


@dataclass(frozen=True)
class _ReadCase:
    prepared: PreparedImage
    seg_sources: list[pydicom.Dataset] | None      # the series' headers, checked against its grid, for a SEG


def is_complete(case: CohortCase, settings: CohortSettings) -> bool:
    """Every file this run would write for the case is there (``case.final_file`` is written last)."""
    wanted = [*case.outputs, case.report_file]
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
    folder = output_dir / REPORTS_FOLDER
    if folder.is_dir() and not any(path.name != RUN_FILE for path in folder.iterdir()):
        (folder / RUN_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()     # only when empty


def run_identity(model: Model) -> dict:
    """What makes two runs' outputs one cohort: the model (its id) and how it predicts (the inference settings)."""
    return json.loads(json.dumps({"model": model.model_id, "inference": dataclasses.asdict(model.settings)}))


def claim_output_folder(model: Model, cases: Sequence[CohortCase], mine: Sequence[CohortCase], output_dir: Path, *,
                        resume: bool) -> None:
    """Record this run's identity in ``OUT/.reports``.

    A new run (no ``--continue``) of the same model and settings first removes the earlier outputs of its own cases
    (``mine``, this part's share of ``cases``) that it redoes: the files of its output type, never those of another
    (a ``.seg.dcm`` stays beside the label maps of a ``--output-type nifti`` run, and the other way round). When
    another model or other settings wrote the folder, a new run removes every earlier output of every case, of
    every type, with a warning (other parts, and another output type, would keep them otherwise, beside this
    model's report); ``--continue`` refuses such a folder, whose finished cases it would keep beside its own."""
    stamp = output_dir / REPORTS_FOLDER / RUN_FILE
    identity = run_identity(model)
    earlier = read_json(stamp, "") if stamp.is_file() else None
    if isinstance(earlier, dict):       # the software that wrote them is recorded, not part of the identity
        earlier = {key: value for key, value in earlier.items() if key != "environment"}
    other_writer = earlier not in (None, identity)
    differing = (", ".join(name for name, _, _ in plan_differences(earlier, identity)) if isinstance(earlier, dict)
                 else "its record") if other_writer else ""
    if resume and other_writer:
        raise CovnetError(output_dir, f"was written by another model or with other inference settings "
                                      f"({differing}); --continue would mix the two: use a new output folder, "
                                      "or run without --continue to redo every case")
    if not resume:
        redone = cases if other_writer else mine
        earlier_outputs = [path for case in redone
                           for path in (case.outputs_of_every_type if other_writer else case.outputs) if path.is_file()]
        if other_writer and earlier_outputs:
            log.warning(f"{output_dir}: was written by another model or with other inference settings ({differing}); "
                        f"its {len(earlier_outputs)} earlier label map(s) and SEG(s) are removed, so that the folder "
                        "holds one model's results")
        for path in earlier_outputs + [path for case in redone for path in
                                       (case.report_file, case.probabilities_file, case.preview_file)]:
            path.unlink(missing_ok=True)
    stamp.parent.mkdir(exist_ok=True)
    write_json(stamp, {**identity, "environment": environment_record(openvino=model.settings.runtime == OPENVINO)})


def _read(case: CohortCase, model: Model) -> _ReadCase:
    """The reader thread's work: read, check and preprocess the case and, when it writes a SEG, check that its
    series lies on the grid (so that a SEG that cannot be written fails the case before the network runs)."""
    seg_sources = None
    with CONSOLE_LOCK:   # the reader thread redirects the console while it reads
        image = read_input(case.source, name=case.case)
        if case.writes_seg:
            from covnet.export.dicom_seg import series_on_grid  # highdicom only where a SEG is written

            seg_sources = series_on_grid(case.source, image.geometry)
    return _ReadCase(model.prepare(image), seg_sources)


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


def _write_outputs(model: Model, case: CohortCase, read: _ReadCase, result: Segmentation,
                   settings: CohortSettings) -> None:
    # An earlier run's final files go first: a kill below must not leave them beside this run's report row. Only
    # the types this run writes: another output type's files (same model, checked by claim_output_folder) are kept.
    for final in case.outputs:
        final.unlink(missing_ok=True)
    labels = model.label_names
    if settings.save_probabilities:
        _save_probabilities(case.probabilities_file, result.probabilities, labels)
    if settings.preview:
        write_preview(read.prepared.image.array, result.labels, result.geometry, case.preview_file, labels,
                      title=case.case)
    write_json(case.report_file, result.report)
    if case.writes_seg:
        model.write_dicom_seg(result, case.seg_file, source=read.seg_sources)
    if case.writes_label_map:
        write_image(result.labels, result.geometry, case.output)   # last: its presence means the case is complete


def _describe(row: dict) -> str:
    if "infection_percent_lungs" not in row:
        return "written"
    lungs = row["left_lung_ml"] + row["right_lung_ml"]
    percent = row["infection_percent_lungs"]
    return f"lungs {lungs:.0f} mL, infection {row['infection_ml']:.1f} mL" + \
        ("" if percent is None else f" ({percent:.1f}% of the lungs)")


def predict_cohort(model: Model, cases: Sequence[CohortCase], output_dir: str | os.PathLike,
                   settings: CohortSettings = CohortSettings()) -> CohortSummary:
    """Segment this part's share of ``cases`` with ``model`` into ``output_dir`` and rebuild the report over all
    ``cases``."""
    output_dir = Path(output_dir)
    mine = shard(cases, settings.num_parts, settings.part_id)
    prepare_output_folder(output_dir)
    claim_output_folder(model, cases, mine, output_dir, resume=settings.resume)
    summary = CohortSummary()
    todo = []
    for case in mine:
        (summary.skipped if settings.resume and is_complete(case, settings) else todo).append(case)
    if summary.skipped:
        log.info(f"{len(summary.skipped)} case(s) already complete, skipped (--continue)")
    progress = tqdm(total=len(todo), desc="predict", unit="case", leave=False, disable=None)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covnet-predict-reader")
    try:
        upcoming: Future | None = reader.submit(_read, todo[0], model) if todo else None
        for index, case in enumerate(todo):
            current = upcoming
            upcoming = reader.submit(_read, todo[index + 1], model) if index + 1 < len(todo) else None
            started = time.monotonic()
            try:
                read = current.result()
            except LabelMapInput as skipped:
                summary.label_maps.append(case.case)
                with CONSOLE_LOCK:
                    log.warning(str(skipped))
                    progress.update()
                continue
            except (CovnetError, OSError, ValueError) as error:
                summary.failed[case.case] = _failure_line(error, case)
                with CONSOLE_LOCK:
                    log.error(summary.failed[case.case])
                    progress.update()
                continue
            result = model.segment(read.prepared, probabilities=settings.save_probabilities)
            _write_outputs(model, case, read, result, settings)
            row = result.report
            del read, result
            summary.written.append(case.case)
            with CONSOLE_LOCK:
                progress.update()
                log.info(f"[{index + 1}/{len(todo)}] {case.case}: {_describe(row)} -> {case.final_file.name} "
                         f"({time.monotonic() - started:.1f} s)")
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        progress.close()
    summary.report_files = rebuild_report(cases, output_dir, exclude=set(summary.failed))
    remove_empty_reports_folder(output_dir)
    return summary


def rebuild_report(cases: Sequence[CohortCase], output_dir: Path, exclude: set[str] = frozenset()
                   ) -> tuple[Path, ...]:
    """``report.csv`` and ``report.json`` from the row of every complete case (final file and row), in case order.

    Cases in ``exclude`` (those that failed in this run) are left out even if an older run wrote them. Without any
    complete case there is no report: the files are removed (an earlier run's would name outputs that are gone)
    and none is returned, so a run whose every case failed leaves no empty report behind."""
    rows = []
    for case in sorted(cases, key=lambda item: item.case):
        if case.case in exclude or not case.final_file.is_file() or not case.report_file.is_file():
            continue
        row = read_json(case.report_file, "")
        if isinstance(row, dict) and row.get("case") == case.case:
            rows.append(row)
    if not rows:
        for name in (REPORT_CSV, REPORT_JSON):
            (output_dir / name).unlink(missing_ok=True)
        return ()
    return write_report(rows, output_dir)
