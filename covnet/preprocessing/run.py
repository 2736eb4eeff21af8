"""Preprocess every labelled case and the unlabelled pool under a plan (multiprocess, resumable)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from covnet.dataset import DatasetDescription, find_cases, image_path, label_path
from covnet.image.ct import not_hu_reason
from covnet.image.io import read_image
from covnet.planning.plans import Plan
from covnet.preprocessing.case import preprocess_case
from covnet.preprocessing.storage import is_case_done, save_case
from covnet.runtime.atomic import source_stamp
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.runtime.parallel import map_cases
from covnet.workspace import Workspace

log = logger(__name__)


@dataclass(frozen=True)
class CaseJob:
    case: str
    image_file: Path
    label_file: Path | None
    output_folder: Path
    seed: int

    @property
    def source(self) -> list:
        return source_stamp(self.image_file, self.label_file)


def run_case_job(job: CaseJob, plan: Plan) -> str | None:
    """Preprocess one case; return None, or why an unlabelled case was refused (it is then not written)."""
    try:
        source = job.source   # stamped before reading: a file edited meanwhile leaves the case stale
        image, geometry = read_image(job.image_file)
        refusal = _intensity_problem(image, plan)
        if refusal and job.label_file is not None:
            raise CovnetError(job.image_file, refusal)
        if refusal:
            return f"{job.image_file}: {refusal}; left out of the unlabelled pool"
        segmentation = read_image(job.label_file)[0] if job.label_file is not None else None
        array, seg, properties = preprocess_case(job.case, [image], geometry, plan, segmentation, seed=job.seed)
        save_case(job.output_folder, array, seg, properties, plan.preprocessing_key(), source)
    except CovnetError:
        raise
    except Exception as error:  # name the case whatever went wrong inside it
        raise CovnetError(job.image_file, f"preprocessing failed: {type(error).__name__}: {error}") from error
    return None


def _intensity_problem(image, plan: Plan) -> str | None:
    # CT normalization clips to the foreground's HU percentiles: a 0-255 image would become a constant.
    if plan.channel_names.get("0", "").strip().upper() == "CT":
        return not_hu_reason(image)
    return None


def _single_threaded_worker() -> None:
    # Worker processes already use every core between them; one thread each avoids oversubscription.
    import torch
    torch.set_num_threads(1)


def collect_jobs(workspace: Workspace, description: DatasetDescription) -> list[CaseJob]:
    ending = description.file_ending
    labelled_out = workspace.preprocessed_cases
    unlabelled_out = workspace.preprocessed_pool
    jobs = [CaseJob(case, image_path(workspace.images_tr, case, ending), label_path(workspace.labels_tr, case, ending),
                    labelled_out, index) for index, case in enumerate(find_cases(workspace.images_tr, ending))]
    jobs += [CaseJob(case, image_path(workspace.images_unlabelled, case, ending), None, unlabelled_out, index)
             for index, case in enumerate(find_cases(workspace.images_unlabelled, ending))]
    return jobs


def preprocess_dataset(workspace: Workspace, plan: Plan, num_processes: int = 1,
                       overwrite: bool = False) -> dict[str, int]:
    """Returns counts ``{"done": n, "skipped": m, "refused": r}``. Cases finished under the same plan are
    skipped; unlabelled CTs that are not in HU are refused with a warning naming each."""
    description = DatasetDescription.load(workspace.dataset_json)
    key = plan.preprocessing_key()
    jobs = collect_jobs(workspace, description)
    todo = [job for job in jobs if overwrite or not is_case_done(job.output_folder, job.case, key, job.source,
                                                                 labelled=job.label_file is not None)]
    workers = max(1, min(num_processes, os.cpu_count() or 1))
    refusals = [refusal for refusal in map_cases(partial(run_case_job, plan=plan), todo, workers, "preprocess",
                                                 initializer=_single_threaded_worker) if refusal]
    for refusal in refusals:
        log.warning(refusal)
    return {"done": len(todo) - len(refusals), "skipped": len(jobs) - len(todo), "refused": len(refusals)}
