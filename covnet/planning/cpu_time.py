"""Seconds per training iteration on a CPU, estimated from the network's arithmetic and the data pipeline's
share (for CPU plans).

Pure arithmetic on a ``covnet.network.topology.Topology``, like ``covnet.planning.memory``: the module
imports no torch (``time_training_step`` imports it when called, for the calibration benchmark;
``covnet.planning.cpu_measure`` times a whole training iteration on the planning machine).

Model of the network's part of one iteration (forward + deep-supervision Dice/CE loss + backward +
SGD-with-momentum step):

    network = SECONDS_PER_MAC × batch × training_macs(patch)            (convolutions, forward and backward)
            + SECONDS_PER_ELEMENT × batch × activation elements(patch)  (norms, nonlinearities, adds, loss)
            + SECONDS_PER_PARAMETER × parameters                        (weight gradients' reduction, SGD step)
            + SECONDS_PER_ITERATION                                     (fixed overhead)

``training_macs`` is 3 × the forward multiply-accumulates of every convolution (backward computes the
gradient of the input and of the weight, each as many MACs as the forward). The activation elements are
``covnet.planning.memory.estimate_activation_elements``: the maps the elementwise layers read and write.

The constants are float32's. A machine that trains in bfloat16 (``CpuMachine.bfloat16``: a CPU with AMX or
AVX512-BF16, ``covnet.runtime.precision``) takes ``BFLOAT16_NETWORK_FACTOR`` × the network's float32 seconds; the
data pipeline's part is the same in either precision.

The data pipeline's part: sampling and augmenting one batch costs one core

    loader = SECONDS_PER_AUGMENTED_VOXEL × batch × patch voxels + SECONDS_PER_LOADED_BATCH

Nearly all of it is copying the pre-augmentation block, which for a 3D patch is about 13.5× the patch's voxels
(room to rotate by ±30° and scale by 1.4); the constants describe 3D patches and overestimate "dummy 2D" ones
(about 4×, rotated in-plane only) by about 3×. ``covnet_train`` runs the loader in background workers
(``CpuMachine.workers``) on the network's cores, whose threads already use every core: the iteration is the
network plus the workers' CPU time spread over the cores, or the loader's own pace if that is slower
(``iteration_seconds``); with no workers the two run one after the other.

Calibration (``benchmarks/calibrate_cpu_time.py``, table in BENCHMARKS.md "CPU time model"): non-negative
least squares on relative error over 15 timed configurations (the 7 network sizes of CPU plans, 0.1–2.8 s per
iteration, fastest of 4 steps each); 2-core AMD EPYC (AVX-512, AMX), torch 2.13.0+cpu, 2 threads, float32,
2026-11-26, other jobs sharing the cores. Max relative error 37%, rms 19%: small-channel networks on large
patches run slower per element than the linear model says (maps beyond the caches), and contention left
noise. The constants describe that machine: ``covnet_plan_and_preprocess`` therefore times the chosen
iteration on the planning machine (unless ``--no-measure-cpu-time``) and rescales the model by
measured / estimated (``CpuMachine.scale``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
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
# fitted by benchmarks/calibrate_cpu_time.py --loader (see BENCHMARKS.md "CPU plan: estimate vs measured")
SECONDS_PER_AUGMENTED_VOXEL = 1.2e-7
SECONDS_PER_LOADED_BATCH = 0.0
# backward = gradient of the input + gradient of the weight, each as many MACs as the forward
TRAINING_MAC_FACTOR = 3
# bfloat16 autocast / float32 seconds of the network's part of a training iteration: benchmarks/
# cpu_train_precision.py speed, 2026-12-08, 2-core AMD EPYC (AVX512-BF16, no AMX), torch 2.13.0: the CPU plan's
# network 0.52 (2 threads, quiet machine); the 7 CPU network sizes 0.52-0.56, the two smallest 0.66 (1 thread,
# CPU seconds, busy machine). Results in benchmarks/results/cpu_train_precision/.
BFLOAT16_NETWORK_FACTOR = 0.55


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


def estimate_seconds_per_iteration(patch_size: Sequence[int], batch_size: int, topology: Topology) -> float:
    """Estimated seconds of the network's part of one training iteration on the calibration CPU."""
    constants = (SECONDS_PER_MAC, SECONDS_PER_ELEMENT, SECONDS_PER_PARAMETER, SECONDS_PER_ITERATION)
    return sum(c * t for c, t in zip(constants, cost_terms(patch_size, batch_size, topology)))


