"""Variants of covnet's training step, each timed on random batches of a plan's shape (issue 31):

    python -m benchmarks.gpu_check.variants OUT.json --device D --plan PLANS.json --warm-up W --iterations N
                                            [--max-seconds S] VARIANT ...

``baseline`` is covnet's own ``train_epoch``; every other variant runs this module's copy of that step
(``replica``: the copy with nothing changed, which must give baseline's losses and time) with one change, or
several (``combined``). Per variant: seconds per iteration and per 250 iterations after ``W`` warm-up
iterations, the peak memory of the step (CUDA: ``max_memory_allocated`` over the allocation before the network
exists; CPU: resident-set (VmHWM) growth), the mean loss, and ``status``: ``ran``, ``not supported`` (this GPU
cannot), ``not applicable on cpu`` (the code ran, but what it changes exists only on a GPU), or ``failed``
with its reason. OUT.json is rewritten after every variant, so a worker stopped by the check's budget keeps what
it finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The check's order: the most informative first, so that a budget cut drops the least.
COMPILE_MODES = {"compile_default": "default", "compile_reduce_overhead": "reduce-overhead",
                 "compile_max_autotune": "max-autotune-no-cudagraphs"}


@dataclass(frozen=True)
class Variant:
    """One way of running covnet's training step; the defaults are covnet's trainer."""
    what: str
    channels_last: bool = False           # torch.channels_last_3d for the network's weights and the input
    cudnn_benchmark: bool = False         # torch.backends.cudnn.benchmark
    bfloat16: bool = False                # bfloat16 autocast without GradScaler (else float16 with it, on CUDA)
    sgd: str = "default"                  # "default", "foreach" or "fused" (torch.optim.SGD's implementations)
    deferred_syncs: bool = False          # loss summed on the device, read (and checked) once per timed round
    targets_on_device: bool = False       # only the full-resolution target crosses; the others built there
    group_norm: bool = False              # InstanceNorm3d as the same GroupNorm (one group per channel)
    compile_mode: str | None = None       # torch.compile(network, mode=...) as covnet's --compile does
    covnet_loop: bool = False             # covnet.training.loop.train_epoch itself


_FAST = dict(channels_last=True, cudnn_benchmark=True, bfloat16=True, sgd="fused", deferred_syncs=True)
VARIANTS = {
    "baseline": Variant("covnet's train_epoch: float16 autocast and GradScaler on CUDA, NCDHW, cuDNN heuristics, "
                        "default SGD, 3 host syncs per iteration (isfinite, 2 x loss.item()) + GradScaler's",
                        covnet_loop=True),
    "combined": Variant("channels-last + cudnn.benchmark + bfloat16 (float16 where unsupported) + fused SGD + "
                        "deferred syncs", **_FAST),
    "cudnn_benchmark": Variant("torch.backends.cudnn.benchmark = True", cudnn_benchmark=True),
    "channels_last": Variant("torch.channels_last_3d network and input", channels_last=True),
    "bfloat16": Variant("bfloat16 autocast, no GradScaler", bfloat16=True),
    "deferred_syncs": Variant("no per-iteration host sync: loss summed on the device, read and checked once per "
                              "timed round (a quarter of the timed iterations)", deferred_syncs=True),
    "fused_sgd": Variant("torch.optim.SGD(fused=True) (GradScaler then needs no found_inf sync)", sgd="fused"),
    "group_norm": Variant("InstanceNorm3d as GroupNorm(C, C): the same function, another kernel", group_norm=True),
    "targets_on_device": Variant("one target crosses to the device; the deep-supervision targets are built there",
                                 targets_on_device=True),
    "replica": Variant("this harness's copy of train_epoch, nothing changed: checks the harness"),
    "foreach_sgd": Variant("torch.optim.SGD(foreach=True) (the default on CUDA already)", sgd="foreach"),
    "compile_default": Variant("torch.compile(network) (covnet's --compile)", compile_mode="default"),
    "compile_combined": Variant("compile_default + combined", compile_mode="default", **_FAST),
    "compile_reduce_overhead": Variant("torch.compile(network, mode='reduce-overhead') (CUDA graphs)",
                                       compile_mode="reduce-overhead"),
    "compile_max_autotune": Variant("torch.compile(network, mode='max-autotune-no-cudagraphs')",
                                    compile_mode="max-autotune-no-cudagraphs"),
}
EAGER = tuple(name for name, variant in VARIANTS.items() if variant.compile_mode is None)
COMPILED = tuple(name for name, variant in VARIANTS.items() if variant.compile_mode is not None)


def not_applicable_on_cpu(variant: Variant) -> str | None:
    """Why a variant measures nothing of what it is about on the CPU (its code still runs), or None."""
    reasons = [reason for applies, reason in (
        (variant.cudnn_benchmark, "cudnn.benchmark has no effect"),
        (variant.bfloat16, "bfloat16 autocast runs on the CPU's kernels, not a GPU's"),
        (variant.targets_on_device, "no host-to-device copy"),
        (variant.compile_mode is not None,
         "traced by dynamo with backend='eager' (inductor's modes are for CUDA here; CPU codegen takes minutes)"),
    ) if applies]
    return "not applicable on cpu: " + "; ".join(reasons) if reasons else None


# ---------------------------------------------------------------------------------------------- the step
class Progress:
    """Stands in for the trainer's tqdm bar: train_epoch formats the loss for it every iteration (a sync)."""

    def set_postfix(self, **values) -> None:
        pass

    def update(self, count: int = 1) -> None:
        pass


