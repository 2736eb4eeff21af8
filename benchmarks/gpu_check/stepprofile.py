"""A profile of covnet's training step (issue 31): ``covnet.training.loop.train_epoch`` with the parts covnet's
trainer builds for a plan (workers.training_parts), on a random batch of the plan's shape:

    python -m benchmarks.gpu_check.stepprofile OUT.json --device D --plan PLANS.json --warm-up W --steps N
                                               [--patch-size Z Y X]

(``--device meta``: only the floating-point operations of one iteration, from shapes, for any plan.)

After ``W`` warm-up iterations it records: the step's time (``N`` iterations, no profiler); the host-device syncs
one iteration asks for from Python (``item()``, ``bool()`` of a tensor, ...: each waits for the GPU), counted
by a TorchFunctionMode and named by the line that asked, and on CUDA every sync torch reports
(``torch.cuda.set_sync_debug_mode``); ``N`` iterations under ``torch.profiler`` (top operators by self time, on
the host and, on CUDA, on the device; how busy the device was); the time of each phase of the step
(forward with the loss, backward, unscale and clip, optimizer step), each ended by a synchronisation; and the
floating-point operations of one iteration (torch.utils.flop_counter), hence the throughput reached.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

from benchmarks.gpu_check.variants import Progress, as_list, device_batch, synchronize, worker_parser

TOP = 15
# Tensor methods that copy a value to the host: on CUDA each waits for every kernel queued before it.
SYNCING_METHODS = frozenset({"item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"})


def sync_counter():
    """A TorchFunctionMode counting the syncing calls by the first line outside torch that made them."""
    from torch.overrides import TorchFunctionMode

    class SyncCounter(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in SYNCING_METHODS:
                self.calls[f"{_caller()} {name}"] += 1
            return func(*args, **(kwargs or {}))

    return SyncCounter()


def _caller() -> str:
    """The innermost line outside this module, from its package folder on (covnet/..., torch/...)."""
    for frame in reversed(traceback.extract_stack()):
        parts = Path(frame.filename).parts
        if frame.filename != __file__:
            start = max((i for i, part in enumerate(parts) if part in ("covnet", "benchmarks", "torch")), default=0)
            return f"{'/'.join(parts[start:])}:{frame.lineno}"
    return "?"


def _per_iteration(value: float, steps: int) -> float:
    return round(value / steps, 6)


def _top(averages, attribute: str, steps: int, total: float) -> list[dict]:
    rows = sorted((event for event in averages if getattr(event, attribute, 0) > 0),
                  key=lambda event: getattr(event, attribute), reverse=True)[:TOP]
    return [{"name": event.key[:120], "calls_per_iteration": _per_iteration(event.count, steps),
             "self_ms_per_iteration": round(getattr(event, attribute) / 1000 / steps, 3),
             "share": round(getattr(event, attribute) / total, 4) if total else None} for event in rows]


def profiled(run, device, steps: int) -> dict:
    """``run(steps)`` under torch.profiler: operators by self host time; on CUDA also operators by the time of the
    kernels they launched, the kernels themselves, and the share of the wall time the GPU was running kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        run(steps)
        synchronize(device)
    wall = time.perf_counter() - started
    averages = profiler.key_averages()
    operators = [event for event in averages if event.device_type == DeviceType.CPU]
    kernels = [event for event in averages if event.device_type != DeviceType.CPU]
    figures = {"wall_s_per_iteration": round(wall / steps, 5),
               "top_self_cpu": _top(operators, "self_cpu_time_total", steps,
                                    sum(event.self_cpu_time_total for event in operators))}
    if cuda:
        on_device = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") \
            else "self_cuda_time_total"
        device_total = sum(getattr(event, on_device) for event in kernels)
        figures.update(top_self_device=_top(operators, on_device, steps, device_total),
                       top_kernels=_top(kernels, on_device, steps, device_total),
                       device_busy_share=round(device_total / 1e6 / wall, 4))
    return figures


