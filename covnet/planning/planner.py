"""From the labelled raw data to ``dataset_fingerprint.json`` and ``plans.json``.

``plans.json`` may be edited by hand (README, "Hand-edited plans.json"). The planner writes its own output
twice: to ``plans.json`` and to ``plans.planned.json`` beside it, which is never edited, so an edit is whatever
differs between the two. A rerun keeps ``plans.json``, edits included, while the labelled raw files,
``dataset.json`` and the request (``PlanRequest``: device and budgets) are those it was planned from; it
plans afresh when one of them changed and there are no edits, and refuses when there are (``--replan``
plans afresh and discards them). Keeping the plan also keeps a measured CPU plan stable: planning afresh
would measure again.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np

from covnet.dataset import DatasetDescription, validate_raw_dataset
from covnet.image.ct import is_ct_channel
from covnet.planning import cpu_time, rules
from covnet.planning.fingerprint import DatasetFingerprint, case_source, extract_fingerprint
from covnet.planning.memory import estimate_training_memory_bytes
from covnet.planning.plans import (
    DEVICES,
    PLANS_VERSION,
    ZSCORE_SCHEME,
    NormalizationScheme,
    Plan,
    ResamplingSettings,
    plan_differences,
)
from covnet.runtime.atomic import read_json
from covnet.runtime.cpus import usable_cpu_count
from covnet.runtime.environment import environment_record
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.runtime.precision import cpu_has_native_bfloat16
from covnet.workspace import Workspace

GIB = 2 ** 30
log = logger(__name__)
DEFAULT_DEVICE = "cuda"
DEFAULT_GPU_MEMORY_GB = 8.0
DEFAULT_SECONDS_PER_ITERATION = 1.0
# Entries of plans.json copied from raw/dataset.json: they are changed there (then --replan), not in plans.json.
FROM_DATASET_JSON = ("dataset_name", "labels", "regions", "channel_names", "lateral_pairs")
# Measure, rescale the model, plan again: until the plan stands still, at most this often.
MAX_MEASUREMENTS = 3


def normalization_for_channel(channel_name: str, fingerprint: DatasetFingerprint) -> rules.Decision:
    if is_ct_channel(channel_name):
        return rules.ct_normalization(fingerprint.foreground_intensity)
    return rules.Decision(NormalizationScheme(ZSCORE_SCHEME), "not CT: z-score each image with its own mean and std")


def make_plan(fingerprint: DatasetFingerprint, description: DatasetDescription, gpu_memory_gb: float = 8.0,
              device: str = "cuda", seconds_per_iteration: float = 1.0,
              machine: cpu_time.CpuMachine = cpu_time.CALIBRATION_MACHINE) -> Plan:
    """Apply the planning rules to a fingerprint for the device that will train. Pure: reads and writes nothing.

    ``device="cuda"``: memory is the limit (AMP memory model, ``gpu_memory_gb``). ``device="cpu"``: time is
    the limit (``seconds_per_iteration`` for the network and the data pipeline on ``machine``, by
    ``covnet.planning.cpu_time``'s model), and the memory estimate must also fit ``gpu_memory_gb``; the plan
    trains in bfloat16 (``mixed_precision``) where ``machine.bfloat16``, else in float32."""
    if device not in DEVICES:
        raise CovnetError(None, f"--device {device}: must be one of {', '.join(DEVICES)}")
    spacings, shapes = fingerprint.spacings, fingerprint.shapes_after_crop
    spacing = rules.choose_target_spacing(spacings, shapes)
    resampled = rules.resampled_shapes(shapes, spacings, spacing.value)
    median_shape = np.median(resampled, axis=0)
    in_channels = len(description.channel_names)
    num_classes = description.num_classes
    budget = gpu_memory_gb * GIB
    amp = device == "cuda" or machine.bfloat16
    iteration = None
    try:
        if device == "cuda":
            patch, network = rules.choose_patch_and_network(spacing.value, median_shape, budget, in_channels,
                                                            num_classes, amp=True)
            network_reason = ("pool while ≥ 8 voxels and spacing within 2× of the finest poolable axis; kernels 3 "
                              "once within 2× of the finest; features 32·2^i ≤ 320; residual blocks 1-3-4-6-6-6")
        else:
            patch, network_decision, iteration = rules.choose_cpu_patch_and_network(
                spacing.value, median_shape, seconds_per_iteration, budget, in_channels, num_classes, machine)
            network, network_reason = network_decision.value, network_decision.reason
    except ValueError as error:
        hint = "give covnet more memory" if device == "cuda" else "raise --seconds-per-iteration or the memory"
        raise CovnetError(None, f"--device {device} --gpu-memory-gb {gpu_memory_gb:g}: {error}; {hint}") from None
    dataset_voxels = float(np.sum(np.prod(resampled, axis=1)))
    if device == "cuda":
        batch = rules.choose_batch_size(patch.value, network, budget, dataset_voxels, amp=True)
        device_reason = f"CUDA plan: memory is the budget ({gpu_memory_gb:g} GB, AMP memory model)"
    else:
        batch = rules.Decision(rules.MIN_BATCH_SIZE, f"CPU plan: the minimum {rules.MIN_BATCH_SIZE}; every extra "
                                                     "sample adds its time to each iteration")
        device_reason = (f"CPU plan: time is the budget ({seconds_per_iteration:g} s per iteration, "
                         f"{machine.precision}; memory must also fit {gpu_memory_gb:g} GB)")
    normalization = {channel: normalization_for_channel(name, fingerprint)
                     for channel, name in description.channel_names.items()}
    estimate = estimate_training_memory_bytes(patch.value, batch.value, network, amp)
    reasons = {"device": device_reason, "target_spacing": spacing.reason, "patch_size": patch.reason,
               "batch_size": batch.reason, "network": network_reason,
               "lateral_pairs": description.lateral_pairs_reason}
    if device == "cpu":
        reasons["time_per_iteration"] = (
            f"network {iteration.network:.2f} s + augmentation {iteration.loader:.2f} s per batch on one core, "
            f"{machine.describe()} (covnet.planning.cpu_time model"
            + (f", bfloat16 network × {cpu_time.BFLOAT16_NETWORK_FACTOR:g} of float32's" if machine.bfloat16 else "")
            + (f" × {machine.scale:.3g} measured on this machine)" if machine.scale != 1.0
               else f", calibrated on a {cpu_time.CALIBRATION_THREADS}-core CPU)"))
    reasons.update({f"normalization_{channel}": decision.reason for channel, decision in normalization.items()})
    return Plan(dataset_name=description.name, labels=dict(description.labels), regions=dict(description.regions),
                channel_names=dict(description.channel_names), target_spacing=spacing.value,
                lateral_pairs=description.lateral_label_pairs,
                median_shape=[float(v) for v in median_shape], patch_size=patch.value, batch_size=batch.value,
                network=network, normalization={c: d.value for c, d in normalization.items()},
                resampling=ResamplingSettings(image_order=3, segmentation_order=1, order_z=0,
                                              anisotropy_threshold=rules.ANISOTROPY_THRESHOLD),
                gpu_memory_gb=float(gpu_memory_gb), estimated_memory_gb=round(estimate / GIB, 3),
                device=device, mixed_precision=amp, limited_by=patch.limit,
                seconds_per_iteration=float(seconds_per_iteration) if device == "cpu" else None,
                estimated_seconds_per_iteration=round(iteration.seconds, 4) if iteration is not None else None,
                reasons=reasons, environment=environment_record())


# ------------------------------------------------------------------------------------------------ CPU timing

def this_machine() -> cpu_time.CpuMachine:
    """The planning machine as the CPU time model sees it: the CPUs this process may use
    (``covnet.runtime.cpus``), covnet_train's default augmentation workers there and whether it trains in
    bfloat16 (a CPU with AMX or AVX512-BF16); calibrated scale."""
    from covnet.training.settings import TrainingSettings  # torch-free; the one definition of the default

    return cpu_time.CpuMachine(cores=usable_cpu_count(), workers=TrainingSettings().data_workers,
                               bfloat16=cpu_has_native_bfloat16())


def _config(plan: Plan) -> tuple:
    return tuple(plan.patch_size), plan.batch_size, plan.network


def with_measurement(plan: Plan, timing) -> Plan:
    """``plan`` recording a ``covnet.planning.cpu_measure.IterationTiming`` of its own iteration."""
    workers = f"{timing.workers} worker{'s' if timing.workers != 1 else ''}" if timing.workers else "no workers"
    precision = "bfloat16" if plan.mixed_precision else "float32"
    reason = (f"{plan.reasons.get('time_per_iteration', '')}; measured here: {timing.seconds:.2f} s per iteration "
              f"({precision}) with {workers} (augmentation {timing.loader_seconds:.2f} s per batch on one core; "
              f"load average {os.getloadavg()[0]:.1f})")
    return dataclasses.replace(plan, measured_seconds_per_iteration=round(timing.seconds, 4),
                               reasons={**plan.reasons, "time_per_iteration": reason})


def measured_cpu_plan(fingerprint: DatasetFingerprint, description: DatasetDescription, request: "PlanRequest",
                      machine: cpu_time.CpuMachine) -> Plan:
    """A CPU plan that keeps its promise here: plan by the model, time the chosen iteration on this machine
    (``covnet.planning.cpu_measure``: the network with its augmentation workers, in the plan's precision),
    rescale the model by measured / estimated and plan again, until the plan stands still. If it does not within
    ``MAX_MEASUREMENTS`` timings (other jobs make them erratic), the largest timed plan within the budget, else
    the fastest. The plan records the timing of its own network and patch."""
    from covnet.planning.cpu_measure import measure_training_iteration

    def plan_for(machine):
        return make_plan(fingerprint, description, request.gpu_memory_gb, "cpu", request.seconds_per_iteration,
                         machine)

    def modelled(plan):   # the calibrated model's figure, before any rescaling
        return cpu_time.estimate_iteration(plan.patch_size, plan.batch_size, plan.network,
                                           machine.rescaled(1.0)).seconds

    load = os.getloadavg()[0]
    if load > machine.cores + 1:
        log.warning(f"this machine is busy (load average {load:.1f} on {machine.cores} cores): the timing includes "
                    "the other jobs' share of the cores, so the plan comes out smaller than an idle machine "
                    "needs; plan when it is quieter, or with --no-measure-cpu-time")
    plan, timed = plan_for(machine), []
    for _ in range(MAX_MEASUREMENTS):
        log.info("timing the planned training iteration on this machine (--no-measure-cpu-time skips it)")
        timing = measure_training_iteration(plan.network, plan.patch_size, plan.batch_size, workers=machine.workers,
                                            lateral_pairs=plan.lateral_pairs, ignore_label=plan.ignore_label,
                                            bfloat16=plan.mixed_precision)
        timed.append((plan, timing))
        machine = machine.rescaled(timing.seconds / modelled(plan))
        try:
            replanned = plan_for(machine)
        except CovnetError as error:
            raise CovnetError(None, f"{error.problem} (timed here: {timing.seconds:.2f} s per iteration for "
                                    f"{plan.network.n_stages} stages at patch {'×'.join(map(str, plan.patch_size))}, "
                                    f"{machine.scale:.2g}× the model's estimate, load average "
                                    f"{os.getloadavg()[0]:.1f}; --no-measure-cpu-time plans by the model alone)"
                              ) from None
        if _config(replanned) == _config(plan):
            return with_measurement(replanned, timing)
        if any(_config(replanned) == _config(earlier) for earlier, _ in timed):
            break   # back to a plan already timed: the timings disagree
        plan = replanned
    within = [(plan, timing) for plan, timing in timed if timing.seconds <= request.seconds_per_iteration]
    plan, timing = (max(within, key=lambda pair: modelled(pair[0])) if within
                    else min(timed, key=lambda pair: pair[1].seconds))
    log.warning(f"the timings of {len(timed)} plans disagreed with each other (a busy machine?); keeping the "
                f"{'largest within the budget' if within else 'fastest'}: {timing.seconds:.2f} s per iteration")
    return with_measurement(plan, timing)


# ------------------------------------------------------------------------------------------------ the workspace

@dataclass(frozen=True)
class PlanRequest:
    """What a plan is sized for: ``covnet_plan_and_preprocess``'s ``--device``, ``--gpu-memory-gb`` and
    ``--seconds-per-iteration``. ``None``: as the workspace's plan was made (for the same device), else the
    default."""
    device: str | None = None
    gpu_memory_gb: float | None = None
    seconds_per_iteration: float | None = None

    def resolved(self, previous: Plan | None) -> "PlanRequest":
        device = self.device or (previous.device if previous is not None else DEFAULT_DEVICE)
        if device not in DEVICES:
            raise CovnetError(None, f"--device {device}: must be one of {', '.join(DEVICES)}")
        if device != "cpu" and self.seconds_per_iteration is not None:
            whose = "--device" if self.device else "the workspace's plan" if previous is not None else "the default"
            raise CovnetError(None, f"--seconds-per-iteration {self.seconds_per_iteration:g}: only a CPU plan has a "
                                    f"time budget, and this one is for {device} ({whose}); add --device cpu")
        same = previous if previous is not None and previous.device == device else None
        memory = self.gpu_memory_gb if self.gpu_memory_gb is not None else \
            same.gpu_memory_gb if same is not None else DEFAULT_GPU_MEMORY_GB
        seconds = None
        if device == "cpu":
            seconds = self.seconds_per_iteration if self.seconds_per_iteration is not None else \
                same.seconds_per_iteration if same is not None else DEFAULT_SECONDS_PER_ITERATION
        return PlanRequest(device, float(memory), None if seconds is None else float(seconds))

    def differences(self, plan: Plan) -> list[str]:
        """The flags (of a resolved request) that ask for another plan than ``plan`` was made for."""
        if self.device != plan.device:
            return [f"--device {self.device} (the plan's: {plan.device})"]
        asked = {"--gpu-memory-gb": (self.gpu_memory_gb, plan.gpu_memory_gb),
                 "--seconds-per-iteration": (self.seconds_per_iteration, plan.seconds_per_iteration)}
        return [f"{flag} {new:g} (the plan's: {old:g})" if isinstance(new, float) and isinstance(old, float)
                else f"{flag} {new} (the plan's: {old})" for flag, (new, old) in asked.items() if new != old]


@dataclass(frozen=True)
class PlanOutcome:
    plan: Plan
    replanned: bool           # False: the workspace's plans.json was kept as it is
    # (entry, planned value, value in plans.json): kept when not replanned, discarded when replanned
    edits: list[tuple[str, object, object]]
    why: str = ""             # why it planned afresh


def _as_json(plan: Plan) -> dict:
    return json.loads(json.dumps(plan.to_json()))


def _from_dataset_json(description: DatasetDescription) -> dict:
    return json.loads(json.dumps({"dataset_name": description.name, "labels": description.labels,
                                  "regions": description.regions, "channel_names": description.channel_names,
                                  "lateral_pairs": description.lateral_label_pairs}))


def _fingerprint(workspace: Workspace, description: DatasetDescription, cases: list[str], num_processes: int,
                 overwrite: bool) -> tuple[DatasetFingerprint, bool]:
    """The stored fingerprint if it is of exactly these raw files (and not ``overwrite``), else a new one (not
    yet saved); True when new."""
    if workspace.fingerprint_json.is_file() and not overwrite:
        stored = DatasetFingerprint.load(workspace.fingerprint_json)
        current = [(case, case_source(workspace.images_tr, workspace.labels_tr, case, description)) for case in cases]
        if [(case.case, case.source) for case in stored.cases] == current:
            return stored, False
    return extract_fingerprint(workspace.raw, cases, description, num_processes), True


def _load_plans(workspace: Workspace, strict: bool) -> tuple[Plan | None, Plan | None, str]:
    """plans.json (None if absent, from an older covnet or, unless ``strict``, invalid), the planner's copy
    (None if absent or unreadable) and why plans.json does not count."""
    current, why = None, ""
    if workspace.plans_json.is_file():
        try:
            data = read_json(workspace.plans_json, "")
            version = data.get("version") if isinstance(data, dict) else None
            if isinstance(version, int) and version < PLANS_VERSION:
                why = f"plans.json was made by an older covnet (plans version {version})"
            else:
                current = Plan.load(workspace.plans_json)
        except CovnetError:
            if strict:
                raise
            why = "plans.json does not load"
    try:
        planned = Plan.load(workspace.planned_plans_json) if workspace.planned_plans_json.is_file() else None
    except CovnetError:
        planned = None
    return current, planned, why


def plan_workspace(workspace: Workspace, request: PlanRequest = PlanRequest(), *, num_processes: int = 1,
                   overwrite: bool = False, replan: bool = False, measure_cpu_time: bool = True) -> PlanOutcome:
    """Validate raw/, fingerprint the labelled cases (reusing a fingerprint of exactly the same raw files unless
    ``overwrite``), and keep the workspace's plan or plan afresh (module docstring); write what changed.

    ``measure_cpu_time`` (CPU plans made afresh): time the plan's iteration here and fit the model to this
    machine (``measured_cpu_plan``), the only planning path that is not deterministic."""
    description, cases = validate_raw_dataset(workspace.raw)
    fingerprint, fingerprinted = _fingerprint(workspace, description, cases, num_processes, overwrite)
    afresh = replan or overwrite
    current, planned, why = _load_plans(workspace, strict=not afresh)
    reference = planned or current
    edits = plan_differences(_as_json(planned), _as_json(current)) if planned and current else []
    request = request.resolved(reference)
    if current is not None and not afresh:
        edited_from_dataset = sorted({name.split(".")[0] for name, _, _ in edits} & set(FROM_DATASET_JSON))
        if edited_from_dataset:
            raise CovnetError(workspace.plans_json, f"{', '.join(edited_from_dataset)} was edited by hand, but "
                                                    "comes from raw/dataset.json: change it there, then run with "
                                                    "--replan")
        reasons = (["the labelled cases in raw/ changed"] if fingerprinted else []) + \
            (["raw/dataset.json changed"] if {key: _as_json(reference)[key] for key in FROM_DATASET_JSON}
             != _from_dataset_json(description) else []) + request.differences(reference)
        if not reasons:
            return PlanOutcome(current, replanned=False, edits=edits)
        if edits:
            raise CovnetError(workspace.plans_json, f"has hand edits ({', '.join(name for name, _, _ in edits)}) "
                                                    f"that a new plan would discard, and one is needed: "
                                                    f"{'; '.join(reasons)}; run with --replan to plan afresh, then "
                                                    "edit again")
        why = "; ".join(reasons)
    if request.device == "cpu" and measure_cpu_time:
        plan = measured_cpu_plan(fingerprint, description, request, this_machine())
    else:
        plan = make_plan(fingerprint, description, request.gpu_memory_gb, request.device,
                         request.seconds_per_iteration or DEFAULT_SECONDS_PER_ITERATION,
                         this_machine() if request.device == "cpu" else cpu_time.CALIBRATION_MACHINE)
    if description.lateral_pairs is None and plan.lateral_pairs:
        log.info(f"lateral pairs {plan.lateral_pairs}: {description.lateral_pairs_reason}")
    plan.save(workspace.plans_json)
    plan.save(workspace.planned_plans_json)
    if fingerprinted:    # last: a kill before it leaves no fingerprint, so the rerun plans afresh
        fingerprint.save(workspace.fingerprint_json)
    return PlanOutcome(plan, replanned=True, edits=edits, why=why)


def plan_dataset(workspace: Workspace, gpu_memory_gb: float | None = None, num_processes: int = 1,
                 overwrite: bool = False, device: str | None = None, seconds_per_iteration: float | None = None,
                 measure_cpu_time: bool = True, replan: bool = False) -> Plan:
    """``plan_workspace``'s plan."""
    return plan_workspace(workspace, PlanRequest(device, gpu_memory_gb, seconds_per_iteration),
                          num_processes=num_processes, overwrite=overwrite, replan=replan,
                          measure_cpu_time=measure_cpu_time).plan
