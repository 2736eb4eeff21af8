"""Does self-training on unlabelled CTs help when only a few CTs are labelled? Phantoms, several seeds.

    python benchmarks/selftrain_experiment.py --root /tmp/covnet_selftrain_experiment        (~30-40 min, 2 cores)
    python benchmarks/selftrain_experiment.py --root /tmp/st_tiny --tiny                     (a minute or two)

Data: phantom CTs, ``--train`` expert-labelled cases for training (default 4), ``--held-out`` labelled cases
(default 6) used only for measurement, and ``--unlabelled`` pool CTs (default 16). Cross-validation folds need
at least five patients and would put some of the few expert cases into validation, so the experiment uses its
own split instead of ``splits.json``: the first ``--train`` labelled cases train, the others are held out, the
same for every model and seed.

For each seed, three models on the same plan (``covnet_plan_and_preprocess --device cpu``):

* **base**: trained from scratch on the expert cases (``--base-epochs``), in ``results/fold_base``;
* **self-trained**: ``covnet_selftrain`` with base as the teacher: ``--rounds`` rounds, each pseudo-labelling
  the unused pool, adding the ``--cases-per-round`` most confident cases and fine-tuning a student
  (``--epochs-per-round``) on expert + pseudo-labelled cases;
* **control**: the same fine-tuning schedule (same rounds, epochs, learning rate, seeds, plan with an ignore
  label) on the expert cases alone. Self-trained minus control is the effect of the pseudo-labels, not of the
  extra iterations.

Every model is validated whole on the held-out cases (no test-time mirroring, for speed), and a Markdown table
gives Dice (and NSD) of lungs and infection per seed and their mean over seeds. A rerun with the same
``--root`` resumes: finished models are not retrained.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from covnet.network.topology import Topology
from covnet.phantoms.generate import make_phantom_dataset
from covnet.planning.planner import plan_dataset
from covnet.planning.plans import Plan
from covnet.preprocessing.run import preprocess_dataset
from covnet.runtime.devices import resolve_device
from covnet.runtime.log import setup_logging
from covnet.selftrain.pseudo_labels import self_training_plan
from covnet.selftrain.rounds import SelfTrainingSettings, run_selftraining, seed_round
from covnet.selftrain.teacher import Teacher, ranking_score
from covnet.training.distributed import DistributedContext
from covnet.training.run import run_training
from covnet.training.settings import TrainingJob, TrainingSettings
from covnet.workspace import ModelFolder, Workspace

STRUCTURES = ("lungs", "infection")


def tiny_plan(plan: Plan) -> Plan:
    """A very small network and patch (seconds per model): only to prove the script runs end to end."""
    topology = Topology(in_channels=plan.in_channels, num_classes=plan.num_classes, features_per_stage=(4, 8, 16),
                        kernel_sizes=((3, 3, 3),) * 3, strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
                        n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1), deep_supervision=True)
    return dataclasses.replace(plan, patch_size=[32, 48, 64], batch_size=2, network=topology)


def prepare_data(root: Path, args) -> Workspace:
    workspace = Workspace(root / "data")
    if not workspace.plans_json.is_file():
        make_phantom_dataset(workspace, num_labelled=args.train + args.held_out, num_unlabelled=args.unlabelled,
                             num_test=0, seed=args.data_seed)
        plan = plan_dataset(workspace, device="cpu")
        if args.tiny:
            plan = tiny_plan(plan)
            plan.save(workspace.plans_json)
        preprocess_dataset(workspace, plan, num_processes=2)
    return workspace


def seed_workspace(data: Workspace, root: Path, seed: int) -> Workspace:
    """Per seed: raw/ and preprocessed/ shared through symlinks, results/ of its own."""
    workspace = Workspace(root / f"seed_{seed}")
    workspace.root.mkdir(parents=True, exist_ok=True)
    for name in ("raw", "preprocessed"):
        link = workspace.root / name
        if not link.exists():
            link.symlink_to(data.root / name)
    return workspace


def training_settings(name: str, args, seed: int, epochs: int, pretrained: Path | None, lr: float
                      ) -> TrainingSettings:
    return TrainingSettings(epochs=epochs, iterations_per_epoch=args.iters_per_epoch,
                            validation_iterations=args.val_iters, device=args.device, num_workers=args.num_workers,
                            seed=seed, checkpoint_every=max(1, epochs), initial_lr=lr,
                            pretrained=None if pretrained is None else str(pretrained), validation_mirroring=False)


def train(workspace: Workspace, job: TrainingJob, settings: TrainingSettings) -> dict:
    device = resolve_device(settings.device)
    run_training(job, settings, resume=True, validate_only=False, context=DistributedContext(), device=device)
    return job.folder.validation_summary()["mean"]


def run_seed(data: Workspace, root: Path, seed: int, train_cases, held_out, args) -> dict:
    workspace = seed_workspace(data, root, seed)
    plan = Plan.load(workspace.plans_json)
    folders = {case: workspace.preprocessed_cases for case in train_cases + held_out}
    base_folder = workspace.fold("base")
    seed_round(seed, 0)
    base = train(workspace, TrainingJob(name="base", plan=plan, workspace=workspace, folder=base_folder,
                                        train_cases=train_cases, validation_cases=held_out, case_folders=folders),
                 training_settings("base", args, seed, args.base_epochs, None, 1e-2))
    base_checkpoint = base_folder.checkpoint("final")
    teacher = Teacher(mode="base", fold="base", checkpoints=[base_checkpoint], pretrained=base_checkpoint,
                      train_cases=train_cases, validation_cases=held_out, folds=["base"])
    settings = SelfTrainingSettings(teacher="base", cases_per_round=args.cases_per_round,
                                    epochs_per_round=args.epochs_per_round, iterations_per_epoch=args.iters_per_epoch,
                                    validation_iterations=args.val_iters, min_confidence=args.min_confidence,
                                    pseudo_weight=args.pseudo_weight, max_rounds=args.rounds, device=args.device,
                                    num_workers=args.num_workers, seed=seed, tta=False, initial_lr=args.lr,
                                    checkpoint_every=max(1, args.epochs_per_round))
    summary = run_selftraining(workspace, settings, resume=True, teacher=teacher)
    selftrained = summary["rounds"][-1]["validation"]
    control_plan = self_training_plan(plan)
    previous, control = base_checkpoint, None
    for round_index in range(1, len(summary["rounds"]) + 1):     # the same schedule, expert cases only
        name = f"control_round_{round_index:02d}"
        output = ModelFolder(workspace.results / "control" / f"round_{round_index:02d}")
        seed_round(seed, round_index)
        control = train(workspace, TrainingJob(name=name, plan=control_plan, workspace=workspace, folder=output,
                                               train_cases=train_cases, validation_cases=held_out,
                                               case_folders=folders),
                        dataclasses.replace(training_settings(name, args, seed + round_index, args.epochs_per_round,
                                                              previous, args.lr),
                                            checkpoint_every=settings.checkpoint_every))
        previous = output.checkpoint("final")
    return {"base": base, "control": control, "self-trained": selftrained, "plan": plan,
            "pool_used": sum(len(entry["cases_added"]) for entry in summary["rounds"])}


def _cell(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown_table(results: dict[int, dict]) -> str:
    lines = ["| seed | model | lungs Dice | infection Dice | mean Dice | lungs NSD | infection NSD |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    models = ("base", "control", "self-trained")
    totals = {model: [] for model in models}
    for seed, result in results.items():
        for model in models:
            mean = result[model]
            score = ranking_score(mean, result["plan"])
            totals[model].append((mean, score))
            lines.append(f"| {seed} | {model} | " + " | ".join(
                [_cell(mean[s]["dice"]) for s in STRUCTURES] + [_cell(score)] +
                [_cell(mean[s]["nsd"]) for s in STRUCTURES]) + " |")
    for model in models:
        def average(pick):
            values = [v for v in (pick(mean, score) for mean, score in totals[model]) if v is not None]
            return sum(values) / len(values) if values else None
        cells = [average(lambda m, _, s=s: m[s]["dice"]) for s in STRUCTURES] + [average(lambda _, score: score)]
        cells += [average(lambda m, _, s=s: m[s]["nsd"]) for s in STRUCTURES]
        lines.append(f"| mean | **{model}** | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="experiment folder (resumable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=4, help="expert-labelled training cases")
    parser.add_argument("--held-out", type=int, default=6, help="labelled cases held out for measurement")
    parser.add_argument("--unlabelled", type=int, default=16)
    parser.add_argument("--base-epochs", type=int, default=12)
    parser.add_argument("--iters-per-epoch", type=int, default=25)
    parser.add_argument("--val-iters", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs-per-round", type=int, default=3)
    parser.add_argument("--cases-per-round", type=int, default=4)
    parser.add_argument("--min-confidence", type=float, default=SelfTrainingSettings.min_confidence)
    parser.add_argument("--pseudo-weight", type=float, default=SelfTrainingSettings.pseudo_weight)
    parser.add_argument("--lr", type=float, default=SelfTrainingSettings.initial_lr, help="fine-tuning learning rate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny network and a few iterations: proves the script works, measures nothing")
    args = parser.parse_args()
    if args.tiny:
        args.unlabelled, args.held_out, args.base_epochs, args.iters_per_epoch = 4, 2, 1, 2
        args.rounds, args.epochs_per_round, args.cases_per_round, args.val_iters, args.num_workers = 2, 1, 2, 1, 0
    setup_logging(args.root / "experiment_log.txt")
    started = time.monotonic()
    data = prepare_data(args.root, args)
    labelled = sorted(path.stem for path in data.preprocessed_cases.glob("*.json"))
    train_cases, held_out = labelled[:args.train], labelled[args.train:]
    results = {seed: run_seed(data, args.root, seed, train_cases, held_out, args) for seed in args.seeds}
    print(f"\n### Self-training on phantoms: {args.train} expert cases, {len(held_out)} held out, "
          f"{args.unlabelled} unlabelled\n")
    print(f"base {args.base_epochs}x{args.iters_per_epoch} iterations from scratch; then {args.rounds} rounds x "
          f"{args.epochs_per_round}x{args.iters_per_epoch} iterations of fine-tuning (lr {args.lr:g}), "
          f"{args.cases_per_round} pool cases per round, min confidence {args.min_confidence:g}, pseudo weight "
          f"{args.pseudo_weight:g}; control = same fine-tuning on the expert cases only. Held-out validation, "
          f"no TTA. {'TINY SETTINGS: measures nothing. ' if args.tiny else ''}"
          f"{time.monotonic() - started:.0f} s on this machine.\n")
    print(markdown_table(results))


if __name__ == "__main__":
    sys.exit(main())
