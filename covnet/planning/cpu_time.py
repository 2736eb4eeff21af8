"""Seconds per training iteration on a CPU, estimated from the network's arithmetic (for CPU plans).

Pure arithmetic on a ``covnet.network.topology.Topology``, like ``covnet.planning.memory``: the module
imports no torch (``time_training_step`` imports it when called, for ``--measure-cpu-time`` and the
calibration benchmark).

Model of one iteration (forward + deep-supervision Dice/CE loss + backward + SGD-with-momentum step):

    seconds = SECONDS_PER_MAC × batch × training_macs(patch)            (convolutions, forward and backward)
            + SECONDS_PER_ELEMENT × batch × activation elements(patch)  (norms, nonlinearities, adds, loss)
            + SECONDS_PER_PARAMETER × parameters                        (weight gradients' reduction, SGD step)
            + SECONDS_PER_ITERATION                                     (fixed overhead)

``training_macs`` is 3 × the forward multiply-accumulates of every convolution (backward computes the
gradient of the input and of the weight, each as many MACs as the forward). The activation elements are
``covnet.planning.memory.estimate_activation_elements``: the maps the elementwise layers read and write.

Calibration (``benchmarks/calibrate_cpu_time.py``, table in BENCHMARKS.md "CPU time model"): non-negative
least squares on relative error over 15 timed configurations (the 7 network sizes of CPU plans, 0.1–2.8 s per
iteration, fastest of 4 steps each); 2-core AMD EPYC (AVX-512, AMX), torch 2.13.0+cpu, 2 threads, float32,
2026-11-26, other jobs sharing the cores. Max relative error 37%, rms 19%: small-channel networks on large
patches run slower per element than the linear model says (maps beyond the caches), and contention left
noise. The constants describe that machine: on another CPU, plan with ``--measure-cpu-time``, which times
the chosen configuration there and rescales the model.
"""
from __future__ import annotations

import time
from math import prod
from typing import Sequence

from covnet.network.topology import Topology
from covnet.planning.memory import estimate_activation_elements

# fitted by benchmarks/calibrate_cpu_time.py (see BENCHMARKS.md "CPU time model")
SECONDS_PER_MAC = 5.03e-12        # ≈ 200 GMAC/s over forward + backward convolutions
SECONDS_PER_ELEMENT = 8.12e-9     # per counted activation element (norms, nonlinearities, adds, loss, copies)
SECONDS_PER_PARAMETER = 2.41e-10
SECONDS_PER_ITERATION = 0.0205
CALIBRATION_THREADS = 2
# backward = gradient of the input + gradient of the weight, each as many MACs as the forward
TRAINING_MAC_FACTOR = 3


def forward_macs(patch_size: Sequence[int], topology: Topology) -> int:
    """Multiply-accumulates of every convolution in one training-mode forward pass, for ONE sample."""
    voxels = [prod(shape) for shape in topology.stage_shapes(patch_size)]
    macs = topology.in_channels * topology.features_per_stage[0] * prod(topology.kernel_sizes[0]) * voxels[0]
    for block in topology.encoder_blocks():
        out_voxels, kernel = voxels[block.stage], prod(block.kernel_size)
        macs += block.in_channels * block.out_channels * kernel * out_voxels
        macs += block.out_channels * block.out_channels * kernel * out_voxels
        if block.has_projection:
            macs += block.in_channels * block.out_channels * out_voxels
    heads = set(topology.output_stages(training=True))
    for stage in topology.decoder_stages():
        f, out_voxels, kernel = stage.channels, voxels[stage.stage], prod(stage.kernel_size)
        macs += stage.below_channels * f * out_voxels  # transposed conv with kernel = stride
        macs += (2 * f * f + (stage.n_convs - 1) * f * f) * kernel * out_voxels
        if stage.stage in heads:
            macs += f * topology.num_classes * out_voxels
    return macs


def training_macs(patch_size: Sequence[int], topology: Topology) -> int:
    """Forward + backward multiply-accumulates for one sample."""
    return TRAINING_MAC_FACTOR * forward_macs(patch_size, topology)


def cost_terms(patch_size: Sequence[int], batch_size: int, topology: Topology) -> tuple[float, float, float, float]:
    """The model's regressors: (MACs, activation elements, parameters, 1) of one iteration."""
    return (float(batch_size * training_macs(patch_size, topology)),
            float(batch_size * estimate_activation_elements(patch_size, topology)),
            float(topology.parameter_count()), 1.0)


def estimate_seconds_per_iteration(patch_size: Sequence[int], batch_size: int, topology: Topology,
                                   scale: float = 1.0) -> float:
    """Estimated seconds of one training iteration on the calibration CPU, times ``scale`` (a measured
    ratio for another machine, see ``time_training_step``)."""
    constants = (SECONDS_PER_MAC, SECONDS_PER_ELEMENT, SECONDS_PER_PARAMETER, SECONDS_PER_ITERATION)
    return scale * sum(c * t for c, t in zip(constants, cost_terms(patch_size, batch_size, topology)))


def time_training_step(topology: Topology, patch_size: Sequence[int], batch_size: int, steps: int = 2,
                       warm_up: int = 1, threads: int | None = None) -> list[float]:
    """Wall seconds of ``steps`` real float32 training iterations (after ``warm_up`` untimed ones) of the
    network on random data: forward, cross-entropy + soft Dice on every deep-supervision output, backward,
    SGD with Nesterov momentum. Imports torch; used by ``--measure-cpu-time`` and the calibration script."""
    import torch
    import torch.nn.functional as F

    from covnet.network.unet import ResidualEncoderUNet

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        network = ResidualEncoderUNet(topology).train()
        optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
        x = torch.randn(batch_size, topology.in_channels, *patch_size, generator=generator)
        targets = [torch.randint(0, topology.num_classes, (batch_size, *shape), generator=generator)
                   for _, *shape in topology.logit_shapes(patch_size)]

        def step():
            outputs = network(x)
            outputs = outputs if isinstance(outputs, list) else [outputs]
            loss = 0.0
            for weight, (logits, target) in enumerate(zip(outputs, targets)):
                probabilities = torch.softmax(logits, 1)
                one_hot = F.one_hot(target, topology.num_classes).permute(0, 4, 1, 2, 3).float()
                intersection = (probabilities * one_hot).sum((2, 3, 4))
                dice = (2 * intersection + 1e-5) / (probabilities.sum((2, 3, 4)) + one_hot.sum((2, 3, 4)) + 1e-5)
                loss = loss + 0.5 ** weight * (F.cross_entropy(logits, target) + 1 - dice[:, 1:].mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(warm_up):
            step()
        seconds = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - started)
        return seconds
    finally:
        torch.set_num_threads(previous_threads)
