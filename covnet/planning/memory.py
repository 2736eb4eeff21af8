"""Peak training-memory estimate for the residual-encoder UNet (``covnet.training.network``).

Pure arithmetic on the ``network`` entry of plans.json: planning must not import torch or training code.

Model (float32, one forward + backward + SGD-with-momentum step):

    total = 3 × 4 bytes × parameters                       (weights, gradients, momentum)
          + CALIBRATED_BYTES_PER_ACTIVATION × batch_size × estimate_activation_elements(...)

``estimate_activation_elements`` counts, per sample, the elements of the tensors autograd keeps for the
backward pass: the input; per conv-norm-nonlin the conv output (kept by the norm) and the in-place
nonlinearity's output (kept by the nonlinearity and the next conv); per residual block 4 such maps (two
conv outputs, the inner activation, the block output) plus 1 for a projection skip; per decoder stage the
concatenation (2 × features) and 2 maps per conv; per returned logits tensor LOSS_MAPS_PER_LOGIT maps of
``num_classes`` channels (logits, log-softmax of the cross-entropy, softmax and one-hot target of the Dice).
The count was checked against the tensors torch's ``saved_tensors_hooks`` sees (benchmarks/calibrate_memory.py
prints both). What autograd keeps is not the whole peak: gradients of activations and conv workspaces are
alive at the same time, which is what the calibrated constant (> 4 bytes) absorbs.

Calibration (benchmarks/calibrate_memory.py, table in BENCHMARKS.md "Network memory calibration"):
CALIBRATED_BYTES_PER_ACTIVATION = 4.78, the least-squares fit through the origin of measured activation
memory against batch_size × estimate_activation_elements over 10 configurations (4 topologies: isotropic
4-stage, anisotropic 5-stage, 4-stage without deep supervision, the nnU-Net-sized 6-stage [32..320] one;
0.3–3.0 GB), max relative error 4.7% (ratios 4.57–4.94 bytes/element). Measured 2026-11-26 on CPU (2-core
AMD EPYC, 24 GiB, torch 2.13.0+cpu, oneDNN convolutions), each configuration in a fresh process: resident-set
growth (VmHWM after clearing it, minus /proc/self/statm before the step) of one forward + Dice/CE loss +
backward + SGD step, parameter gradients and momentum allocated beforehand, glibc mmap threshold fixed so
freed tensors leave the resident set (an earlier run with glibc's default and a larger warm-up step
scattered 4.2–6.6 bytes/element, max error 25%). The hook-counted saved tensors matched
estimate_activation_elements within 0.04% in every configuration.

Not measured: the CUDA path of the script (``--device cuda``: torch.cuda.max_memory_allocated growth, float32
and fp16 autocast) exists but was not run, as this machine has no GPU. With AMP on a GPU, conv outputs are
kept in half precision, so the bytes per element should come out lower (expected, not measured: roughly 2–3
instead of 4.78, as norms and the loss may keep float32 copies), while cuDNN workspaces and the caching
allocator's reserve come on top of max_memory_allocated; parameters, gradients and momentum stay float32.
Until the script is run on a GPU, this float32 CPU constant is a conservative choice for AMP training.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from math import prod
from typing import Sequence

from covnet.errors import CovnetError

FLOAT32_BYTES = 4
# weights + gradients + SGD momentum buffer, each float32
PARAMETER_COPIES = 3
LOSS_MAPS_PER_LOGIT = 4
# bytes per counted activation element, float32, fitted by benchmarks/calibrate_memory.py (see above)
CALIBRATED_BYTES_PER_ACTIVATION = 4.78

NETWORK_PLAN_KEYS = ("features_per_stage", "kernel_sizes", "strides", "n_blocks_per_stage",
                     "n_conv_per_stage_decoder")


def _fail(problem: str) -> None:
    raise CovnetError(None, f"network plan: {problem}")


def _is_positive_int(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) > 0  # accepts numpy integers, rejects floats
    except TypeError:
        return False


def validate_network_plan(network_plan: dict) -> None:
    """Raise CovnetError unless ``network_plan`` is a consistent topology (see module docstring)."""
    if not isinstance(network_plan, dict):
        _fail(f"expected a dict, got {type(network_plan).__name__}")
    missing = [key for key in NETWORK_PLAN_KEYS if key not in network_plan]
    if missing:
        _fail(f"missing {', '.join(missing)}")
    features = network_plan["features_per_stage"]
    n_stages = len(features)
    if n_stages < 2:
        _fail("needs at least 2 stages")
    for key in ("features_per_stage", "n_blocks_per_stage"):
        values = network_plan[key]
        if len(values) != n_stages or not all(_is_positive_int(v) for v in values):
            _fail(f"{key} must be {n_stages} positive integers, got {values}")
    decoder = network_plan["n_conv_per_stage_decoder"]
    if len(decoder) != n_stages - 1 or not all(_is_positive_int(v) for v in decoder):
        _fail(f"n_conv_per_stage_decoder must be {n_stages - 1} positive integers, got {decoder}")
    for key in ("kernel_sizes", "strides"):
        triples = network_plan[key]
        if len(triples) != n_stages or not all(
                len(t) == 3 and all(_is_positive_int(v) for v in t) for t in triples):
            _fail(f"{key} must be {n_stages} (z, y, x) triples of positive integers, got {triples}")
    if any(k % 2 == 0 for kernel in network_plan["kernel_sizes"] for k in kernel):
        _fail(f"kernel sizes must be odd, got {network_plan['kernel_sizes']}")


def stage_shapes(patch_size: Sequence[int], network_plan: dict) -> list[tuple[int, int, int]]:
    """Spatial (z, y, x) shape of each encoder stage's output; the patch must divide by all strides."""
    validate_network_plan(network_plan)
    if len(patch_size) != 3 or not all(_is_positive_int(s) for s in patch_size):
        _fail(f"patch size must be 3 positive integers, got {list(patch_size)}")
    shapes, shape = [], tuple(int(s) for s in patch_size)
    for stride in network_plan["strides"]:
        if any(size % step for size, step in zip(shape, stride)):
            _fail(f"patch size {list(patch_size)} is not divisible by the strides {network_plan['strides']}")
        shape = tuple(size // step for size, step in zip(shape, stride))
        shapes.append(shape)
    return shapes


def estimate_activation_elements(patch_size: Sequence[int], network_plan: dict, in_channels: int,
                                 num_classes: int) -> int:
    """Elements of the feature maps kept for backward, for ONE sample (multiply by the batch size)."""
    voxels = [prod(shape) for shape in stage_shapes(patch_size, network_plan)]
    features = network_plan["features_per_stage"]
    n_stages = len(features)
    deep_supervision = bool(network_plan.get("deep_supervision", True))

    elements = in_channels * voxels[0]
    elements += 2 * features[0] * voxels[0]  # stem conv output + activation
    channels = features[0]
    for stage in range(n_stages):
        per_map = features[stage] * voxels[stage]
        elements += 4 * per_map * network_plan["n_blocks_per_stage"][stage]
        if channels != features[stage] or any(s != 1 for s in network_plan["strides"][stage]):
            elements += per_map  # projection skip conv output
        channels = features[stage]

    for j, n_convs in enumerate(network_plan["n_conv_per_stage_decoder"]):
        target = n_stages - 2 - j
        per_map = features[target] * voxels[target]
        elements += 2 * per_map + 2 * n_convs * per_map  # concatenation + conv outputs and activations
        if deep_supervision or target == 0:
            elements += LOSS_MAPS_PER_LOGIT * num_classes * voxels[target]
    return elements


def count_parameters(network_plan: dict, in_channels: int, num_classes: int) -> int:
    """Number of trainable parameters of ``build_network(network_plan, in_channels, num_classes)``."""
    validate_network_plan(network_plan)
    features = network_plan["features_per_stage"]
    kernels = [prod(k) for k in network_plan["kernel_sizes"]]
    n_stages = len(features)

    def conv_norm(c_in: int, c_out: int, kernel_volume: int) -> int:
        return c_in * c_out * kernel_volume + c_out + 2 * c_out  # weight, bias, affine norm

    total = conv_norm(in_channels, features[0], kernels[0])
    channels = features[0]
    for stage in range(n_stages):
        f, k = features[stage], kernels[stage]
        for block in range(network_plan["n_blocks_per_stage"][stage]):
            c_in = channels if block == 0 else f
            total += conv_norm(c_in, f, k) + conv_norm(f, f, k)
            if block == 0 and (c_in != f or any(s != 1 for s in network_plan["strides"][stage])):
                total += c_in * f + 2 * f  # bias-free 1×1×1 projection + norm
        channels = f
    for j, n_convs in enumerate(network_plan["n_conv_per_stage_decoder"]):
        below, target = n_stages - 1 - j, n_stages - 2 - j
        f = features[target]
        total += features[below] * f * prod(network_plan["strides"][below]) + f  # transposed conv
        total += conv_norm(2 * f, f, kernels[target]) + (n_convs - 1) * conv_norm(f, f, kernels[target])
        total += f * num_classes + num_classes  # segmentation head
    return total


@dataclass(frozen=True)
class TrainingMemoryEstimate:
    parameter_bytes: int  # weights + gradients + momentum
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.activation_bytes


def estimate_training_memory(patch_size: Sequence[int], batch_size: int, network_plan: dict,
                             in_channels: int, num_classes: int) -> TrainingMemoryEstimate:
    if not _is_positive_int(batch_size):
        _fail(f"batch size must be a positive integer, got {batch_size}")
    parameters = count_parameters(network_plan, in_channels, num_classes)
    elements = estimate_activation_elements(patch_size, network_plan, in_channels, num_classes)
    return TrainingMemoryEstimate(
        parameter_bytes=PARAMETER_COPIES * FLOAT32_BYTES * parameters,
        activation_bytes=round(CALIBRATED_BYTES_PER_ACTIVATION * batch_size * elements),
    )


def estimate_training_memory_bytes(patch_size: Sequence[int], batch_size: int, network_plan: dict,
                                   in_channels: int, num_classes: int) -> int:
    """Estimated peak float32 training memory in bytes (see the module docstring for the model)."""
    return estimate_training_memory(patch_size, batch_size, network_plan, in_channels, num_classes).total_bytes