def device_batch(plan, device, *, pinned: bool):
    """A random batch of the plan's shape (workers._random_batch), held in pinned memory for CUDA as covnet's
    loader holds it, with the full-resolution target alone under ``full_target``."""
    from benchmarks.gpu_check.workers import _random_batch

    batch = _random_batch(plan)
    if pinned:
        batch = {"data": batch["data"].pin_memory(), "target": [target.pin_memory() for target in batch["target"]]}
    return {**batch, "full_target": batch["target"][0]}


def deep_supervision_indices(plan, device) -> list[list]:
    """Per deep-supervision scale and spatial axis, the voxels covnet's downsample_nearest keeps (found by
    applying it to each axis's coordinates), on ``device``: the targets can then be built there."""
    import torch

    from covnet.training.augmentation import downsample_nearest

    indices = []
    for scale in plan.network.deep_supervision_scales:
        per_axis = []
        for axis, size in enumerate(plan.patch_size):
            shape = [1, 1, 1, 1, 1]
            shape[axis + 2] = size
            coordinates = torch.arange(size).view(shape)
            kept = downsample_nearest(coordinates, [s if a == axis else 1.0 for a, s in enumerate(scale)])
            per_axis.append(None if kept.numel() == size else kept.flatten().to(device))
        indices.append(per_axis)
    return indices


@dataclass
class Parts:
    network: object
    model: object                  # the network, or its compiled wrapper
    optimizer: object
    scaler: object
    loss: object
    autocast: dict                 # torch.autocast's arguments
    clip: float


def build(plan, device, variant: Variant) -> Parts:
    import torch

    from benchmarks.gpu_check.workers import training_parts
    from covnet.training.settings import TrainingSettings

    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = variant.cudnn_benchmark
    torch.manual_seed(0)
    network, optimizer, scaler, loss = training_parts(plan, device)
    if variant.group_norm:
        instance_to_group_norm(network)
    if variant.channels_last:
        network = network.to(memory_format=torch.channels_last_3d)
    if variant.group_norm or variant.sgd != "default":
        settings = {key: optimizer.defaults[key] for key in ("lr", "momentum", "weight_decay", "nesterov")}
        implementation = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[variant.sgd]
        optimizer = torch.optim.SGD(network.parameters(), **settings, **implementation)
    autocast = {"device_type": device.type, "enabled": cuda}
    if variant.bfloat16:
        autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": True}
        scaler = torch.amp.GradScaler(device.type, enabled=False)
    model = network
    if variant.compile_mode is not None:
        if cuda:        # a fresh compilation for each mode; on the CPU, dynamo's eager trace may be reused
            torch._dynamo.reset()
        model = torch.compile(network, mode=variant.compile_mode) if cuda else torch.compile(network, backend="eager")
    return Parts(network, model, optimizer, scaler, loss, autocast, TrainingSettings().gradient_clip)


