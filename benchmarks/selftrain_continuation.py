"""Given the same extra training, do pseudo-labelled pool cases beat more iterations on the expert cases alone?

    python benchmarks/selftrain_continuation.py --root R --regime shift --seeds 0 1 2 3 4 5 --base 3000 \\
        --extra 1500 --patch 24 32 32 --output benchmarks/results/selftrain/continuation

The compute-matched question a user faces once a model exists (``selftrain_experiment.py`` asks it with
saturated, from-scratch students, which this CPU cannot afford). Per seed, on ``selftrain_experiment.py``'s data
and plan (with the given network and patch):

* ``base``: one model on the 4 expert cases for ``--base`` iterations (``selftrain_headroom.py``'s ``experts``
  model; the teacher of every arm);
* ``control``: the base fine-tuned on the expert cases alone for ``--extra`` iterations;
* ``self-trained``: ``covnet_selftrain`` with a fine-tuned student, 1 round (``RECIPE``): the base with test-time
  mirroring labels the whole pool (argmax), the student trains ``--extra`` iterations, half of each batch from
  the expert cases, strong noise on pseudo-labelled patches;
* ``-strong noise`` (the reference for the elements below, as strong noise is off by default) and
  ``threshold labels`` (voxels below 0.9 confidence ignored): one element changed;
* without strong noise, one element each: ``threshold -strong noise``, ``class-balanced labels``, the half of
  the pool chosen by ``agreement``/``confidence``/at ``random``, an ``unmirrored teacher``, an ``ensemble
  teacher`` (the base and 2 more models trained like it from other initialisations, as a cross-validation's
  folds would be; the student still fine-tunes the base), and ``2 rounds`` of half the iterations each (the
  first student re-labels the whole pool);
* ``oracle`` and ``oracle -strong noise``: the first two arms with the pool's true labels;
* ``retrained student`` (``--student retrain``: re-initialised, trained ``--extra`` iterations at the base's
  learning rate; the base's own schedule, and so compute-matched with the control, when ``--extra`` equals
  ``--base``), and with ``+strong noise`` (Noisy Student's pairing);
* ``default recipe``: every element at ``covnet_selftrain``'s default at once (the ensemble teacher with
  mirroring, threshold labels, the confident half of the pool, a fine-tuned student, no strong noise, 1 round),
  and that recipe minus one element at a time: ``default -ensemble teacher`` (the mirrored base alone labels),
  ``default -threshold`` (argmax labels), ``default -confidence half`` (the whole pool), ``default -mirroring``
  (the ensemble labels without test-time mirroring), ``default -fine-tuned student`` (a retrained student, which
  needs ``--extra`` equal to ``--base`` to be compute-matched), or with the element it
  leaves out: ``default +strong noise``, ``default 2 rounds`` (half the iterations each, the first student
  re-labelling the whole pool);
* ``seed recipe``: covnet's first recipe (the base alone, threshold labels, 4 more of the most confident cases
  each round, labels kept, 4 rounds of a quarter of ``--extra`` each).

The control and every student share the fine-tuned student's settings (``SelfTrainingSettings.student_training``:
learning rate a tenth of the base's, the same seed), so they differ only in what the extra iterations see. Every
model is scored on the same held-out cases without mirroring; the table has the paired difference to the control
over (seed, case) pairs with a bootstrap 95% interval and a Wilcoxon p. One process per model, ``--workers`` at a
time, single-threaded, resumable.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selftrain_experiment import (SUPERVISED, Schedule, data_workspace, experiment_plan, oracle_folder,  # noqa: E402
                                  regime_root, score_on_held_out, slug, with_network)
from selftrain_analysis import arm_table, diagnostics_table, plot, round_diagnostics  # noqa: E402
from selftrain_headroom import model_folder, network_name, train_and_score, train_on  # noqa: E402

# Every element spelled out: an arm must mean the same whatever covnet_selftrain's defaults become. Beyond
# these, every arm takes the whole pool, argmax labels from the mirrored base, one round (RECIPE).
DEFAULT_RECIPE = {"teacher_mirroring": True, "pseudo_labels": "threshold", "min_confidence": 0.9,
                  "selection": "confidence", "select_fraction": 0.5, "student": "finetune", "strong_noise": False,
                  "max_rounds": 1}
ARMS = {
    "control": None,
    "self-trained": {"strong_noise": True},
    "-strong noise": {"strong_noise": False},
    "threshold labels": {"pseudo_labels": "threshold", "min_confidence": 0.9, "strong_noise": True},
    "oracle": {"strong_noise": True},
    "oracle -strong noise": {"strong_noise": False},
    "threshold -strong noise": {"pseudo_labels": "threshold", "min_confidence": 0.9, "strong_noise": False},
    "class-balanced labels": {"pseudo_labels": "class_balanced", "strong_noise": False},
    "agreement half": {"selection": "agreement", "select_fraction": 0.5, "strong_noise": False},
    "confidence half": {"selection": "confidence", "select_fraction": 0.5, "strong_noise": False},
    "random half": {"selection": "random", "select_fraction": 0.5, "strong_noise": False},
    "unmirrored teacher": {"teacher_mirroring": False, "strong_noise": False},
    # Two rounds of half the iterations each (compute-matched): the round-1 student re-labels the whole pool.
    "2 rounds": {"max_rounds": 2, "stable_change": 0.0, "refresh": True, "strong_noise": False},
    "ensemble teacher": {"strong_noise": False},
    # A re-initialised student on the base's full schedule and learning rate: compute-matched with a control
    # of as many extra iterations only when --extra equals --base.
    "retrained student": {"student": "retrain", "strong_noise": False},
    "retrained +strong noise": {"student": "retrain", "strong_noise": True},
    # Every element at covnet_selftrain's default at once (its teacher: TEACHER_MODELS).
    "default recipe": DEFAULT_RECIPE,
    # The default recipe minus one element (leave-one-out): a single mirrored teacher, argmax labels, the whole pool.
    "default -ensemble teacher": DEFAULT_RECIPE,
    "default -threshold": {**DEFAULT_RECIPE, "pseudo_labels": "argmax"},
    "default -confidence half": {**DEFAULT_RECIPE, "select_fraction": 1.0},
    "default -mirroring": {**DEFAULT_RECIPE, "teacher_mirroring": False},
    # A re-initialised student: compute-matched with the control only when --extra equals --base.
    "default -fine-tuned student": {**DEFAULT_RECIPE, "student": "retrain"},
    # ... and plus one of the elements it leaves out: strong noise, a second round (half the iterations each).
    "default +strong noise": {**DEFAULT_RECIPE, "strong_noise": True},
    "default 2 rounds": {**DEFAULT_RECIPE, "max_rounds": 2, "stable_change": 0.0, "refresh": True},
    # covnet's first recipe: the base alone labels, 4 more of the most confident cases a round (threshold labels,
    # kept, not refreshed) for 4 rounds of a quarter of the iterations each, so the whole pool by the last.
    "seed recipe": {"pseudo_labels": "threshold", "min_confidence": 0.9, "selection": "confidence",
                    "cases_per_round": 4, "student": "finetune", "strong_noise": False, "refresh": False,
                    "max_rounds": 4, "stable_change": 0.0},
}
# Arms whose teacher averages this many base models (the base and others trained like it from other
# initialisations, as the folds of a cross-validation would be); the student still fine-tunes the base.
TEACHER_MODELS = {"ensemble teacher": 3, "default recipe": 3, "default -threshold": 3, "default -confidence half": 3,
                  "default -mirroring": 3, "default -fine-tuned student": 3, "default +strong noise": 3,
                  "default 2 rounds": 3}
RECIPE = {"teacher": "all", "teacher_mirroring": True, "pseudo_labels": "argmax", "student": "finetune",
          "holdout": "none", "max_rounds": 1, "select_fraction": 1.0, "keep_best": False}


def arm_folder(root: Path, regime: str, seed: int, network: str, budgets: tuple[int, int], arm: str) -> Path:
    """Where an arm trained with (base, extra) iterations lives; the base's is ``selftrain_headroom``'s."""
    if arm == "base":
        return model_folder(root, regime, seed, network, "experts", budgets[0])
    return (regime_root(root, regime) / f"seed_{seed}" / "continuation" / f"{network}_{budgets[0]}+{budgets[1]}" /
            slug(arm))


def arm_workspace(folder: Path, data, plan):
    """An arm's workspace: the data's raw/ and preprocessed cases, and a plans.json with the experiment's network."""
    from covnet.workspace import Workspace
    workspace = Workspace(folder)
    workspace.preprocessed.mkdir(parents=True, exist_ok=True)
    links = [(workspace.raw, data.raw)] + [(workspace.preprocessed / name, data.preprocessed / name)
                                           for name in ("cases", "unlabelled", "dataset_fingerprint.json")]
    for link, target in links:
        if not link.is_symlink():
            link.symlink_to(target)
    if not workspace.plans_json.is_file():
        plan.save(workspace.plans_json)
    return workspace