def estimate_loader_seconds(patch_size: Sequence[int], batch_size: int) -> float:
    """One core's seconds to sample and augment one batch (the mean over the augmentation's random draws)."""
    return SECONDS_PER_AUGMENTED_VOXEL * batch_size * prod(patch_size) + SECONDS_PER_LOADED_BATCH


def iteration_seconds(network: float, loader: float, workers: int, cores: int) -> float:
    """Wall seconds of one iteration from the network's seconds (all cores) and the loader's (one core).

    No workers: one after the other. Workers: they run alongside, but on the network's cores, so their CPU time
    spread over the cores adds to the network's; and the loader cannot deliver faster than ``loader / workers``."""
    if workers == 0:
        return network + loader
    return max(network + loader / max(cores, 1), loader / workers)


@dataclass(frozen=True)
class CpuMachine:
    """The machine a CPU plan is timed for: its cores, the augmentation workers ``covnet_train`` starts there
    by default, whether it trains in bfloat16 (the plan's ``mixed_precision``), and ``scale``, the factor that
    fits the model to it (measured / estimated; 1: the model as calibrated)."""
    cores: int
    workers: int
    scale: float = 1.0
    bfloat16: bool = False

    def rescaled(self, scale: float) -> "CpuMachine":
        return replace(self, scale=scale)

    def describe(self) -> str:
        workers = (f"{self.workers} augmentation worker{'s' if self.workers != 1 else ''}" if self.workers
                   else "augmentation in the training process")
        return f"{self.cores} core{'s' if self.cores != 1 else ''}, {workers}, {self.precision}"

    @property
    def precision(self) -> str:
        return "bfloat16" if self.bfloat16 else "float32"


# The machine the constants were fitted on, with covnet_train's default of one worker on two cores, in float32.
CALIBRATION_MACHINE = CpuMachine(cores=CALIBRATION_THREADS, workers=1)


@dataclass(frozen=True)
class IterationEstimate:
    network: float     # the network's seconds per iteration in the machine's precision, as calibrated (unscaled)
    loader: float      # one core's seconds per batch of sampling and augmentation, as calibrated (unscaled)
    seconds: float     # the iteration on the machine: combined by ``iteration_seconds``, times its scale


def estimate_iteration(patch_size: Sequence[int], batch_size: int, topology: Topology,
                       machine: CpuMachine = CALIBRATION_MACHINE) -> IterationEstimate:
    network = estimate_seconds_per_iteration(patch_size, batch_size, topology)
    if machine.bfloat16:
        network *= BFLOAT16_NETWORK_FACTOR
    loader = estimate_loader_seconds(patch_size, batch_size)
    return IterationEstimate(network, loader,
                             machine.scale * iteration_seconds(network, loader, machine.workers, machine.cores))


def time_training_step(topology: Topology, patch_size: Sequence[int], batch_size: int, steps: int = 2,
                       warm_up: int = 1, threads: int | None = None, bfloat16: bool = False) -> list[float]:
    """Wall seconds of ``steps`` real float32 (``bfloat16``: the forward under bfloat16 autocast) training
    iterations (after ``warm_up`` untimed ones) of the network on random data: forward, cross-entropy + soft Dice
    on every deep-supervision output, backward, SGD with Nesterov momentum. Imports torch; used by the
    calibration script."""
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
            with torch.autocast("cpu", enabled=bfloat16):
                outputs = network(x)
            outputs = [output.float() for output in (outputs if isinstance(outputs, list) else [outputs])]
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
