"""A tiny, trainable workspace for the training, prediction and fault tests: small phantoms, planned and
preprocessed, then given a tiny network and patch so that an iteration takes milliseconds on a CPU."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from covnet.network.topology import Topology
from covnet.phantoms import make_phantom_dataset
from covnet.planning.planner import plan_dataset
from covnet.planning.plans import Plan
from covnet.preprocessing.run import preprocess_dataset
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


def copy_workspace(source: Path, destination: Path) -> Workspace:
    shutil.copytree(source, destination, symlinks=True)
    return Workspace(destination)


TRAIN_FLAGS = ("--epochs", "3", "--iters-per-epoch", "2", "--val-iters", "1", "--num-workers", "0",
               "--checkpoint-every", "1", "--no-val-mirroring")