def teacher_of(base_checkpoint: Path, experts: list[str], others: list[Path]):
    """The base as the teacher, averaged with the ``others`` models when given."""
    from covnet.checkpoint import Checkpoint
    from covnet.selftrain.teacher import Teacher
    from covnet.training.settings import TrainingSettings
    training = TrainingSettings.from_json(Checkpoint.load(base_checkpoint).settings)
    return Teacher(mode="ensemble" if others else "all", fold="all", members=[base_checkpoint, *others],
                   pretrained=base_checkpoint, train_cases=experts, holdout_cases=[], training=training,
                   folds=["all"] + [f"all (initialisation {init})" for init in range(1, len(others) + 1)])


def recipe(arm: str, seed: int, extra: int):
    """The arm's settings; its ``extra`` iterations split evenly over its rounds."""
    from covnet.selftrain.settings import SelfTrainingSettings
    elements = {**RECIPE, **(ARMS[arm] or {})}
    epochs = extra // Schedule().iterations_per_epoch // elements["max_rounds"]
    overrides = {"device": "cpu", "num_workers": 0, "seed": seed, "validation_mirroring": False,
                 "validation_iterations": 0, "epochs": epochs}
    return SelfTrainingSettings(**elements, training_overrides=overrides)


def run_arm(root: Path, regime: str, seed: int, arm: str, base: int, extra: int, features, patch) -> tuple[str, float]:
    import torch

    from covnet.selftrain.run import run_selftraining
    torch.set_num_threads(1)
    started = time.monotonic()
    network = network_name(features, patch)
    folder = arm_folder(root, regime, seed, network, (base, extra), arm)
    # A scored arm is done: left as it is, whatever covnet_selftrain's defaults have become since it ran.
    if held_out_summary(folder).is_file():
        return f"seed {seed} {arm}", 0.0
    plan = with_network(experiment_plan(root, regime, Schedule()), features, patch)
    data = data_workspace(root, regime, seed)
    workspace = arm_workspace(folder, data, plan)
    base_checkpoint = arm_folder(root, regime, seed, network, (base, extra), "base") / "checkpoint_final.pth"
    experts = sorted(path.stem for path in data.preprocessed_cases.glob("*.json"))
    others = []
    for init in range(1, TEACHER_MODELS.get(arm, 1)):
        train_and_score(root, regime, seed, "experts", base, features, patch, init=init)
        others.append(model_folder(root, regime, seed, network, "experts", base, init=init) / "checkpoint_final.pth")
    teacher = teacher_of(base_checkpoint, experts, others)
    settings = recipe(arm, seed, extra)
    if arm == "control":
        student = settings.student_training(teacher.training, round_index=1, pretrained=str(base_checkpoint))
        train_on(plan, workspace, workspace.fold("all"), {case: data.preprocessed_cases for case in experts}, student)
        final = workspace.fold("all").checkpoint("final")
    else:
        run_selftraining(workspace, settings, resume=True, teacher=teacher,
                         oracle_folder=oracle_folder(root, regime, seed) if arm.startswith("oracle") else None)
        final = workspace.selftrain_final.checkpoint("final")
    score_on_held_out(data, [final], held_out_summary(folder).parent)
    return f"seed {seed} {arm}", time.monotonic() - started


