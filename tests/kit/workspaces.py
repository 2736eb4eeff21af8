"""Tiny workspaces for the training, prediction, self-training and fault tests: small phantoms, planned and
preprocessed, then given a tiny network and patch so that an iteration takes milliseconds on a CPU; trained
and self-trained ones built once per test session; the commands run in-process."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

from covnet.cli import evaluate, make_phantoms, plan_and_preprocess, predict, selftrain, train
from covnet.cli.common import run_command
from covnet.image.io import read_image
from covnet.network.topology import Topology
from covnet.phantoms.generate import make_phantom_dataset
from covnet.planning.planner import plan_dataset
from covnet.planning.plans import Plan
from covnet.preprocessing.run import preprocess_dataset
from covnet.selftrain.teacher import ranking_score
from covnet.workspace import Workspace

TINY_PATCH = (32, 48, 64)


def tiny_topology(plan: Plan) -> Topology:
    return Topology(in_channels=plan.in_channels, num_classes=plan.num_classes, features_per_stage=(4, 8, 16),
                    kernel_sizes=((3, 3, 3),) * 3, strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
                    n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1), deep_supervision=True)


def make_tiny_trainable_workspace(root: Path, num_labelled: int = 10, num_unlabelled: int = 0,
                                  num_test: int = 0, seed: int = 0) -> Workspace:
    workspace = Workspace(root)
    make_phantom_dataset(workspace, num_labelled=num_labelled, num_unlabelled=num_unlabelled, num_test=num_test,
                         seed=seed)
    plan = plan_dataset(workspace)
    plan = dataclasses.replace(plan, patch_size=list(TINY_PATCH), batch_size=2, network=tiny_topology(plan))
    plan.save(workspace.plans_json)
    preprocess_dataset(workspace, plan)
    return workspace


def copy_workspace(source: Workspace | Path, destination: Path) -> Workspace:
    shutil.copytree(source.root if isinstance(source, Workspace) else source, destination, symlinks=True)
    return Workspace(destination)


TRAIN_FLAGS = ("--epochs", "3", "--iters-per-epoch", "2", "--val-iters", "1", "--num-workers", "0",
               "--checkpoint-every", "1", "--no-val-mirroring")


# One iteration of training: enough for a model that predicts, in about a second.
TINY_TRAIN = ("--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1", "--num-workers", "0",
              "--no-val-mirroring")
# The default recipe's ensemble teacher and half the pool, with 2 rounds (the second relabels the whole pool and
# takes all of it), cases chosen by agreement, argmax labels and retrained students (what the tests of this
# fixture check; the default fine-tuned student is tested through the other workspaces), at the teacher folds'
# own one-iteration schedule, without test-time mirroring.
SELFTRAIN_FLAGS = ("--max-rounds", "2", "--selection", "agreement", "--pseudo-labels", "argmax", "--student",
                   "retrain", "--iters-per-epoch", "1", "--val-iters", "1", "--num-workers", "0",
                   "--no-teacher-mirroring", "--no-val-mirroring")


def command(name: str, *args) -> int:
    """Run a covnet command in this process (its ``main`` through ``run_command``); return the exit code."""
    mains = {"covnet_train": train.main, "covnet_predict": predict.main, "covnet_selftrain": selftrain.main,
             "covnet_plan_and_preprocess": plan_and_preprocess.main, "covnet_evaluate": evaluate.main,
             "covnet_make_phantoms": make_phantoms.main}
    return run_command(name, mains[name], [str(arg) for arg in args])


def run_predict(*args) -> int:
    """covnet_predict with torch running the network unless ``--runtime`` is given (OpenVINO's conversion adds
    seconds to every run; tests/test_cpu_runtime.py runs it)."""
    runtime = () if "--runtime" in map(str, args) else ("--runtime", "torch")
    return command("covnet_predict", *args, *runtime)


def run_selftrain(workspace: Workspace, *flags: str) -> int:
    return command("covnet_selftrain", "--workspace", workspace.root, *SELFTRAIN_FLAGS, *flags)


def trained_workspace_once(tmp_path_factory) -> Workspace:
    """Ten labelled and four unlabelled tiny phantoms with folds 0 and 1 trained for one iteration, built once
    per test session and only read afterwards (tests that write copy it first)."""
    root = tmp_path_factory.getbasetemp() / "trained_tiny_ws"
    if not (root / ".ready").is_file():
        shutil.rmtree(root, ignore_errors=True)
        workspace = make_tiny_trainable_workspace(root, num_labelled=10, num_unlabelled=4)
        for fold in ("0", "1"):
            assert command("covnet_train", fold, "--workspace", workspace.root, *TINY_TRAIN) == 0
        (root / ".ready").touch()
    return Workspace(root)


def selftrained_workspace_once(tmp_path_factory) -> Workspace:
    """A copy of the trained workspace self-trained with SELFTRAIN_FLAGS (2 rounds), once per test session: the
    fault tests compare their selections with it."""
    root = tmp_path_factory.getbasetemp() / "selftrained_ws"
    if not (root / ".ready").is_file():
        shutil.rmtree(root, ignore_errors=True)
        workspace = copy_workspace(trained_workspace_once(tmp_path_factory), root)
        assert run_selftrain(workspace) == 0
        (root / ".ready").touch()
    return Workspace(root)


def best_validated_round(workspace: Workspace) -> int:
    """The round whose student validated best (covnet's ranking; the first of equals): final/ by default."""
    rounds = json.loads((workspace.selftrain / "summary.json").read_text())["rounds"]
    plan = Plan.load(workspace.plans_json)
    scores = [ranking_score(entry["validation"], plan) for entry in rounds]
    scores = [-math.inf if math.isnan(score) else score for score in scores]
    return rounds[scores.index(max(scores))]["round"]


def phantom_image(workspace: Workspace, index: int):
    """The raw image and geometry of labelled phantom ``index``."""
    return read_image(workspace.images_tr / f"phantom_{index:03d}_0000.nii.gz")