def instance_to_group_norm(network) -> None:
    import torch
    from torch import nn

    for module in list(network.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.InstanceNorm3d):
                group = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=True)
                with torch.no_grad():
                    group.weight.copy_(child.weight)
                    group.bias.copy_(child.bias)
                setattr(module, name, group.to(child.weight.device))


def run_iterations(parts: Parts, batch: dict, iterations: int, device, variant: Variant, indices) -> float:
    """``iterations`` steps of ``variant``; the mean loss. Without changes, the step of train_epoch."""
    import torch
    from torch import nn

    from covnet.runtime.errors import CovnetError
    from covnet.training.loop import train_epoch

    if variant.covnet_loop:
        return train_epoch(parts.model, itertools.repeat(batch), parts.loss, parts.optimizer, parts.scaler,
                           iterations, device, parts.clip, Progress(),
                           mixed_precision=parts.autocast["enabled"]).mean_loss
    memory_format = torch.channels_last_3d if variant.channels_last else torch.contiguous_format
    parts.network.train()
    total, device_total = 0.0, torch.zeros((), device=device)
    for _ in range(iterations):
        if variant.compile_mode == "reduce-overhead" and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        data = batch["data"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        if variant.targets_on_device:
            targets = targets_built_on(batch["full_target"].to(device, non_blocking=True), indices)
        else:
            targets = [target.to(device, non_blocking=True) for target in batch["target"]]
        parts.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**parts.autocast):
            outputs = parts.model(data)
            loss = parts.loss(as_list(outputs), targets)
        if not variant.deferred_syncs and not torch.isfinite(loss):
            raise CovnetError(None, f"training loss became {loss.item()}")
        parts.scaler.scale(loss).backward()
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(parts.network.parameters(), parts.clip)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        if variant.deferred_syncs:       # measure() checks the mean for finiteness
            device_total += loss.detach()
        else:
            total += loss.item()
            _ = f"{loss.item():.4f}"       # what the trainer's progress bar shows
    return (float(device_total) if variant.deferred_syncs else total) / max(iterations, 1)


def as_list(outputs) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def targets_built_on(target, indices) -> list:
    """The deep-supervision targets of a full-resolution ``target``, on its device (deep_supervision_indices)."""
    targets = []
    for per_axis in indices:
        scaled = target
        for axis, kept in enumerate(per_axis):
            if kept is not None:
                scaled = scaled.index_select(axis + 2, kept)
        targets.append(scaled)
    return targets