def held_out_summary(folder: Path) -> Path:
    """Where an arm's held-out scores are (``score_on_held_out``'s summary)."""
    return folder / "test" / "summary.json"


def scores_of(root: Path, regime: str, seed: int, network: str, budgets: tuple[int, int], arm: str) -> dict:
    summary = held_out_summary(arm_folder(root, regime, seed, network, budgets, arm))
    return {(seed, row["case"]): row for row in json.loads(summary.read_text())["per_case"]} if summary.is_file() \
        else {}


def per_case_scores(root: Path, regime: str, seeds: list[int], network: str, budgets: tuple[int, int],
                    arms: list[str]) -> dict[str, dict]:
    """arm -> (seed, case) -> the case's held-out scores, for the base, the control and ``arms``."""
    names = ["base", "control", *(arm for arm in arms if arm != "control")]
    return {arm: {key: row for seed in seeds for key, row in scores_of(root, regime, seed, network, budgets,
                                                                      arm).items()} for arm in names}


# What each element is worth: (arm, the arm it differs from in one element).
ELEMENT_EFFECTS = (("-strong noise", "self-trained"), ("threshold labels", "self-trained"),
                   ("oracle", "self-trained"), ("oracle -strong noise", "-strong noise"),
                   ("oracle -strong noise", "oracle"), ("threshold -strong noise", "-strong noise"),
                   ("class-balanced labels", "-strong noise"), ("agreement half", "-strong noise"),
                   ("confidence half", "-strong noise"), ("random half", "-strong noise"),
                   ("confidence half", "agreement half"), ("random half", "agreement half"),
                   ("threshold -strong noise", "class-balanced labels"), ("unmirrored teacher", "-strong noise"),
                   ("ensemble teacher", "-strong noise"), ("ensemble teacher", "unmirrored teacher"),
                   ("2 rounds", "-strong noise"), ("retrained student", "-strong noise"),
                   ("retrained +strong noise", "retrained student"), ("default recipe", "-strong noise"),
                   ("default recipe", "ensemble teacher"), ("default recipe", "threshold -strong noise"),
                   ("default recipe", "confidence half"), ("default recipe", "default -ensemble teacher"),
                   ("default recipe", "default -threshold"), ("default recipe", "default -confidence half"),
                   ("default recipe", "default -mirroring"), ("default -fine-tuned student", "retrained student"),
                   ("default +strong noise", "default recipe"), ("default 2 rounds", "default recipe"),
                   ("default recipe", "seed recipe"))


