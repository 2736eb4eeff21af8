"""The parts of the check that run in a process of their own (a CUDA error or a hung worker then ends only that
process), each writing its figures as JSON:

    python -m benchmarks.gpu_check.workers environment OUT.json
    python -m benchmarks.gpu_check.workers prepare ROOT --size S --labelled N --test N --seed S [--tiny] -np N
                                                   [--out OUT.json]
    python -m benchmarks.gpu_check.workers memory OUT.json --device D --steps N PLANS.json ...
    python -m benchmarks.gpu_check.workers predict OUT.json DEVICE -- <covnet_predict arguments>

``memory`` runs covnet's own training step (``covnet.training.loop.train_epoch``: autocast and GradScaler on
CUDA, gradient clipping, SGD with Nesterov momentum) on random batches of each plan's batch and patch size.
On CUDA it caps the process at the plan's budget (``torch.cuda.set_per_process_memory_fraction``), so an
out-of-memory means the plan does not fit the memory it was planned for, and reads
``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``); on a CPU it reads the resident-set peak
(VmHWM) of a float32 step, which is what covnet's float32 memory model was calibrated on.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import importlib.metadata
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

from covnet.runtime.cpus import usable_cpu_count

GIB = 2 ** 30
# Import name -> distribution. REQUIRED: what covnet imports itself (and the test runner); the check cannot run
# without one of them. REPORTED: what those import in turn at the versions carried or installed; their versions
# are recorded where present and an absent one is not fatal (blosc2 4.16 stopped importing numexpr, and a
# required import that needs one fails on its own).
REQUIRED = {"SimpleITK": "simpleitk", "batchgenerators": "batchgenerators", "batchgeneratorsv2": "batchgeneratorsv2",
            "acvl_utils": "acvl_utils", "numpy": "numpy", "scipy": "scipy", "matplotlib": "matplotlib",
            "tqdm": "tqdm", "torch": "torch", "pytest": "pytest"}
REPORTED = {"cc3d": "connected-components-3d", "blosc2": "blosc2", "numexpr": "numexpr", "ndindex": "ndindex",
            "skimage": "scikit-image"}


# covnet's commands the check runs, and covnet's dependencies that do not travel to the GPU machine (only
# covnet/export needs them): a command that imports one of those cannot run there.
COMMAND_MODULES = ("covnet.cli.make_phantoms", "covnet.cli.plan_and_preprocess", "covnet.cli.train",
                   "covnet.cli.predict")
NOT_CARRIED = ("highdicom", "pydicom", "pyjpegls")


def write(path: str | os.PathLike, figures: dict) -> None:
    Path(path).write_text(json.dumps(figures, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- environment
def _module_record(module: str, distribution: str) -> dict:
    try:
        imported = importlib.import_module(module)
        folder = Path(imported.__file__).parent if imported.__file__ else next(iter(imported.__path__))
        return {"version": importlib.metadata.version(distribution), "path": str(folder)}
    except Exception as error:  # noqa: BLE001 - report every missing module, not the first
        return {"error": f"{type(error).__name__}: {error}"[:200]}


def environment() -> dict:
    modules = {module: _module_record(module, distribution) for module, distribution in REQUIRED.items()}
    reported = {module: _module_record(module, distribution) for module, distribution in REPORTED.items()}
    commands = {}
    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
            commands[module] = "ok"
        except Exception as error:  # noqa: BLE001 - report every command that cannot start
            commands[module] = f"{type(error).__name__}: {error}"[:200]
    import torch

    figures = {"commands": commands,
               "imports_not_carried": sorted({name.split(".")[0] for name in sys.modules} & set(NOT_CARRIED)),
               "python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
               "cpu_count": usable_cpu_count(), "load_average": os.getloadavg()[0],
               "cuda_available": torch.cuda.is_available(),
               "modules": modules, "missing": sorted(name for name, found in modules.items() if "error" in found),
               "transitive": reported,
               "transitive_absent": sorted(name for name, found in reported.items() if "error" in found)}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        figures.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / GIB, 2),
                       capability=f"{properties.major}.{properties.minor}",
                       multiprocessors=properties.multi_processor_count,
                       cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return figures


# ---------------------------------------------------------------------------------------------- memory
def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_freed_memory() -> None:
    """Give the heap's freed memory back to the system (glibc's malloc_trim), so that a baseline taken after it
    sees what the next allocations add: otherwise memory an earlier step freed absorbs a small plan's training
    step and its measured peak is 0."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):        # not glibc: the measurement keeps its old baseline
        pass


