"""covnet's CUDA paths on a GPU (marker ``cuda``; skipped where torch sees no CUDA device).

* an AMP training step (covnet's loop: float16 autocast, GradScaler, clipping) on phantom patches gives finite
  losses and gradients (or, on a float16 overflow, a step GradScaler skips), and really runs in float16;
* ``covnet_train --compile`` trains;
* a trained phantom model labels the test phantoms on the GPU as on the CPU in float32 (≥ 99.5% of the voxels,
  lungs and infection Dice within 0.005);
* DistributedDataParallel over nccl with one process: its gradient average over one rank is exact (a sum over
  one rank divided by 1), so with deterministic kernels two steps end with the very weights of two plain
  steps; where the kernels are not reproducible, within the spread of two plain runs;
* ``torchrun --nproc_per_node 1 covnet_train`` ends like a plain ``covnet_train``. With one process covnet does
  not start DDP (``DistributedContext.enabled`` needs WORLD_SIZE > 1), so both run the same code: the losses
  must agree exactly on a CPU and to cuDNN's run-to-run noise (1e-3 relative) on a GPU.

``COVNET_CUDA_TESTS_DEVICE=cpu`` runs them on the CPU instead (gloo for nccl, no autocast, no compilation): the
dry run of benchmarks/gpu_check does, so that this file cannot rot. ``COVNET_GPU_CHECK_WORKSPACE`` names a
phantom workspace with a trained fold ``all`` and labelled test phantoms (the check trains one); without it the
agreement test trains its own (about a minute on a GPU).
"""
from __future__ import annotations

import itertools
import math
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from kit.workspaces import command, copy_workspace, make_tiny_trainable_workspace
from torch.nn.parallel import DistributedDataParallel

from benchmarks.gpu_check.agreement import device_agreement
from benchmarks.gpu_check.data import final_checkpoint, make_phantom_model, run_checked, train_command
from benchmarks.gpu_check.scale import DRY_RUN, GPU
from benchmarks.gpu_check.workers import training_parts
from covnet.checkpoint import Checkpoint
from covnet.planning.plans import Plan
from covnet.preprocessing.storage import load_case
from covnet.training.loop import train_epoch
from covnet.training.settings import TrainingSettings

pytestmark = pytest.mark.cuda

DEVICE_VARIABLE = "COVNET_CUDA_TESTS_DEVICE"
WORKSPACE_VARIABLE = "COVNET_GPU_CHECK_WORKSPACE"
MIN_VOXEL_AGREEMENT = 0.995
MAX_DICE_DIFFERENCE = 0.005
TORCHRUN_LOSS_TOLERANCE = 1e-3
STEPS = 2
AMP_STEPS = 3


@pytest.fixture(scope="module")
def device() -> torch.device:
    if os.environ.get(DEVICE_VARIABLE) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory, device):
    return make_tiny_trainable_workspace(tmp_path_factory.mktemp("cuda_tiny") / "ws", num_labelled=6)


def phantom_batch(workspace, plan: Plan, seed: int = 0) -> dict:
    """A batch of the plan's patches cut from the preprocessed phantoms around their lungs, with one target per
    deep-supervision output (labels taken at that output's stride)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    cases = sorted(path.stem for path in workspace.preprocessed_cases.glob("*.json"))
    for index in range(plan.batch_size):
        image, segmentation, _ = load_case(workspace.preprocessed_cases, cases[index % len(cases)])
        padded = [(0, max(0, p - s)) for s, p in zip(segmentation.shape, plan.patch_size)]
        image = np.pad(image, [(0, 0), *padded])
        segmentation = np.pad(segmentation, padded)
        lung = np.argwhere(segmentation > 0)
        centre = lung[rng.integers(len(lung))] if len(lung) else np.array(segmentation.shape) // 2
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, plan.patch_size, segmentation.shape)]
        window = tuple(slice(b, b + p) for b, p in zip(start, plan.patch_size))
        images.append(image[(slice(None), *window)])
        labels.append(segmentation[window])
    data, label = torch.from_numpy(np.stack(images).astype(np.float32)), torch.from_numpy(np.stack(labels)[:, None])
    strides = plan.network.cumulative_strides
    targets = [label[(..., *(slice(None, None, s) for s in strides[stage]))].clone()
               for stage in plan.network.output_stages()]
    return {"data": data, "target": targets}


@contextmanager
def deterministic_kernels():
    """cuDNN's and torch's deterministic algorithms, warning (not failing) where an op has none."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


def max_difference(first: dict, second: dict) -> float:
    return max(float((first[name].double() - second[name].double()).abs().max()) for name in first)