def element_table(scores: dict) -> tuple[str, dict]:
    """Paired infection Dice differences between arms that differ in one element."""
    from covnet.evaluation.paired import paired_difference
    lines = ["| arm | minus arm | infection Dice difference (95% CI, Wilcoxon p) |", "| --- | --- | --- |"]
    results = {}
    for arm, other in ELEMENT_EFFECTS:
        if not scores.get(arm) or not scores.get(other):
            continue
        pairs = sorted(set(scores[arm]) & set(scores[other]))
        difference = paired_difference([scores[arm][k]["infection"]["dice"] for k in pairs],
                                       [scores[other][k]["infection"]["dice"] for k in pairs])
        lines.append(f"| {arm} | {other} | {difference.describe()} |")
        results[f"{arm} - {other}"] = dataclasses.asdict(difference)
    return "\n".join(lines), results


def per_seed_means(scores: dict) -> dict[str, dict[int, float]]:
    """arm -> seed -> mean infection Dice over the seed's held-out cases."""
    means = {}
    for arm, rows in scores.items():
        for (seed, _case), row in rows.items():
            means.setdefault(arm, {}).setdefault(seed, []).append(row["infection"]["dice"])
    return {arm: {seed: sum(v) / len(v) for seed, v in sorted(seeds.items())} for arm, seeds in means.items()}


