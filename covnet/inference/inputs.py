"""What ``covnet_predict`` takes as input: the cases under ``-i`` and their names, and the refusal of what is not
a CT it can segment, before any time is spent on it.

* **Cases** (:func:`find_cohort`): every NIfTI/MHA/NRRD file and DICOM series folder under the input, at any depth
  (the importer's discovery, ``find_ct_sources``), or one file of a DICOM series (that series, to pick one of a
  folder holding several); nothing inside the output folder, so ``-o`` may lie inside ``-i``. Case ids are
  ``propose_case_ids`` with a trailing ``_0000`` (nnU-Net's channel suffix) removed; two inputs for one case id
  are an error naming both.
* **Label maps** are skipped with a warning, never segmented and never given a CT's case id: covnet's own
  outputs (their folder holds their report row) at discovery, and integer images with a handful of values
  (``covnet.image.ct.label_map_reason``) at discovery where they would share a CT's case id, else when read.
* **Not a CT** (:func:`check_input`): an image not in HU (preprocessing's rule, ``not_hu_reason``), a
  degenerate volume, an implausible spacing or a grid too large on the model's spacing fails its case with one
  line; ``-o`` naming a file is refused first (:func:`check_output_folder`).
* **Outputs** (``--output-type``, :data:`OUTPUT_TYPES`): each case's label map in its input's format (``nifti``),
  a DICOM-SEG of its series (``dicom-seg``, only for DICOM input), or both (a label map for every case, a SEG
  where there is a series); by default the input's own kind.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covnet.dataset import CHANNEL_SUFFIX
from covnet.image.ct import grid_problem, is_ct_channel, label_map_reason, not_hu_reason
from covnet.image.discovery import find_ct_sources, group_by_base_id, propose_case_ids, sanitize_case_id
from covnet.image.io import (
    IMAGE_SUFFIXES,
    Geometry,
    is_dicom_file,
    is_image_file,
    read_image,
    strip_image_suffix,
)
from covnet.image.orientation import canonical_reorientation
from covnet.planning.plans import Plan
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger

log = logger(__name__)

REPORTS_FOLDER = ".reports"
RUN_FILE = ".run.json"     # in REPORTS_FOLDER: the model and settings that wrote the folder
DICOM_OUTPUT_SUFFIX = ".nii.gz"
SEG_SUFFIX = ".seg.dcm"
# nifti: the label map in the input's format (a DICOM series: .nii.gz); dicom-seg: a DICOM-SEG of the series.
NIFTI, DICOM_SEG, BOTH = "nifti", "dicom-seg", "both"
OUTPUT_TYPES = (NIFTI, DICOM_SEG, BOTH)
# The output format of each input format: header + data pairs become their one-file variants.
OUTPUT_SUFFIXES = {".nii.gz": ".nii.gz", ".nii": ".nii", ".mha": ".mha", ".mhd": ".mha", ".nrrd": ".nrrd",
                   ".nhdr": ".nrrd"}


@dataclass(frozen=True)
class CohortCase:
    case: str
    source: Path                    # an image file or a DICOM series folder (or one file of the series)
    output: Path                    # the label map, written unless the output type is dicom-seg
    output_type: str = NIFTI

    @property
    def writes_label_map(self) -> bool:
        return self.output_type != DICOM_SEG

    @property
    def writes_seg(self) -> bool:
        return self.output_type != NIFTI

    @property
    def seg_file(self) -> Path:
        return self.output.with_name(f"{self.case}{SEG_SUFFIX}")

    @property
    def final_file(self) -> Path:
        """The output written last: its presence means the case is complete."""
        return self.output if self.writes_label_map else self.seg_file

    @property
    def outputs(self) -> list[Path]:
        return [path for path, wanted in ((self.seg_file, self.writes_seg), (self.output, self.writes_label_map))
                if wanted]

    @property
    def outputs_of_every_type(self) -> list[Path]:
        """The SEG and the label map, whichever this run writes: what a run of another output type may have left."""
        return [self.seg_file, self.output]

    @property
    def probabilities_file(self) -> Path:
        return self.output.with_name(f"{self.case}.npz")

    @property
    def preview_file(self) -> Path:
        return self.output.with_name(f"{self.case}.png")

    @property
    def report_file(self) -> Path:
        return self.output.parent / REPORTS_FOLDER / f"{self.case}.json"


def is_dicom_source(source: Path) -> bool:
    return source.is_dir() or is_dicom_file(source)


def output_suffix(source: Path) -> str:
    if is_dicom_source(source):
        return DICOM_OUTPUT_SUFFIX
    name = source.name.lower()
    return next(OUTPUT_SUFFIXES[suffix] for suffix in IMAGE_SUFFIXES if name.endswith(suffix))


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


class LabelMapInput(CovnetError):
    """An input that is a label map, not a CT: skipped with a warning, not a failure."""


def _has_report_row(folder: Path, case: str) -> bool:
    return (folder / REPORTS_FOLDER / f"{case}.json").is_file()


def written_by_covnet_reason(source: Path) -> str | None:
    """Why ``source`` is an output of an earlier ``covnet_predict`` (its folder holds the case's report row,
    ``.reports/<name>.json``): a label map, or a folder whose DICOM files are all such DICOM-SEGs (which DICOM
    discovery would take for a series); None otherwise. Cheap: no image is read."""
    if source.is_file() and _has_report_row(source.parent, strip_image_suffix(source.name)):
        return f"is a label map covnet_predict wrote (its row is {REPORTS_FOLDER}/), not a CT"
    if source.is_dir():
        dicom_files = [path for path in source.iterdir() if is_dicom_file(path)]
        if dicom_files and all(path.name.endswith(SEG_SUFFIX) and
                               _has_report_row(source, path.name[: -len(SEG_SUFFIX)]) for path in dicom_files):
            return f"holds only DICOM-SEGs covnet_predict wrote (their rows are in {REPORTS_FOLDER}/), not a CT"
    return None


def label_map_file_reason(source: Path) -> str | None:
    """Why the input ``source`` is a label map rather than a CT, or None: written by covnet_predict, else an
    integer image with a handful of non-negative values (``covnet.image.ct.label_map_reason``)."""
    reason = written_by_covnet_reason(source)
    if reason or not source.is_file():      # a DICOM series is a CT (a segmentation would be a DICOM-SEG object)
        return reason
    try:
        return label_map_reason(read_image(source)[0])
    except CovnetError:
        return None                         # unreadable: its own one-line error when the case is read


def _without_label_maps(sources: list[Path], source_dir: Path) -> list[Path]:
    """``sources`` less the label maps covnet wrote and, where two sources would share a case name (``case.nii.gz``
    next to ``case_0000.nii.gz``), less those that are label maps by their values: a label map then neither takes
    the case's name nor is segmented. Each one dropped is a warning; the others are checked as they are read."""
    clashing = {source for group in group_by_base_id(sources, source_dir, strip_suffix=CHANNEL_SUFFIX).values()
                if len(group) > 1 for source in group}
    kept = []
    for source in sources:
        reason = label_map_file_reason(source) if source in clashing else written_by_covnet_reason(source)
        if reason:
            log.warning(f"{source}: {reason}; skipped")
        else:
            kept.append(source)
    return kept


