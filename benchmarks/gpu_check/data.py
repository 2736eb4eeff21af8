"""Phantom workspaces and the phantom model, made through covnet's own commands (one process each).

``run`` is whatever runs a command line to completion and raises when it fails: the check's guarded runner,
or ``run_checked`` (tests, background workers).
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from benchmarks.gpu_check.scale import PhantomSet
from covnet.runtime.cpus import usable_cpu_count

Run = Callable[[Sequence[str]], object]


def covnet_command(name: str, *args) -> list[str]:
    """``covnet_<name> args`` as ``python -m covnet.cli.<name>``: the GPU machine has covnet on its path, not
    installed, so it has no console scripts."""
    return [sys.executable, "-m", f"covnet.cli.{name}", *map(str, args)]


def run_checked(argv: Sequence[str]) -> None:
    completed = subprocess.run(list(map(str, argv)), capture_output=True, text=True, encoding="utf-8")
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv[:4]))} ... exited {completed.returncode}:\n"
                           f"{completed.stdout[-2000:]}{completed.stderr[-3000:]}")


def shrink_network(plans_json: Path) -> None:
    """Hand-edit plans.json (as README's "Hand-edited plans.json" allows) to a 3-stage network of 4-8-16
    features on a 16×32×32 patch: a training step in a fraction of a second on a CPU, for dry runs."""
    from covnet.network.topology import Topology
    from covnet.planning.plans import Plan

    plan = Plan.load(plans_json)
    network = Topology(in_channels=plan.in_channels, num_classes=plan.num_classes, features_per_stage=(4, 8, 16),
                       kernel_sizes=((3, 3, 3),) * 3, strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
                       n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1), deep_supervision=True)
    dataclasses.replace(plan, patch_size=[16, 32, 32], batch_size=2, network=network).save(plans_json)


def prepare_workspace(root: Path, phantoms: PhantomSet, run: Run, processes: int) -> None:
    """Phantoms into ``root``/raw, then the default CUDA plan (8 GB) and the preprocessed cases (and, for
    ``tiny_network``, the tiny network in the plan)."""
    run(covnet_command("make_phantoms", "--workspace", root, "--size", phantoms.size, "--num-labelled",
                       phantoms.labelled, "--num-unlabelled", 0, "--num-test", phantoms.test, "--seed", phantoms.seed,
                       "--overwrite"))
    run(covnet_command("plan_and_preprocess", "--workspace", root, "--device", "cuda", "-np", processes))
    if phantoms.tiny_network:       # the network is no part of the preprocessing: the cases stay current
        shrink_network(root / "preprocessed" / "plans.json")


def plan_with_budget(source: Path, root: Path, gpu_memory_gb: float, run: Run) -> Path:
    """plans.json for ``gpu_memory_gb`` of the phantoms in ``source``, in a workspace of its own whose raw/ is
    ``source``'s (a link) and which reuses ``source``'s fingerprint; returns the plans.json."""
    (root / "preprocessed").mkdir(parents=True, exist_ok=True)
    if not (root / "raw").exists():
        (root / "raw").symlink_to((source / "raw").resolve())
    shutil.copy2(source / "preprocessed" / "dataset_fingerprint.json", root / "preprocessed")
    run(covnet_command("plan_and_preprocess", "--workspace", root, "--device", "cuda", "--gpu-memory-gb",
                       gpu_memory_gb, "--plan-only"))
    return root / "preprocessed" / "plans.json"


def sibling_workspace(source: Path, root: Path) -> Path:
    """A workspace sharing ``source``'s raw and preprocessed data (links), with results of its own: a second
    training of the same fold."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("raw", "preprocessed"):
        if not (root / folder).exists():
            (root / folder).symlink_to((source / folder).resolve())
    return root


def train_command(root: Path, device: str, flags: Sequence[str], *, compile_network: bool = False) -> list[str]:
    """covnet_train on every case (fold ``all``: no validation split, no whole-case validation at the end)."""
    return covnet_command("train", "all", "--workspace", root, "--device", device, *flags,
                          *(["--compile"] if compile_network else []))


def final_checkpoint(root: Path) -> Path:
    return root / "results" / "fold_all" / "checkpoint_final.pth"


def make_phantom_model(root: Path, phantoms: PhantomSet, training_flags: Sequence[str], device: str, run: Run,
                       processes: int | None = None) -> Path:
    """A phantom workspace with fold ``all`` trained on ``device``; returns its final checkpoint."""
    prepare_workspace(root, phantoms, run, processes or usable_cpu_count())
    run(train_command(root, device, training_flags))
    return final_checkpoint(root)