# ---------------------------------------------------------------------------------------------- measuring
def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(plan, device, name: str, *, warm_up: int, iterations: int, max_seconds: float) -> dict:
    import torch

    from benchmarks.gpu_check import workers

    variant = VARIANTS[name]
    cuda = device.type == "cuda"
    record = {"what": variant.what, "status": "ran", "reason": None}
    if cuda and variant.bfloat16 and not torch.cuda.is_bf16_supported():
        if name != "combined":
            return {**record, "status": "not supported", "reason": "torch.cuda.is_bf16_supported() is False"}
        variant = dataclasses.replace(variant, bfloat16=False)
        record["reason"] = "float16 with GradScaler: this GPU has no bfloat16"
    if not cuda and not_applicable_on_cpu(variant):
        record.update(status="not applicable on cpu", reason=not_applicable_on_cpu(variant))
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        workers._release_freed_memory()
        baseline = workers._resident_bytes()
        workers._reset_peak_resident()
    started = time.perf_counter()
    parts = build(plan, device, variant)
    batch = device_batch(plan, device, pinned=cuda)
    indices = deep_supervision_indices(plan, device) if variant.targets_on_device else None
    run_iterations(parts, batch, warm_up, device, variant, indices)
    synchronize(device)
    record["warm_up_s"] = round(time.perf_counter() - started, 2)
    # Timed in rounds, so that a slow variant stops after max_seconds (at least 2 rounds).
    timed, seconds, losses, size = 0, 0.0, [], max(1, iterations // 4)
    while timed < iterations and (timed < 2 * size or seconds < max_seconds):
        count = min(size, iterations - timed)
        synchronize(device)
        started = time.perf_counter()
        losses.append(run_iterations(parts, batch, count, device, variant, indices) * count)
        synchronize(device)
        seconds += time.perf_counter() - started
        timed += count
    peak = (torch.cuda.max_memory_allocated(device) if cuda else workers._peak_resident_bytes()) - baseline
    record.update(iterations=timed, seconds=round(seconds, 3), seconds_per_iteration=round(seconds / timed, 5),
                  seconds_per_250_iterations=round(seconds / timed * 250, 2), peak_gib=round(peak / workers.GIB, 4),
                  mean_loss=sum(losses) / timed)
    if cuda:
        record["estimate_over_measured"] = round(plan.estimated_memory_gb * workers.GIB / peak, 4)
    if not math.isfinite(record["mean_loss"]):      # deferred syncs: what the per-iteration check would have caught
        record.update(status="failed", reason=f"CovnetError: training loss became {record['mean_loss']} (timed anyway)")
    del parts, batch
    return record


def load_plan(plan_path: Path, patch_size):
    """The plan, with ``patch_size`` in place of its own when given (the dry run's smaller step)."""
    from covnet.planning.plans import Plan

    plan = Plan.load(plan_path)
    return dataclasses.replace(plan, patch_size=list(patch_size)) if patch_size else plan


def torch_device(name: str):
    import torch

    device = torch.device(name)
    if device.type == "cuda" and device.index is None:      # the memory calls want an index
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def run(out: Path, plan_path: Path, device_name: str, names: list[str], *, warm_up: int, iterations: int,
        max_seconds: float, patch_size=None) -> dict:
    import torch

    device = torch_device(device_name)
    plan = load_plan(plan_path, patch_size)
    figures = {"device": str(device), "torch": torch.__version__, "patch_size": plan.patch_size,
               "batch_size": plan.batch_size, "warm_up": warm_up, "iterations": iterations,
               "max_seconds": max_seconds, "variants": {}}
    for name in names:
        try:
            figures["variants"][name] = measure(plan, device, name, warm_up=warm_up, iterations=iterations,
                                                max_seconds=max_seconds)
        except Exception as error:  # noqa: BLE001 - a variant that fails is a finding; the next one runs
            figures["variants"][name] = {"what": VARIANTS[name].what, "status": "failed",
                                         "reason": f"{type(error).__name__}: {' '.join(str(error).split())}"[:400]}
        finally:
            torch.backends.cudnn.benchmark = False
        Path(out).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def worker_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The arguments every training-step worker takes: where to write, the device, the plan and its patch."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", required=True)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--warm-up", type=int, required=True)
    parser.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="in place of the plan's (the dry run's smaller step)")
    return parser


def main(argv=None) -> int:
    parser = worker_parser("benchmarks.gpu_check.variants", __doc__)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, default=float("inf"), help="stop timing a variant after this")
    parser.add_argument("variants", nargs="+", choices=tuple(VARIANTS))
    args = parser.parse_args(argv)
    run(args.out, args.plan, args.device, args.variants, warm_up=args.warm_up, iterations=args.iterations,
        max_seconds=args.max_seconds, patch_size=args.patch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