def phases(parts, batch, device, steps: int) -> dict:
    """Seconds per iteration of each phase of the step as train_epoch runs it, each ended by a sync."""
    import torch
    from torch import nn

    seconds = Counter()

    def timed(phase, work):
        synchronize(device)
        started = time.perf_counter()
        result = work()
        synchronize(device)
        seconds[phase] += time.perf_counter() - started
        return result

    network, optimizer, scaler = parts.network, parts.optimizer, parts.scaler
    for _ in range(steps):
        data, targets = timed("to_device", lambda: (batch["data"].to(device, non_blocking=True),
                                                     [t.to(device, non_blocking=True) for t in batch["target"]]))
        optimizer.zero_grad(set_to_none=True)

        def forward():
            with torch.autocast(**parts.autocast):
                return parts.loss(as_list(network(data)), targets)

        loss = timed("forward_and_loss", forward)
        timed("backward", lambda: scaler.scale(loss).backward())
        timed("unscale_and_clip", lambda: (scaler.unscale_(optimizer),
                                           nn.utils.clip_grad_norm_(network.parameters(), parts.clip)))
        timed("optimizer_step", lambda: (scaler.step(optimizer), scaler.update()))
        timed("loss_to_host", loss.item)
    total = sum(seconds.values())
    return {phase: {"s_per_iteration": round(value / steps, 5), "share": round(value / total, 4)}
            for phase, value in seconds.items()}


def step_flops(parts, plan, device) -> dict:
    """Floating-point operations of one forward, loss and backward (what FlopCounterMode has formulas for:
    convolutions and matrix products)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.gpu_check.workers import _random_batch

    batch = _random_batch(plan)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(**parts.autocast):
            loss = parts.loss(as_list(parts.network(batch["data"].to(device))),
                              [target.to(device) for target in batch["target"]])
        loss.backward()
    parts.optimizer.zero_grad(set_to_none=True)
    by_operator = {str(operator): count for operator, count in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": counter.get_total_flops(), "by_operator": by_operator}


def profile_step(plan_path: Path, device_name: str, *, warm_up: int, steps: int, patch_size=None) -> dict:
    import torch

    from benchmarks.gpu_check.variants import VARIANTS, build, load_plan, torch_device
    from covnet.training.loop import train_epoch

    device = torch_device(device_name)
    cuda = device.type == "cuda"
    plan = load_plan(plan_path, patch_size)
    parts = build(plan, device, VARIANTS["baseline"])
    if device.type == "meta":       # shapes only: the FLOPs of a step too big to run here
        parts.autocast = {"device_type": "cpu", "enabled": False}
        flops = step_flops(parts, plan, device)
        return {"device": "meta", "patch_size": plan.patch_size, "batch_size": plan.batch_size,
                "flops_per_iteration": flops["total"], "flops_by_operator": flops["by_operator"]}
    batch = device_batch(plan, device, pinned=cuda)

    def run(iterations: int):
        return train_epoch(parts.model, itertools.repeat(batch), parts.loss, parts.optimizer, parts.scaler,
                           iterations, device, parts.clip, Progress(), mixed_precision=parts.autocast["enabled"])

    figures = {"device": str(device), "torch": torch.__version__, "patch_size": plan.patch_size,
               "batch_size": plan.batch_size, "warm_up": warm_up, "steps": steps,
               "what": "covnet.training.loop.train_epoch with a stand-in for the trainer's progress bar"}
    started = time.perf_counter()
    run(warm_up)
    synchronize(device)
    figures["warm_up_s"] = round(time.perf_counter() - started, 2)
    synchronize(device)
    started = time.perf_counter()
    run(steps)
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    figures.update(seconds_per_iteration=round(seconds, 5), seconds_per_250_iterations=round(seconds * 250, 2))
    with sync_counter() as counter:
        run(1)
    figures["python_syncs_per_iteration"] = sum(counter.calls.values())
    figures["python_syncs"] = dict(counter.calls.most_common())
    if cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        figures["cuda_syncs_per_iteration"] = sum("synchroniz" in str(warning.message) for warning in caught)
    figures["profile"] = profiled(run, device, steps)
    figures["phases"] = phases(parts, batch, device, steps)
    flops = step_flops(parts, plan, device)
    figures.update(flops_per_iteration=flops["total"], flops_by_operator=flops["by_operator"],
                   tflops_per_s=round(flops["total"] / seconds / 1e12, 3))
    return figures


def main(argv=None) -> int:
    parser = worker_parser("benchmarks.gpu_check.stepprofile", __doc__)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args(argv)
    figures = profile_step(args.plan, args.device, warm_up=args.warm_up, steps=args.steps,
                           patch_size=args.patch_size)
    args.out.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
