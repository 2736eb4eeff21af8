"""From the labelled raw data to ``dataset_fingerprint.json`` and ``plans.json``."""
from __future__ import annotations

import numpy as np

from covnet.dataset import DatasetDescription, validate_raw_dataset
from covnet.planning import cpu_time, rules
from covnet.planning.fingerprint import DatasetFingerprint, case_source, extract_fingerprint
from covnet.planning.memory import estimate_training_memory_bytes
from covnet.planning.plans import (
    DEVICES,
    ZSCORE_SCHEME,
    NormalizationScheme,
    Plan,
    ResamplingSettings,
)
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.workspace import Workspace

GIB = 2 ** 30
log = logger(__name__)


def normalization_for_channel(channel_name: str, fingerprint: DatasetFingerprint) -> rules.Decision:
    if channel_name.strip().upper() == "CT":
        return rules.ct_normalization(fingerprint.foreground_intensity)
    return rules.Decision(NormalizationScheme(ZSCORE_SCHEME), "not CT: z-score each image with its own mean and std")


def make_plan(fingerprint: DatasetFingerprint, description: DatasetDescription, gpu_memory_gb: float = 8.0,
              device: str = "cuda", seconds_per_iteration: float = 1.0, time_scale: float = 1.0) -> Plan:
    """Apply the planning rules to a fingerprint for the device that will train. Pure: reads and writes nothing.

    ``device="cuda"``: memory is the limit (AMP memory model, ``gpu_memory_gb``). ``device="cpu"``: time is
    the limit (``seconds_per_iteration`` by ``covnet.planning.cpu_time``'s model times ``time_scale``), and the
    float32 memory estimate must also fit ``gpu_memory_gb``."""
    if device not in DEVICES:
        raise CovnetError(None, f"--device {device}: must be one of {', '.join(DEVICES)}")
    spacings, shapes = fingerprint.spacings, fingerprint.shapes_after_crop
    spacing = rules.choose_target_spacing(spacings, shapes)
    resampled = rules.resampled_shapes(shapes, spacings, spacing.value)
    median_shape = np.median(resampled, axis=0)
    in_channels = len(description.channel_names)
    num_classes = description.num_classes
    budget = gpu_memory_gb * GIB
    amp = device == "cuda"
    seconds = None
    try:
        if device == "cuda":
            patch, network = rules.choose_patch_and_network(spacing.value, median_shape, budget, in_channels,
                                                            num_classes, amp=True)
            network_reason = ("pool while ≥ 8 voxels and spacing within 2× of the finest poolable axis; kernels 3 "
                              "once within 2× of the finest; features 32·2^i ≤ 320; residual blocks 1-3-4-6-6-6")
        else:
            patch, network_decision, seconds = rules.choose_cpu_patch_and_network(
                spacing.value, median_shape, seconds_per_iteration, budget, in_channels, num_classes, time_scale)
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
        device_reason = (f"CPU plan: time is the budget ({seconds_per_iteration:g} s per iteration, float32; "
                         f"memory must also fit {gpu_memory_gb:g} GB)")
    normalization = {channel: normalization_for_channel(name, fingerprint)
                     for channel, name in description.channel_names.items()}
    estimate = estimate_training_memory_bytes(patch.value, batch.value, network, amp)
    reasons = {"device": device_reason, "target_spacing": spacing.reason, "patch_size": patch.reason,
               "batch_size": batch.reason, "network": network_reason}
    if device == "cpu":
        reasons["time_per_iteration"] = (f"covnet.planning.cpu_time model, calibrated on a "
                                         f"{cpu_time.CALIBRATION_THREADS}-thread CPU"
                                         + (f", × {time_scale:.3g} measured on this machine"
                                            if time_scale != 1.0 else ""))
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
                estimated_seconds_per_iteration=round(seconds, 4) if seconds is not None else None,
                reasons=reasons)


def measured_time_scale(plan: Plan, steps: int = 2) -> float:
    """Time the plan's own training iteration here (one warm-up, then ``steps``; the fastest counts) and
    return measured / estimated seconds: the factor that fits the CPU time model to this machine."""
    measured = min(cpu_time.time_training_step(plan.network, plan.patch_size, plan.batch_size, steps=steps))
    log.info("measured %.3f s per iteration for the planned network (estimated %.3f s)", measured,
             plan.estimated_seconds_per_iteration)
    return measured / plan.estimated_seconds_per_iteration


def plan_dataset(workspace: Workspace, gpu_memory_gb: float = 8.0, num_processes: int = 1,
                 overwrite: bool = False, device: str = "cuda", seconds_per_iteration: float = 1.0,
                 measure_cpu_time: bool = False) -> Plan:
    """Validate raw/, fingerprint the labelled cases, choose the plan and write both JSON files.

    An existing fingerprint of exactly the same, unchanged raw files is reused unless ``overwrite``.
    ``measure_cpu_time`` (CPU plans): time the model's choice on this machine once, rescale the time model by
    measured / estimated and plan again with it (the only planning path that is not deterministic)."""
    description, cases = validate_raw_dataset(workspace.raw)
    fingerprint_file = workspace.fingerprint_json
    fingerprint = None
    if fingerprint_file.is_file() and not overwrite:
        fingerprint = DatasetFingerprint.load(fingerprint_file)
        current = [(case, case_source(workspace.images_tr, workspace.labels_tr, case, description)) for case in cases]
        if [(case.case, case.source) for case in fingerprint.cases] != current:
            fingerprint = None
    if fingerprint is None:
        fingerprint = extract_fingerprint(workspace.raw, cases, description, num_processes)
        fingerprint.save(fingerprint_file)
    plan = make_plan(fingerprint, description, gpu_memory_gb, device, seconds_per_iteration)
    if measure_cpu_time and device == "cpu":
        plan = make_plan(fingerprint, description, gpu_memory_gb, device, seconds_per_iteration,
                         time_scale=measured_time_scale(plan))
    plan.save(workspace.plans_json)
    return plan