def test_amp_training_step_gives_finite_losses_and_gradients(device, tiny_workspace, record_property):
    """Finite losses every step, and finite gradients, except where float16 overflowed: then GradScaler must have
    skipped that step and lowered its scale (its job), and at least one step must have been a real one."""
    plan = Plan.load(tiny_workspace.plans_json)
    torch.manual_seed(0)
    network, optimizer, scaler, loss = training_parts(plan, device)
    dtypes, overflows = [], 0
    network.stem[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))   # a conv
    for seed in range(AMP_STEPS):
        scale = scaler.get_scale()
        result = train_epoch(network, iter([phantom_batch(tiny_workspace, plan, seed)]), loss, optimizer, scaler, 1,
                             device, TrainingSettings().gradient_clip, mixed_precision=device.type == "cuda")
        assert result.iterations == 1 and math.isfinite(result.mean_loss)
        gradients = [p.grad for p in network.parameters() if p.grad is not None]
        assert gradients
        if not all(bool(torch.isfinite(gradient).all()) for gradient in gradients):
            overflows += 1
            assert scaler.get_scale() < scale
    record_property("final_loss", result.mean_loss)
    record_property("grad_scale", float(scaler.get_scale()))
    record_property("overflow_steps", overflows)
    record_property("autocast_dtype", str(dtypes[0]))
    assert overflows < AMP_STEPS
    assert all(bool(torch.isfinite(p).all()) for p in network.parameters())
    assert dtypes[0] == (torch.float16 if device.type == "cuda" else torch.float32)


def test_compile_trains(device, tiny_workspace, tmp_path, record_property):
    workspace = copy_workspace(tiny_workspace, tmp_path / "ws")
    assert command("covnet_train", "all", "--workspace", workspace.root, "--device", str(device), "--compile",
                   "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "0", "--num-workers", "0") == 0
    history = Checkpoint.load(workspace.fold("all").checkpoint("final")).history
    record_property("train_loss", history["train_loss"][0])
    record_property("epoch_s_with_compilation", history["epoch_seconds"][0])
    assert all(math.isfinite(value) for value in history["train_loss"])


@pytest.fixture(scope="module")
def phantom_model(tmp_path_factory, device) -> tuple[Path, Path]:
    given = os.environ.get(WORKSPACE_VARIABLE)
    if given:
        return Path(given), final_checkpoint(Path(given))
    scale = GPU if device.type == "cuda" else DRY_RUN
    root = tmp_path_factory.mktemp("phantom_model") / "ws"
    return root, make_phantom_model(root, scale.small, scale.model_training, device.type, run_checked)


def test_device_predicts_the_labels_of_the_cpu(device, phantom_model, record_property):
    root, checkpoint = phantom_model
    # On the CPU (the dry run) both sides are the same path: mirroring would only cost time there.
    figures = device_agreement(root, checkpoint, device, mirroring=device.type == "cuda")
    for name, value in figures.items():
        if name != "cases":
            record_property(name, value)
    assert figures["voxel_agreement"] >= MIN_VOXEL_AGREEMENT
    for region in ("lungs", "infection"):
        assert figures[f"{region}_dice_difference"] <= MAX_DICE_DIFFERENCE, figures


def test_one_process_ddp_steps_equal_plain_steps(device, tiny_workspace, tmp_path, record_property):
    plan = Plan.load(tiny_workspace.plans_json)
    batch = phantom_batch(tiny_workspace, plan)

    def train(wrap: bool) -> dict:
        torch.manual_seed(0)
        network, optimizer, scaler, loss = training_parts(plan, device, distributed=True)
        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None) \
            if wrap else network
        train_epoch(model, itertools.repeat(batch), loss, optimizer, scaler, STEPS, device,
                    TrainingSettings().gradient_clip, mixed_precision=device.type == "cuda")
        return {name: value.detach().cpu().clone() for name, value in network.state_dict().items()}

    backend = "nccl" if device.type == "cuda" else "gloo"
    with deterministic_kernels(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        try:
            plain, again, distributed = train(False), train(False), train(True)
        finally:
            dist.destroy_process_group()
    spread, difference = max_difference(plain, again), max_difference(plain, distributed)
    record_property("backend", backend)
    record_property("plain_run_spread", spread)
    record_property("ddp_difference", difference)
    record_property("nondeterministic_ops", "; ".join(sorted({str(w.message)[:80] for w in caught
                                                               if "deterministic" in str(w.message)})))
    assert difference == 0.0 if spread == 0.0 else difference <= 10 * spread


def test_torchrun_one_process_ends_like_a_plain_run(device, tiny_workspace, tmp_path, record_property):
    flags = ["--epochs", "1", "--iters-per-epoch", "3", "--val-iters", "0", "--num-workers", "0", "--seed", "0"]
    plain, launched = (copy_workspace(tiny_workspace, tmp_path / name) for name in ("plain", "torchrun"))
    run_checked(train_command(plain.root, str(device), flags))
    module = train_command(launched.root, str(device), flags)[1:]        # "-m covnet.cli.train ..."
    run_checked([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *module])
    first, second = (Checkpoint.load(final_checkpoint(w.root)) for w in (plain, launched))
    losses, other = np.array(first.history["train_loss"]), np.array(second.history["train_loss"])
    relative = float(np.max(np.abs(losses - other) / np.abs(losses)))
    weights = max_difference(first.network_state, second.network_state)
    record_property("max_relative_loss_difference", relative)
    record_property("max_weight_difference", weights)
    assert launched.fold("all").settings()["world_size"] == 1
    if device.type == "cpu":
        assert relative == 0.0 and weights == 0.0
    else:
        assert relative <= TORCHRUN_LOSS_TOLERANCE