def _reset_peak_resident() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")   # VmHWM back to the current resident set (Linux >= 4.0)


def _peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _random_batch(plan):
    """One batch of the plan's shape: normalised-CT-like noise and random labels at every output scale."""
    import torch

    generator = torch.Generator().manual_seed(0)
    data = torch.randn(plan.batch_size, plan.in_channels, *plan.patch_size, generator=generator)
    targets = [torch.randint(0, plan.num_classes, (plan.batch_size, 1, *shape[1:]), generator=generator,
                             dtype=torch.int16) for shape in plan.network.logit_shapes(plan.patch_size)]
    return {"data": data, "target": targets}


def training_parts(plan, device, *, distributed: bool = False):
    """Network, optimizer, gradient scaler and loss as covnet's trainer builds them for ``plan`` (its default
    settings); ``distributed``: the coarsest output weighted as under DDP, where every output must be used."""
    import torch

    from covnet.network.unet import ResidualEncoderUNet
    from covnet.training.losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights
    from covnet.training.session import DDP_COARSEST_WEIGHT
    from covnet.training.settings import TrainingSettings

    settings = TrainingSettings()
    network = ResidualEncoderUNet(plan.network).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=settings.initial_lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay, nesterov=True)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    weights = deep_supervision_weights(len(plan.network.deep_supervision_scales))
    if distributed and len(weights) > 1:
        weights[-1] = DDP_COARSEST_WEIGHT
    loss = DeepSupervisionLoss(DiceCELoss(batch_dice=settings.batch_dice, ignore_label=plan.ignore_label), weights)
    return network, optimizer, scaler, loss


def _training_steps(plan, device, steps: int) -> dict:
    """Peak bytes (CUDA: allocated, and reserved by the caching allocator; CPU: resident) of the first step and
    of the following ones, from a baseline taken before the network exists, with covnet's training loop."""
    import torch

    from covnet.training.loop import train_epoch
    from covnet.training.settings import TrainingSettings

    cuda = device.type == "cuda"
    clip = TrainingSettings().gradient_clip
    batches = itertools.repeat(_random_batch(plan))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        gc.collect()
        _release_freed_memory()
        baseline = _resident_bytes()
        _reset_peak_resident()

    def peak() -> int:
        return (torch.cuda.max_memory_allocated(device) if cuda else _peak_resident_bytes()) - baseline

    peaks = {"reserved": 0}
    network, optimizer, scaler, loss = training_parts(plan, device)
    try:
        for phase, iterations in (("first", 1), ("steady", max(1, steps - 1))):
            train_epoch(network, batches, loss, optimizer, scaler, iterations, device, clip, mixed_precision=cuda)
            peaks[phase] = peak()
            if cuda:
                peaks["reserved"] = max(peaks["reserved"], torch.cuda.max_memory_reserved(device))
                torch.cuda.reset_peak_memory_stats(device)
            else:
                _reset_peak_resident()
        return peaks
    finally:
        del network, optimizer, scaler, loss
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def measure_plan(plans_json: Path, device, steps: int) -> dict:
    import torch

    from covnet.planning.memory import estimate_training_memory_bytes
    from covnet.planning.plans import Plan

    plan = Plan.load(plans_json)
    cuda = device.type == "cuda"
    figures = {"plans_json": str(plans_json), "budget_gb": plan.gpu_memory_gb, "patch_size": plan.patch_size,
               "batch_size": plan.batch_size, "stages": plan.network.n_stages,
               "features": list(plan.network.features_per_stage), "plan_estimate_gib": plan.estimated_memory_gb}
    # On CUDA the plan's own (AMP) estimate; on a CPU the float32 model, calibrated on this very measurement.
    estimate = plan.estimated_memory_gb * GIB if cuda else estimate_training_memory_bytes(
        plan.patch_size, plan.batch_size, plan.network, amp=False)
    figures["estimate_gib"] = round(estimate / GIB, 4)
    started = time.perf_counter()
    if cuda:
        # The planner's budget is GiB (covnet.planning.planner.GIB); the cap makes this GPU that small.
        fraction = min(1.0, plan.gpu_memory_gb * GIB / torch.cuda.get_device_properties(device).total_memory)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        try:
            peaks = _training_steps(plan, device, steps)
            figures["oom_at_budget"] = False
        except torch.OutOfMemoryError as error:
            figures.update(oom_at_budget=True, oom_error=" ".join(str(error).split())[:300])
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            peaks = _training_steps(plan, device, steps)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        figures["peak_reserved_gib"] = round(peaks["reserved"] / GIB, 4)
    else:
        peaks = _training_steps(plan, device, steps)
    measured = max(peaks["first"], peaks["steady"])
    figures.update(measured_first_step_gib=round(peaks["first"] / GIB, 4),
                   measured_steady_gib=round(peaks["steady"] / GIB, 4), measured_gib=round(measured / GIB, 4),
                   estimate_over_measured=round(estimate / measured, 4),
                   relative_error=round((estimate - measured) / measured, 4),
                   seconds=round(time.perf_counter() - started, 2))
    return figures