def add_model_arguments(parser: argparse.ArgumentParser, *, regime: str) -> None:
    """Where the models are and which: the data root, regime, seeds, budgets, network and patch."""
    parser.add_argument("--root", type=Path, required=True, help="a selftrain_experiment.py folder (its data)")
    parser.add_argument("--regime", default=regime)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--base", type=int, default=3000, help="the base model's iterations")
    parser.add_argument("--extra", type=int, default=1500, help="iterations of the control and of every student")
    parser.add_argument("--features", type=int, nargs="+", default=list(Schedule().features))
    parser.add_argument("--patch", type=int, nargs=3, default=list(Schedule().patch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, regime="shift")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, help="write the table (.md) and every number (.json) here")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tables of the models scored so far")
    parser.add_argument("--rebuilt-seeds", type=int, nargs="+", default=[],
                        help="seeds whose rebuilt base is not the one the earlier report reports: their rows come "
                             "from disk alone, and the report, of the arms with every seed, goes beside the earlier "
                             "one (…_rebuilt-seed3), which stays")
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    features, patch = tuple(args.features), tuple(args.patch)
    if not args.report_only:
        train_every_arm(args, features, patch)
    report(args, features, patch)


def train_every_arm(args, features, patch) -> None:
    experiment_plan(args.root, args.regime, Schedule())      # made once, before the seeds' jobs read it
    extra_teachers = max(TEACHER_MODELS.get(arm, 1) for arm in args.arms) - 1
    with ProcessPoolExecutor(args.workers) as pool:
        def base_of(seed, init=0):
            return pool.submit(train_and_score, args.root, args.regime, seed, "experts", args.base, features, patch,
                               init=init)
        # Seeds finish in order (a stopped run leaves whole seeds): a seed's arms queue before the base
        # ``--workers`` seeds later.
        bases = {seed: base_of(seed) for seed in args.seeds[:args.workers]}
        arms = []
        for index, seed in enumerate(args.seeds):
            name, seconds = bases[seed].result()
            print(f"{time.strftime('%H:%M:%S')} seed {seed} base ({name}): {seconds:.0f} s", flush=True)
            # The ensemble's other models before the seed's arms: two arms sharing them must not train them at once.
            for future in [base_of(seed, init) for init in range(1, extra_teachers + 1)]:
                future.result()
            arms += [pool.submit(run_arm, args.root, args.regime, seed, arm, args.base, args.extra, features, patch)
                     for arm in args.arms]
            if index + args.workers < len(args.seeds):
                bases[args.seeds[index + args.workers]] = base_of(args.seeds[index + args.workers])
        for future in arms:
            name, seconds = future.result()
            print(f"{time.strftime('%H:%M:%S')} {name}: {seconds:.0f} s", flush=True)


def report(args, features, patch) -> None:
    """Tables, numbers and figure of every arm scored at these budgets, not only ``--arms``: a run of some arms
    rewrites the regime's files, which must keep the others, those on disk and those of the earlier report."""
    network = network_name(features, patch)
    stem = args.output / f"continuation_{args.regime}_{network}_{args.base}+{args.extra}" if args.output else None
    earlier = stem.with_suffix(".json") if stem is not None else None
    if stem is not None and args.rebuilt_seeds:
        stem = stem.with_name(f"{stem.name}_rebuilt-seed{'-'.join(map(str, args.rebuilt_seeds))}")
    scores = per_case_scores(args.root, args.regime, args.seeds, network, (args.base, args.extra), list(ARMS))
    diagnostics = []
    if stem is not None:        # the pool's labels are read only for a report that keeps them
        _, diagnostics = round_diagnostics(args.root, args.regime, [arm for arm in scores if scores[arm]],
                                           lambda seed, arm: arm_folder(args.root, args.regime, seed, network,
                                                                        (args.base, args.extra), arm)
                                           / "results" / "selftrain")
        if earlier.is_file():
            scores, diagnostics = with_earlier_report(earlier, scores, diagnostics,
                                                      rebuilt_seeds=set(args.rebuilt_seeds))
    scores = {arm: rows for arm, rows in scores.items() if rows or arm in SUPERVISED}
    if args.rebuilt_seeds:      # an arm without a rebuilt seed's rows would pair over fewer seeds than the others
        scores = {arm: rows for arm, rows in scores.items() if {seed for seed, _ in rows} >= set(args.seeds)}
    text, results = arm_table(scores, list(scores))
    effects, effect_numbers = element_table(scores)
    text = f"{text}\n\nOne element at a time (paired over (seed, case)):\n\n{effects}"
    print(text)
    if stem is None:
        return
    args.output.mkdir(parents=True, exist_ok=True)
    seeds = sorted({seed for rows in scores.values() for seed, _case in rows})
    stem.with_suffix(".json").write_text(json.dumps(
        {"seeds": seeds, "arms": results, "elements": effect_numbers, "per_seed_infection_dice": per_seed_means(scores),
         "per_case": {arm: {f"{s}/{c}": row for (s, c), row in rows.items()} for arm, rows in scores.items()},
         "diagnostics": diagnostics}, indent=1))
    stem.with_suffix(".md").write_text(
        f"{text}\n\nPseudo-labels against the pool's truth:\n\n{diagnostics_table(diagnostics)}\n")
    plot(scores, list(scores), stem.with_suffix(".png"),
         f"{args.regime}: {args.extra} more iterations after {args.base}, {len(seeds)} seeds")


