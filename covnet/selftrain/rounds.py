"""The self-training loop. Round r: the round's teacher (the chosen teacher in round 1, then the newest student)
labels the pool (all of it with ``refresh``, else the unused part), the most reliable cases become pseudo-labelled
training cases, and a student is trained on the expert cases plus those: a new network on the teacher's schedule
(``retrain``) or the latest model fine-tuned (``finetune``). It stops after ``max_rounds``, when the pool is used
up (without refresh), or when the pseudo-labels stop changing. Everything goes to ``results/selftrain/``.

Resumable per step: a round with ``selection.json`` keeps its selection, pool predictions already made are kept
(``candidates/``, one per case), and a student resumes from its ``checkpoint_latest.pth``. Each round seeds the
global random generators from (seed, round), so a student retrained after a kill sees the same draws.

Scale. Under torchrun every rank labels its share of the pool (case i goes to rank i mod N), rank 0 selects, and
the student trains with DistributedDataParallel like ``covnet_train``. Across machines, ``run_pseudo_label_part``
(``--num-parts P --part-id I``) labels one part of the current round's pool and stops; the ordinary
``--continue`` is the merge.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covnet.checkpoint import Checkpoint
from covnet.dataset import INFECTION
from covnet.inference.predictor import InferenceSettings, Predictor
from covnet.planning.plans import Plan
from covnet.preprocessing.run import require_current_cases
from covnet.runtime.atomic import atomic_path, read_json, write_json
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.runtime.sharding import shard
from covnet.selftrain.candidates import PoolLabeller, predict_candidates
from covnet.selftrain.report import RoundReport, plot_rounds, validation_table
from covnet.selftrain.selection import choose_cases, store_pseudo_case, target_count
from covnet.selftrain.settings import SelfTrainingSettings
from covnet.selftrain.teacher import Teacher, ranking_score
from covnet.training.distributed import DistributedContext
from covnet.training.run import run_training
from covnet.training.settings import TrainingJob
from covnet.training.validation import validate_fold
from covnet.workspace import ModelFolder, Workspace

log = logger(__name__)
COMMAND = "covnet_selftrain"
CANDIDATES, PSEUDO_LABELS, SELECTION = "candidates", "pseudo_labels", "selection.json"


@dataclass
class SelfTrainingRun:
    """One self-training: where it writes, who teaches, what it trains, on which device and processes."""
    workspace: Workspace
    settings: SelfTrainingSettings
    teacher: Teacher
    plan: Plan                                   # the workspace's plan with an ignore label
    device: torch.device
    context: DistributedContext
    oracle_folder: Path | None = None            # the pool's true labels instead of a teacher (experiments)

    # ------------------------------------------------------------------------------------------ places
    def round_dir(self, round_index: int) -> Path:
        return self.workspace.selftrain_round(round_index).path

    def candidates(self, round_index: int) -> Path:
        return self.round_dir(round_index) / CANDIDATES

    def student(self, round_index: int) -> ModelFolder:
        return self.workspace.selftrain_round(round_index)

    @property
    def seed(self) -> int:
        """The run's seed (random selection, foreground locations): the --seed given, else the teacher's."""
        return int(self.settings.training_overrides.get("seed", self.teacher.training.seed))

    def relative(self, path: Path) -> str:
        path = Path(path)
        return str(path.relative_to(self.workspace.root)) if path.is_relative_to(self.workspace.root) else str(path)

    def selection(self, round_index: int) -> dict | None:
        path = self.round_dir(round_index) / SELECTION
        return read_json(path, "") if path.is_file() else None

    # ------------------------------------------------------------------------------------------ labelling
    def round_models(self, round_index: int) -> list[Path]:
        """Who labels round ``round_index``: the teacher's models, then the previous round's student."""
        if round_index == 1:
            return list(self.teacher.members)
        previous = self.student(round_index - 1).checkpoint("final")
        if not previous.is_file():
            raise CovnetError(previous, f"not found: round {round_index - 1}'s student is not trained yet; run "
                                        "covnet_selftrain --continue first")
        return [previous]

    def labeller(self, round_index: int) -> PoolLabeller:
        scoring = [self.plan.labels[INFECTION]] if INFECTION in self.plan.labels else \
            list(self.plan.foreground_labels.values())
        foreground = list(self.plan.foreground_labels.values())
        if self.oracle_folder is not None:
            return PoolLabeller(self.plan, {"oracle": self.relative(self.oracle_folder)}, scoring, foreground,
                                oracle_folder=self.oracle_folder)
        models, mirroring = self.round_models(round_index), self.settings.teacher_mirroring
        key = {"models": [self.relative(model) for model in models], "mirroring": mirroring}
        predictor = Predictor.from_files(models, self.device, InferenceSettings(use_mirroring=mirroring))
        second = Predictor.from_files(models, self.device, InferenceSettings(use_mirroring=False)) \
            if len(models) == 1 and mirroring else None
        return PoolLabeller(self.plan, key, scoring, foreground, predictor=predictor, second_opinion=second)

    def to_label(self, round_index: int, pool: list[str]) -> list[str]:
        """The pool cases round ``round_index`` labels: all of them with refresh, else those not yet taken."""
        if self.settings.refresh or round_index == 1:
            return list(pool)
        taken = self.selection(round_index - 1)["training_cases"]
        return [case for case in pool if case not in taken]

    def label_pool(self, round_index: int, cases: list[str], labeller: PoolLabeller | None = None) -> dict:
        labeller = labeller or self.labeller(round_index)
        previous = self.candidates(round_index - 1) if round_index > 1 else None
        mine = shard(cases, self.context.world_size, self.context.rank, key=lambda case: case)
        predict_candidates(self.workspace, labeller, mine, self.candidates(round_index), previous)
        self.context.barrier()
        return predict_candidates(self.workspace, labeller, cases, self.candidates(round_index), previous)

    # ------------------------------------------------------------------------------------------ selection
    def select(self, round_index: int, records: dict[str, dict], pool_size: int) -> dict:
        """Choose the round's cases, store them as pseudo-labelled cases, write ``selection.json`` (last)."""
        settings, round_dir = self.settings, self.round_dir(round_index)
        earlier = {} if round_index == 1 or settings.refresh else \
            dict(self.selection(round_index - 1)["training_cases"])
        chosen = choose_cases(records, settings, round_index=round_index, pool_size=pool_size, kept=list(earlier),
                              seed=self.seed)
        folder = round_dir / PSEUDO_LABELS
        shutil.rmtree(folder, ignore_errors=True)       # what an interrupted selection left: redone
        provenance = {"round": round_index, "teacher": records[chosen[0]]["key"] if chosen else None,
                      "policy": settings.pseudo_labels}
        ignored = {case: store_pseudo_case(self.workspace.preprocessed_pool, self.candidates(round_index), folder,
                                           case, self.plan, settings.label_policy, round_index=round_index,
                                           seed=self.seed, provenance=provenance) for case in chosen}
        changes = [record["change"] for record in records.values() if record.get("change") is not None]
        selection = {"round": round_index, "teacher": provenance["teacher"], "pool_size": pool_size,
                     "labelled": len(records), "cases_added": chosen,
                     "training_cases": {**earlier, **{case: self.relative(folder) for case in chosen}},
                     "scores": {case: {name: record.get(name) for name in ("agreement", "confidence", "change")}
                                for case, record in records.items()},
                     "ignored_share": {case: {str(k): v for k, v in shares.items()} for case, shares in ignored.items()},
                     "label_change": float(np.mean(changes)) if changes else None}
        write_json(round_dir / SELECTION, selection)
        if round_index > 1 and not settings.keep_candidates:
            shutil.rmtree(self.candidates(round_index - 1), ignore_errors=True)
        return selection

    # ------------------------------------------------------------------------------------------ students
    def student_job(self, round_index: int, selection: dict) -> TrainingJob:
        pseudo = {case: self.workspace.root / folder for case, folder in selection["training_cases"].items()}
        experts = list(self.teacher.train_cases)
        leaked = sorted(set(pseudo) & set(self.teacher.holdout_cases) | set(experts) & set(self.teacher.holdout_cases))
        if leaked:
            raise CovnetError(None, f"held-out case(s) {', '.join(leaked)} would be trained on")
        folders = {case: self.workspace.preprocessed_cases for case in experts + list(self.teacher.holdout_cases)}
        folders.update(pseudo)
        return TrainingJob(name=f"selftrain_round_{round_index:02d}", plan=self.plan, workspace=self.workspace,
                           folder=self.student(round_index), train_cases=experts + sorted(pseudo),
                           validation_cases=list(self.teacher.holdout_cases), case_folders=folders,
                           pseudo_cases=sorted(pseudo), expert_share=self.settings.expert_share,
                           strong_noise=self.settings.strong_noise)

    def train_student(self, round_index: int, selection: dict) -> dict | None:
        previous = self.teacher.pretrained if round_index == 1 else self.student(round_index - 1).checkpoint("final")
        training = self.settings.student_training(self.teacher.training, round_index=round_index,
                                                  pretrained=str(previous))
        job = self.student_job(round_index, selection)
        log.info(f"round {round_index}: {self.settings.student} student on {len(self.teacher.train_cases)} expert + "
                 f"{len(job.pseudo_cases)} pseudo-labelled cases, {training.epochs} x "
                 f"{training.iterations_per_epoch} iterations, lr {training.initial_lr:g}"
                 + (f", from {self.relative(previous)}" if training.pretrained else ", new weights"))
        run_training(job, training, resume=True, validate_only=False, context=self.context, device=self.device)
        return job.folder.validation_summary()

    # ------------------------------------------------------------------------------------------ the loop
    def teacher_validation(self) -> dict | None:
        """The teacher's validation on the held-out cases with the students' inference settings."""
        if not self.teacher.holdout_cases:
            return None
        folder = self.workspace.selftrain / "teacher_validation"
        summary = read_json(folder / "summary.json", "") if (folder / "summary.json").is_file() else \
            validate_fold(self.workspace, Checkpoint.load(self.teacher.pretrained), self.teacher.holdout_cases,
                          folder, self.device, self.validation_inference(), resume=True)
        return None if summary is None else summary["mean"]

    def validation_inference(self) -> InferenceSettings:
        training = self.settings.student_training(self.teacher.training, round_index=1, pretrained=None)
        return InferenceSettings(step_size=training.validation_step_size, use_mirroring=training.validation_mirroring)

    def run(self) -> dict | None:
        pool = checked_pool(self.workspace, self.teacher)
        log.info(f"teacher: {self.teacher.describe()}; held-out cases: "
                 f"{', '.join(self.teacher.holdout_cases) or 'none (--holdout none)'}")
        report = RoundReport(teacher=self.teacher.summary(self.relative), plan=self.plan)
        if self.context.is_main:
            report.teacher["validation"] = self.teacher_validation()
        for round_index in range(1, self.settings.max_rounds + 1):
            selection = self.selection(round_index)
            if selection is None:
                cases = self.to_label(round_index, pool)
                if not cases:
                    report.stop("the pool is used up")
                    break
                records = self.label_pool(round_index, cases)
                change = mean_change(records)
                grows = target_count(self.settings, round_index, len(pool)) > \
                    target_count(self.settings, round_index - 1, len(pool))
                if self.settings.refresh and not grows and change is not None and change < self.settings.stable_change:
                    report.stop(f"the pseudo-labels changed by {change:.4f} < {self.settings.stable_change:g} and "
                                "no cases would be added")
                    break
                selection = self.select(round_index, records, len(pool)) if self.context.is_main else None
                self.context.barrier()
                selection = selection or self.selection(round_index)
            validation = self.train_student(round_index, selection)
            if self.context.is_main:
                report.add_round(selection, validation, self.student(round_index))
                self.publish(report)
        if not self.context.is_main:
            return None
        if not report.rounds:
            raise CovnetError(self.workspace.selftrain, f"no round was run ({report.stopped or 'nothing to do'})")
        report.final = self.write_final(report)
        summary = self.publish(report)
        if not self.settings.keep_candidates:
            # The last trained round's predictions stay: a later --continue (more rounds, parts then a merge)
            # measures its label change against them. Those of a round that stopped early go.
            last = report.rounds[-1]["round"]
            for round_dir in self.workspace.selftrain.glob("round_*"):
                if round_dir.name != self.round_dir(last).name:
                    shutil.rmtree(round_dir / CANDIDATES, ignore_errors=True)
        if summary["teacher"].get("validation"):
            log.info("validation on the held-out cases (teacher vs each round's student):\n" + validation_table(summary))
        log.info(f"final model: round {report.final['round']} ({report.final['reason']}): "
                 f"{self.workspace.selftrain_final / 'checkpoint_final.pth'}")
        return summary

    def publish(self, report: RoundReport) -> dict:
        summary = report.to_json()
        write_json(self.workspace.selftrain / "summary.json", summary)
        plot_rounds(summary, self.workspace.selftrain / "progress.png")
        return summary

    def write_final(self, report: RoundReport) -> dict:
        """``final/checkpoint_final.pth``: a copy of the best-validated student (``keep_best``), else of the last."""
        validated = bool(self.teacher.holdout_cases)
        chosen, reason = report.rounds[-1], "last" if validated else "last (no validation)"
        if self.settings.keeps_best(validated=validated):
            def score(entry):
                value = ranking_score(entry["validation"] or {}, self.plan)
                return -math.inf if math.isnan(value) else value
            chosen, reason = max(report.rounds, key=score), "best validation"
        source = self.student(chosen["round"]).checkpoint("final")
        final = self.workspace.selftrain_final
        with atomic_path(final.checkpoint("final")) as temporary:
            shutil.copyfile(source, temporary)
        entry = {"round": chosen["round"], "reason": reason, "source": self.relative(source),
                 "validation": chosen["validation"]}
        write_json(final / "model.json", entry)
        return entry


def mean_change(records: dict[str, dict]) -> float | None:
    changes = [record["change"] for record in records.values() if record.get("change") is not None]
    return float(np.mean(changes)) if changes else None


def pool_cases(workspace: Workspace) -> list[str]:
    """The preprocessed pool: cases whose properties (written last) exist."""
    folder = workspace.preprocessed_pool
    return sorted(path.stem for path in folder.glob("*.json")) if folder.is_dir() else []


def checked_pool(workspace: Workspace, teacher: Teacher) -> list[str]:
    """The preprocessed pool, each case made under the current plan and named unlike every expert case."""
    pool = pool_cases(workspace)
    if not pool:
        raise CovnetError(workspace.preprocessed_pool, "holds no preprocessed unlabelled CTs; import a pool "
                                                       "(covnet_import_unlabelled) and run covnet_plan_and_preprocess")
    require_current_cases(workspace.preprocessed_pool, pool, Plan.load(workspace.plans_json))
    clash = sorted(set(pool) & set(teacher.train_cases + teacher.holdout_cases))
    if clash:
        raise CovnetError(None, f"unlabelled case(s) {', '.join(clash[:5])} have the name of labelled cases; "
                                "rename them in raw/imagesUnlabelled and preprocess again")
    return pool