def memory(plans: list[Path], device_name: str, steps: int) -> dict:
    import torch

    device = torch.device(device_name)
    if device.type == "cuda" and device.index is None:      # the memory calls want an index
        device = torch.device("cuda", torch.cuda.current_device())
    method = ("torch.cuda.max_memory_allocated of an AMP training step (covnet's loop), process capped at the plan's "
              "budget; estimate: plans.json's estimated_memory_gb (AMP model)") if device.type == "cuda" else (
              "resident-set peak (VmHWM) growth of a float32 training step on the CPU (covnet's loop); estimate: "
              "covnet.planning.memory's float32 model")
    started = time.perf_counter()
    # One step of the first plan, not counted: what the first step in a process sets up once (cuDNN workspaces,
    # the CPU allocator's arenas) would otherwise land on the first plan's figures only.
    measure_plan(plans[0], device, 1)
    results, warm_up_s = [], round(time.perf_counter() - started, 2)
    for plans_json in plans:    # smallest first: one that fails does not hide the others
        try:
            results.append(measure_plan(plans_json, device, steps))
        except Exception as error:  # noqa: BLE001 - the next plan is still measured
            results.append({"plans_json": str(plans_json), "error": f"{type(error).__name__}: {error}"[:300]})
    return {"method": method, "device": str(device), "warm_up_s": warm_up_s, "plans": results}


# ---------------------------------------------------------------------------------------------- predict
def predict(device_name: str, arguments: list[str]) -> dict:
    """covnet_predict's ``main`` in this process, with its network stage (``Predictor.predict_boxed``:
    sliding window, mirroring, the ensemble average) timed to the end of the GPU's work."""
    import torch

    from covnet.cli import predict as command
    from covnet.inference.predictor import Predictor

    cuda = torch.device(device_name).type == "cuda"
    network_seconds = []
    predict_boxed = Predictor.predict_boxed

    def timed(self, *args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        probabilities = predict_boxed(self, *args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        network_seconds.append(time.perf_counter() - started)
        return probabilities

    Predictor.predict_boxed = timed
    if not cuda:
        _reset_peak_resident()
    started = time.perf_counter()
    code = command.main([*arguments, "--device", device_name])
    figures = {"exit_code": code, "main_s": round(time.perf_counter() - started, 2),
               "network_s": [round(seconds, 3) for seconds in network_seconds]}
    if cuda:
        figures.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3))
    else:
        figures["peak_resident_gib"] = round(_peak_resident_bytes() / GIB, 3)
    return figures


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:      # predict OUT.json DEVICE -- <covnet_predict arguments>
        separator = argv.index("--")
        write(argv[1], predict(argv[2], argv[separator + 1:]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.workers")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("environment").add_argument("out", type=Path)
    prepare = commands.add_parser("prepare")
    prepare.add_argument("root", type=Path)
    prepare.add_argument("--size", required=True)
    for name in ("--labelled", "--test", "--seed"):
        prepare.add_argument(name, type=int, required=True)
    prepare.add_argument("--tiny", action="store_true")
    prepare.add_argument("-np", dest="processes", type=int, default=usable_cpu_count())
    prepare.add_argument("--out", type=Path, help="write the seconds it took here")
    measure = commands.add_parser("memory")
    measure.add_argument("out", type=Path)
    measure.add_argument("--device", required=True)
    measure.add_argument("--steps", type=int, default=3)
    measure.add_argument("plans", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "environment":
        write(args.out, environment())
    elif args.command == "prepare":
        from benchmarks.gpu_check.data import prepare_workspace, run_checked
        from benchmarks.gpu_check.scale import PhantomSet
        phantoms = PhantomSet(args.size, args.labelled, args.test, args.seed, tiny_network=args.tiny)
        started = time.perf_counter()
        prepare_workspace(args.root, phantoms, run_checked, args.processes)
        if args.out:
            write(args.out, {"seconds": round(time.perf_counter() - started, 1)})
    else:
        write(args.out, memory(args.plans, args.device, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