# How far a rebuilt model's held-out scores may stray from the reported ones (any structure's Dice or NSD) and
# still count as the same model. Training is deterministic on one thread, but not always bit for bit: of the
# 6 shift bases rebuilt on 2026-11-28, 5 matched exactly and one differed on 2 of its 24 cases, by at most 0.0013;
# of the 6 scarcity bases rebuilt on 2026-11-29, seed 3's came out another model (every case moved, up to 0.155).
REPRODUCTION_TOLERANCE = 0.005


def score_gap(row: dict, other: dict) -> float:
    """The largest difference between two held-out rows of a case, over every structure's Dice and NSD."""
    gaps = [abs(row[structure][metric] - other[structure][metric]) for structure in row if structure != "case"
            for metric in row[structure] if row[structure][metric] is not None and other[structure][metric] is not None]
    return max(gaps, default=0.0)


def with_earlier_report(path: Path, scores: dict, diagnostics: list[dict], *,
                        rebuilt_seeds: set[int] = frozenset()) -> tuple[dict, list[dict]]:
    """``scores`` and the round ``diagnostics`` completed from an earlier report (``path``), whose models may be
    gone: the report's rows stand, and the disk adds what it lacks. Refused where a (seed, case) on disk scores
    further than ``REPRODUCTION_TOLERANCE`` from the report: the models on disk then are not the ones it reports.
    The report's rows of ``rebuilt_seeds`` are dropped: those seeds' models are all taken from disk."""
    earlier = json.loads(path.read_text())
    merged, changed, largest = {}, 0, 0.0
    for arm, rows in scores.items():
        reported = {}
        for key, row in earlier["per_case"].get(arm, {}).items():
            seed, case = key.split("/", 1)
            if int(seed) not in rebuilt_seeds:
                reported[int(seed), case] = row
        for seed, case in sorted(set(rows) & set(reported)):
            gap = score_gap(rows[seed, case], reported[seed, case])
            if gap > REPRODUCTION_TOLERANCE:
                raise SystemExit(f"{path}: {arm}, seed {seed}, {case} scores {gap:.4f} away on disk; these models are "
                                 "not the ones it reports: write this run's report to another --output, or retrain "
                                 "the seed's compared arms and name it in --rebuilt-seeds")
            changed, largest = changed + (gap > 0), max(largest, gap)
        merged[arm] = dict(sorted({**rows, **reported}.items()))
    print(f"{path.name}: {changed} (arm, seed, case) rows on disk differ from the report's, by at most {largest:.4f}; "
          "the report's are kept")

    # An arm's diagnostics from whichever has more seeds, the report's on a tie, like its rows.
    def seeds_in(rows: list[dict]) -> int:
        return max((row["seeds"] for row in rows), default=0)
    kept = []
    for arm in merged:
        mine = [row for row in diagnostics if row["arm"] == arm]
        theirs = [row for row in earlier.get("diagnostics", []) if row["arm"] == arm]
        kept += mine if seeds_in(mine) > seeds_in(theirs) else theirs
    return merged, kept


if __name__ == "__main__":
    main()
