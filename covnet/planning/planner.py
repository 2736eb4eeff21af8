"""From the labelled raw data to ``dataset_fingerprint.json`` and ``plans.json``."""
from __future__ import annotations

import numpy as np

from covnet.dataset import DatasetDescription, validate_raw_dataset
from covnet.errors import CovnetError
from covnet.planning import rules
from covnet.planning.fingerprint import DatasetFingerprint, case_source, extract_fingerprint
from covnet.planning.memory import estimate_training_memory_bytes
from covnet.planning.plans import IGNORE_LABEL_NAME, ZSCORE_SCHEME, NormalizationScheme, Plan, ResamplingSettings
from covnet.workspace import Workspace

GIB = 2 ** 30


def normalization_for_channel(channel_name: str, fingerprint: DatasetFingerprint) -> rules.Decision:
    if channel_name.strip().upper() == "CT":
        return rules.ct_normalization(fingerprint.foreground_intensity)
    return rules.Decision(NormalizationScheme(ZSCORE_SCHEME), "not CT: z-score each image with its own mean and std")


def make_plan(fingerprint: DatasetFingerprint, description: DatasetDescription, gpu_memory_gb: float = 8.0) -> Plan:
    """Apply the planning rules to a fingerprint. Pure: reads and writes nothing."""
    spacings, shapes = fingerprint.spacings, fingerprint.shapes_after_crop
    spacing = rules.choose_target_spacing(spacings, shapes)
    resampled = rules.resampled_shapes(shapes, spacings, spacing.value)
    median_shape = np.median(resampled, axis=0)
    in_channels = len(description.channel_names)
    num_classes = max(v for name, v in description.labels.items() if name != IGNORE_LABEL_NAME) + 1
    budget = gpu_memory_gb * GIB
    try:
        patch, network = rules.choose_patch_and_network(spacing.value, median_shape, budget, in_channels, num_classes)
    except ValueError as error:
        raise CovnetError(None, f"--gpu-memory-gb {gpu_memory_gb:g}: {error}; give covnet more memory") from None
    batch = rules.choose_batch_size(patch.value, network, budget, float(np.sum(np.prod(resampled, axis=1))))
    normalization = {channel: normalization_for_channel(name, fingerprint)
                     for channel, name in description.channel_names.items()}
    estimate = estimate_training_memory_bytes(patch.value, batch.value, network)
    reasons = {"target_spacing": spacing.reason, "patch_size": patch.reason, "batch_size": batch.reason,
               "network": "pool while ≥ 8 voxels and spacing within 2× of the finest poolable axis; kernels 3 "
                          "once within 2× of the finest; features 32·2^i ≤ 320; residual blocks 1-3-4-6-6-6"}
    reasons.update({f"normalization_{channel}": decision.reason for channel, decision in normalization.items()})
    return Plan(dataset_name=description.name, labels=dict(description.labels), regions=dict(description.regions),
                channel_names=dict(description.channel_names), target_spacing=spacing.value,
                lateral_pairs=description.lateral_label_pairs,
                median_shape=[float(v) for v in median_shape], patch_size=patch.value, batch_size=batch.value,
                network=network, normalization={c: d.value for c, d in normalization.items()},
                resampling=ResamplingSettings(image_order=3, segmentation_order=1, order_z=0,
                                              anisotropy_threshold=rules.ANISOTROPY_THRESHOLD),
                gpu_memory_gb=float(gpu_memory_gb), estimated_memory_gb=round(estimate / GIB, 3), reasons=reasons)


def plan_dataset(workspace: Workspace, gpu_memory_gb: float = 8.0, num_processes: int = 1,
                 overwrite: bool = False) -> Plan:
    """Validate raw/, fingerprint the labelled cases, choose the plan and write both JSON files.

    An existing fingerprint of exactly the same, unchanged raw files is reused unless ``overwrite``."""
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
    plan = make_plan(fingerprint, description, gpu_memory_gb)
    plan.save(workspace.plans_json)
    return plan