def find_cohort(input_path: str | os.PathLike, output_dir: str | os.PathLike, output_type: str | None = None
                ) -> list[CohortCase]:
    """The cases under ``input_path`` (a folder, one image file, or one file of a DICOM series), sorted by case id.

    Label maps are left out (see ``_without_label_maps``), and so is everything inside ``output_dir`` when it lies
    inside ``input_path``: the outputs of this and earlier runs are never inputs. Two inputs that would give one
    case name are an error naming both (``propose_case_ids``). ``output_type`` (one of :data:`OUTPUT_TYPES`; None:
    each input's own kind) says what each case writes (:func:`with_output_types`)."""
    if output_type is not None and output_type not in OUTPUT_TYPES:
        raise CovnetError(None, f"--output-type {output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
    return with_output_types(_find_cases(Path(input_path), Path(output_dir)), output_type)


def with_output_types(cases: list[CohortCase], output_type: str | None) -> list[CohortCase]:
    """``cases`` with what each writes. None: its own kind (a SEG for a DICOM series, a label map for a file).
    ``both``: a label map for every case and a SEG for each DICOM series; the image files among series get their
    label map alone, with one warning. A SEG asked of image files only (``both``, ``dicom-seg``), or ``dicom-seg``
    of a folder that also holds image files, is an error naming the first file."""
    files = [case for case in cases if not is_dicom_source(case.source)]
    if files and output_type in (DICOM_SEG, BOTH) and (output_type == DICOM_SEG or len(files) == len(cases)):
        advice = BOTH if len(files) < len(cases) else NIFTI
        raise CovnetError(files[0].source, f"is not a DICOM series: --output-type {output_type} writes a DICOM-SEG, "
                                           f"which needs the series it segments; use --output-type {advice}")
    if files and output_type == BOTH:
        names = ", ".join(case.case for case in files[:5]) + (", ..." if len(files) > 5 else "")
        log.warning(f"--output-type {BOTH}: {len(files)} of the {len(cases)} cases are image files, not DICOM series "
                    f"({names}): they get their label map without a DICOM-SEG")

    return [dataclasses.replace(case, output_type=(output_type or DICOM_SEG) if is_dicom_source(case.source) else NIFTI)
            for case in cases]


def _find_cases(input_path: Path, output_dir: Path) -> list[CohortCase]:
    if not input_path.exists():
        raise CovnetError(input_path, "not found")
    if input_path.is_file():
        if is_dicom_file(input_path):     # one series of a folder that holds several
            case = sanitize_case_id(f"{input_path.parent.resolve().name}_{Path(input_path.name).stem}")
            return [CohortCase(case, input_path, output_dir / f"{case}{DICOM_OUTPUT_SUFFIX}")]
        if not is_image_file(input_path):
            raise CovnetError(input_path, f"is not a CT image file ({', '.join(IMAGE_SUFFIXES)}) or DICOM file")
        sources, source_dir = [input_path], input_path.parent
    else:
        if output_dir.exists() and input_path.resolve() == output_dir.resolve():
            raise CovnetError(output_dir, "is the input folder; write the label maps to another folder")
        source_dir = input_path
        sources = [source for source in find_ct_sources(input_path) if not _inside(source, output_dir)]
    if not sources:
        raise CovnetError(input_path, "holds no CT images (NIfTI/MHA/NRRD files or DICOM series folders)")
    sources = _without_label_maps(sources, source_dir)
    if not sources:
        raise CovnetError(input_path, "holds only label maps, no CT images")
    proposed = propose_case_ids(sources, source_dir, strip_suffix=CHANNEL_SUFFIX)
    return sorted((CohortCase(case, source, output_dir / f"{case}{output_suffix(source)}")
                   for source, case in proposed.items()), key=lambda item: item.case)


def check_output_folder(output_dir: Path) -> None:
    """``-o`` must be a folder or a path where one can be made: checked before any work is done."""
    for path in (output_dir, *output_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise CovnetError(output_dir, "is a file; -o must name a folder for the label maps and report"
                                  if path == output_dir else f"cannot be made: {path} is a file, not a folder")
            return


def check_input(source: str | os.PathLike, image: np.ndarray, geometry: Geometry, plan: Plan) -> None:
    """Refuse what is not a CT before any time is spent on it: a label map (``LabelMapInput``: skipped with a
    warning), an image not in HU, a degenerate grid or one whose spacing is implausible (``CovnetError``: the case
    fails). ``source`` names the input in the error. The HU check is preprocessing's, ``not_hu_reason``."""
    reason = label_map_reason(image)
    if reason:
        raise LabelMapInput(source, f"{reason}; skipped")
    reason = not_hu_reason(image) if is_ct_channel(plan.channel_names.get("0", "")) else None
    if reason:
        raise CovnetError(source, f"{reason}; not segmented")
    reorientation = canonical_reorientation(geometry.direction)
    reason = grid_problem(reorientation.shape(geometry.shape), reorientation.spacing(geometry.spacing),
                          plan.target_spacing)
    if reason:
        raise CovnetError(source, f"{reason}; not segmented")
