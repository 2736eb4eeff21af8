"""What a self-training is told: the recipe (teacher, pseudo-labels, case selection, student, noise, rounds) and
the student's training settings, declared once; ``covnet_selftrain``'s flags are derived from them.

The defaults are the published recipe (README, "covnet_selftrain") except where the compute-matched benchmark
in BENCHMARKS.md ("Self-training, compute-matched") measured a better choice: no strong noise, threshold labels,
cases chosen by confidence, one round, a fine-tuned student. covnet's first recipe is one set of flags away::

    --teacher best --pseudo-labels threshold --selection confidence --cases-per-round 2 --student finetune
    --no-refresh --max-rounds 8

The student's training settings are the teacher fold's own (its recorded ``settings.json``: epochs, iterations,
learning rate, ...), changed by the ``covnet_train`` flags given to ``covnet_selftrain`` (``training_overrides``)
and, for a fine-tuned student, shortened to ``FINETUNE_EPOCH_SHARE`` of the epochs at a tenth of the
learning rate unless those flags say otherwise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from covnet.runtime.errors import CovnetError
from covnet.runtime.settings import check_limits, setting, settings_from_json
from covnet.selftrain.labels import POLICIES, PseudoLabelPolicy
from covnet.training.settings import TrainingSettings

TEACHER_MODES = ("ensemble", "best", "all")
SELECTIONS = ("agreement", "confidence", "random")
STUDENTS = ("retrain", "finetune")
HOLDOUTS = ("fold", "none")
FINETUNE_EPOCH_SHARE = 0.25
FINETUNE_LR_FACTOR = 0.1
# A --continue may change these; any other setting would mix two experiments in one folder.
CHANGEABLE_ON_CONTINUE = ("max_rounds", "keep_best", "keep_candidates")
CHANGEABLE_TRAINING_ON_CONTINUE = TrainingSettings.MACHINE_SETTINGS


@dataclass(frozen=True)
class SelfTrainingSettings:
    teacher: str = setting("ensemble", "who pseudo-labels round 1: ensemble (every trained fold), best (the fold "
                                       "with the best validation), a fold number, or all (fold_all)")
    teacher_mirroring: bool = setting(True, "test-time mirroring when the teacher (and each later student) "
                                            "pseudo-labels the pool")
    # Threshold: measured above argmax (BENCHMARKS.md, "Self-training, compute-matched").
    pseudo_labels: str = setting("threshold", "threshold (voxels below --min-confidence ignored), argmax (every "
                                              "voxel labelled) or class_balanced (per class only the most confident "
                                              "portion, the rest ignored)")
    min_confidence: float = setting(0.9, "threshold: voxels whose largest class probability is below this are "
                                         "ignored (above 1: every voxel)", minimum=0, maximum=1.01)
    class_portion: float = setting(0.2, "class_balanced: share of each class's voxels kept in round 1", above=0,
                                   maximum=1)
    class_portion_step: float = setting(0.05, "class_balanced: growth of that share per round", minimum=0)
    class_portion_max: float = setting(0.5, "class_balanced: largest share", above=0, maximum=1)
    # Confidence: measured above agreement under shift, and not below it under scarcity (BENCHMARKS.md,
    # "Self-training, compute-matched").
    selection: str = setting("confidence", "which pool cases become training cases: confidence (highest mean "
                                           "confidence), agreement (the teacher's members agree most on "
                                           "infection) or random")
    select_fraction: float = setting(0.5, "share of the pool taken in round 1; round r takes r times as much, up "
                                          "to all of it", above=0, maximum=1)
    cases_per_round: int | None = setting(None, "take this many more cases each round instead of "
                                                "--select-fraction", minimum=1)
    # Fine-tune: at the same compute a retrained student was below a fine-tuned one under shift and tied with it
    # under scarcity (BENCHMARKS.md, "Retrained vs fine-tuned students"); it also costs a quarter of the epochs.
    student: str = setting("finetune", "finetune (start from the latest model, a quarter of the epochs at a tenth "
                                       "of the learning rate) or retrain (a new network on the teacher's full "
                                       "schedule)")
    expert_share: float = setting(0.5, "share of each batch drawn from the expert cases (at least one patch)",
                                  above=0, maximum=1)
    # Off by default: measured, it cost infection Dice with pseudo-labels and with true ones alike
    # (BENCHMARKS.md, "Self-training, compute-matched").
    strong_noise: bool = setting(False, "strong augmentation (intensity, blur, cutout) on pseudo-labelled patches")
    refresh: bool = setting(True, "each round the newest model re-labels the whole pool; off: pseudo-labels are "
                                  "kept and only unused cases are labelled")
    # One: a second round re-labels the pool with a student no better than its teacher; measured, it cost
    # infection Dice at the same compute (BENCHMARKS.md, "Self-training, compute-matched").
    max_rounds: int = setting(1, "at most this many rounds", minimum=1)
    stable_change: float = setting(0.01, "stop early when the pool's pseudo-labels change less than this share of "
                                         "their foreground between rounds", minimum=0)
    holdout: str = setting("fold", "fold (hold out the teacher fold's validation cases and validate every "
                                    "student on them) or none (train on every expert case; no validation)")
    # On by default where the students are validated: measured, keeping the best of 2 rounds beat keeping the last
    # under shift and with every disease stage, and tied under scarcity (BENCHMARKS.md, "Keep the best student").
    keep_best: bool | None = setting(None, "final/ keeps the student with the best validation; --no-keep-best: "
                                           "the last", default_text="on when the students are validated, else "
                                                                    "the last")
    keep_candidates: bool = setting(False, "keep every round's pool predictions (round_NN/candidates/)")
    training_overrides: dict = setting(default_factory=dict, cli=False)   # covnet_train flags given

    def __post_init__(self):
        check_limits(self)
        choices = {"selection": SELECTIONS, "student": STUDENTS, "holdout": HOLDOUTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CovnetError(None, f"--{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if not (self.teacher in TEACHER_MODES or self.teacher.isdigit()):
            raise CovnetError(None, f"--teacher {self.teacher!r}: choose ensemble, best, all or a fold number")
        if self.pseudo_labels not in POLICIES:
            raise CovnetError(None, f"--pseudo-labels {self.pseudo_labels!r}: choose one of {', '.join(POLICIES)}")
        if self.pseudo_labels == "class_balanced" and self.class_portion > self.class_portion_max:
            raise CovnetError(None, f"--class-portion {self.class_portion:g} is above --class-portion-max "
                                    f"{self.class_portion_max:g}")
        unknown = sorted(set(self.training_overrides) - {item.name for item in dataclasses.fields(TrainingSettings)})
        if unknown:
            raise CovnetError(None, f"unknown training settings {', '.join(unknown)}")

    def keeps_best(self, *, validated: bool) -> bool:
        """Whether final/ is the best-validated student: as told, else whenever the students are validated."""
        return validated if self.keep_best is None else self.keep_best

    @property
    def label_policy(self) -> PseudoLabelPolicy:
        return PseudoLabelPolicy(self.pseudo_labels, self.min_confidence, self.class_portion,
                                 self.class_portion_step, self.class_portion_max)

    def student_training(self, teacher_training: TrainingSettings, *, round_index: int,
                         pretrained: str | None) -> TrainingSettings:
        """The round's student settings: the teacher's, shortened for fine-tuning, then the flags given."""
        settings = dataclasses.replace(teacher_training, pretrained=None, compile=False)
        if self.student == "finetune":
            settings = dataclasses.replace(settings, pretrained=pretrained,
                                           epochs=max(1, round(settings.epochs * FINETUNE_EPOCH_SHARE)),
                                           initial_lr=settings.initial_lr * FINETUNE_LR_FACTOR)
        settings = dataclasses.replace(settings, **self.training_overrides)
        # Each round draws other patches and, for a retrained student, another initialisation.
        return dataclasses.replace(settings, seed=settings.seed + 1000 * round_index,
                                   checkpoint_every=min(settings.checkpoint_every, settings.epochs))

    def changed_from(self, stored: "SelfTrainingSettings") -> list[str]:
        """The settings that differ from a recorded run's, beyond what a --continue may change."""
        changed = [item.name for item in dataclasses.fields(self) if item.name not in CHANGEABLE_ON_CONTINUE
                   and item.name != "training_overrides" and getattr(self, item.name) != getattr(stored, item.name)]
        mine, theirs = self.training_overrides, stored.training_overrides
        changed += [name for name in sorted(set(mine) | set(theirs)) if name not in CHANGEABLE_TRAINING_ON_CONTINUE
                    and mine.get(name) != theirs.get(name)]
        return changed

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SelfTrainingSettings":
        return settings_from_json(cls, data)
