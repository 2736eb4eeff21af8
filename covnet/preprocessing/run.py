"""Preprocess every labelled case and the unlabelled pool under a plan (multiprocess, resumable)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from covnet.dataset import DatasetDescription, find_cases, image_path, label_path
from covnet.image.ct import is_ct_channel, not_hu_reason
from covnet.image.io import read_image
from covnet.planning.plans import Plan
from covnet.preprocessing.case import PREPROCESSING_VERSION, preprocess_case
from covnet.preprocessing.storage import is_case_done, properties_file, save_case
from covnet.runtime.atomic import source_stamp
from covnet.runtime.cpus import usable_cpu_count
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
    if is_ct_channel(plan.channel_names.get("0", "")):
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
    workers = max(1, min(num_processes, usable_cpu_count()))
    refusals = [refusal for refusal in map_cases(partial(run_case_job, plan=plan), todo, workers, "preprocess",
                                                 initializer=_single_threaded_worker) if refusal]
    for refusal in refusals:
        log.warning(refusal)
    return {"done": len(todo) - len(refusals), "skipped": len(jobs) - len(todo), "refused": len(refusals)}


def stale_cases(folder: Path, cases: list[str], plan: Plan) -> dict[str, list[str]]:
    """The finished cases of ``folder`` made under another preprocessing key than ``plan``'s (plans.json edited
    or re-planned since) or by an older covnet: case -> what differs. Cases without their JSON are left to the
    caller (they are unfinished, not stale)."""
    key = json.loads(json.dumps(plan.preprocessing_key()))   # as it reads back from a case's JSON
    stale = {}
    for case in cases:
        path = properties_file(folder, case)
        if not path.is_file():
            continue
        try:
            stored = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue    # a damaged case is the storage checks' to name
        if not isinstance(stored, dict):
            continue
        stored_key = stored.get("plan_key") if isinstance(stored.get("plan_key"), dict) else {}
        changed = [entry for entry in key if entry != "version" and stored_key.get(entry) != key[entry]]
        if stored_key.get("version") != key["version"] or stored.get("preprocessing_version") != PREPROCESSING_VERSION:
            changed.append("covnet's preprocessing")
        if changed:
            stale[case] = changed
    return stale


def require_current_cases(folder: Path, cases: list[str], plan: Plan) -> None:
    """A one-line ``CovnetError`` when any case was preprocessed under another plan than ``plan``: training on
    it would feed the network other intensities or another grid than the plan (and its checkpoint) records."""
    stale = stale_cases(folder, cases, plan)
    if stale:
        changed = sorted({entry for entries in stale.values() for entry in entries})
        count = f"{len(stale)} case{' was' if len(stale) == 1 else 's were'}"
        raise CovnetError(folder, f"{count} preprocessed under another plan ({', '.join(changed)} changed, e.g. "
                                  f"{sorted(stale)[0]}); run covnet_plan_and_preprocess to redo them")
