"""Time a CPU plan's training iteration on this machine, the way ``covnet_train`` runs it.

What runs is training's own code on random data: the plan's ``ResidualEncoderUNet``, the deep-supervision
Dice + cross-entropy loss, SGD with Nesterov momentum and gradient clipping (``covnet.training.loop.train_epoch``),
fed by the training augmentation (``covnet.training.augmentation``) in ``workers`` background processes, as
many as ``covnet_train`` starts by default. On a machine with few cores those workers take CPU time from the
network; timing both together gives the figure training will see. The batches are random intensities and
labels at the pre-augmentation size: the augmentation's cost depends on the patch, the labels present and its
random draws, not on the anatomy.

Imports torch and the training package when called: only ``covnet_plan_and_preprocess`` (CPU plans, unless
``--no-measure-cpu-time``) and the benchmarks call it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from covnet.network.topology import Topology

# An untimed iteration first (the worker's first batch, oneDNN's first calls), then the timed ones, of which
# the median counts (one iteration disturbed by another job does not move it).
WARM_UP_ITERATIONS = 1
TIMED_ITERATIONS = 3
# The augmentation's cost varies with its random draws (a rotated sample costs several unrotated ones): its
# one-core figure is the mean over this many batches, or over as many as fit in LOADER_SECONDS.
LOADER_BATCHES = 8
LOADER_SECONDS = 3.0
# covnet_train's defaults that the timing depends on
GRADIENT_CLIP = 12.0
QUEUED_BATCHES_PER_WORKER = 2


@dataclass(frozen=True)
class IterationTiming:
    seconds: float            # wall seconds per training iteration (median), data workers running alongside
    loader_seconds: float     # one core's seconds to sample and augment one batch (mean over its random draws)
    data_wait_share: float    # share of ``seconds`` the network waited for a batch
    workers: int              # background augmentation processes (0: augmentation in the training process)


class RandomBatches:
    """A batchgenerators data loader that yields copies of one random batch at the pre-augmentation size
    (a copy costs about what reading the patch from a memory-mapped case costs)."""

    def __init__(self, read_size: Sequence[int], batch_size: int, in_channels: int, num_classes: int):
        rng = np.random.default_rng(0)
        self.data = rng.standard_normal((batch_size, in_channels, *read_size), dtype=np.float32)
        self.target = rng.integers(0, num_classes, (batch_size, 1, *read_size), dtype=np.int16)
        self._creator_pid = os.getpid()

    def set_thread_id(self, thread_id: int) -> None:
        """batchgenerators calls this in each worker: exit with the planning process, even after a kill -9."""
        from covnet.runtime.parallel import die_with_parent

        if os.getpid() != self._creator_pid:
            die_with_parent(self._creator_pid)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {"data": self.data.copy(), "target": self.target.copy()}


def loader_seconds(batches: RandomBatches, transforms, count: int = LOADER_BATCHES,
                   limit_seconds: float = LOADER_SECONDS) -> float:
    """Mean CPU seconds of sampling + augmenting a batch on one thread, as one worker process does it (CPU time,
    not wall time: another job on the cores does not inflate it), over ``count`` batches or as many as fit in
    ``limit_seconds``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds, started = [], time.perf_counter()
        while len(seconds) < count and (not seconds or time.perf_counter() - started < limit_seconds):
            begin = time.process_time()
            transforms(**next(batches))
            seconds.append(time.process_time() - begin)
        return float(np.mean(seconds))
    finally:
        torch.set_num_threads(threads)


def _training_parts(topology: Topology, ignore_label: int | None):
    """covnet_train's network (seeded), optimizer, loss and (disabled: a CPU needs none) gradient scaler."""
    import torch

    from covnet.network.unet import ResidualEncoderUNet
    from covnet.training.losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights

    torch.manual_seed(0)
    network = ResidualEncoderUNet(topology)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    loss = DeepSupervisionLoss(DiceCELoss(batch_dice=True, ignore_label=ignore_label),
                               deep_supervision_weights(len(topology.deep_supervision_scales)))
    return network, optimizer, loss, torch.amp.GradScaler("cpu", enabled=False)


def measure_training_iteration(topology: Topology, patch_size: Sequence[int], batch_size: int, *, workers: int,
                               lateral_pairs: Sequence[Sequence[int]] = (), ignore_label: int | None = None,
                               iterations: int = TIMED_ITERATIONS, bfloat16: bool = False) -> IterationTiming:
    """Seconds per training iteration of this network and patch here, with ``workers`` augmentation processes
    (0: augmentation in this process, between the steps), after ``WARM_UP_ITERATIONS`` untimed ones; in float32,
    or with ``bfloat16`` under bfloat16 autocast (a CPU plan's ``mixed_precision``), as training will run."""
    import torch
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

    from covnet.training.augmentation import training_read_size, training_transforms
    from covnet.training.loop import train_epoch

    scales = topology.deep_supervision_scales
    transforms = training_transforms(patch_size, scales, lateral_pairs=[tuple(pair) for pair in lateral_pairs],
                                     ignore_label=ignore_label)
    batches = RandomBatches(training_read_size(patch_size), batch_size, topology.in_channels, topology.num_classes)
    loader = loader_seconds(batches, transforms)
    network, optimizer, loss, scaler = _training_parts(topology, ignore_label)
    device = torch.device("cpu")
    pipeline = (MultiThreadedAugmenter(batches, transforms, workers, num_cached_per_queue=QUEUED_BATCHES_PER_WORKER,
                                       seeds=None) if workers else SingleThreadedAugmenter(batches, transforms))

    def timed(count: int):
        return train_epoch(network, pipeline, loss, optimizer, scaler, count, device, GRADIENT_CLIP,
                           mixed_precision=bfloat16)

    try:
        timed(WARM_UP_ITERATIONS)
        results = [timed(1) for _ in range(iterations)]
    finally:
        if workers:
            pipeline._finish()
    seconds = [result.seconds for result in results]
    return IterationTiming(seconds=float(np.median(seconds)), loader_seconds=loader,
                           data_wait_share=sum(result.data_seconds for result in results) / sum(seconds),
                           workers=workers)


class NetworkStep:
    """The network's part of a training iteration, training's own step (``train_epoch``) on one fixed random
    batch at the patch size (no augmentation), in float32 or under bfloat16 autocast: for comparing precisions
    (benchmarks/cpu_train_precision.py). Each call runs one iteration and returns its wall seconds."""

    def __init__(self, topology: Topology, patch_size: Sequence[int], batch_size: int, *, bfloat16: bool):
        import torch

        generator = torch.Generator().manual_seed(0)
        self.batch = {"data": torch.randn(batch_size, topology.in_channels, *patch_size, generator=generator),
                      "target": [torch.randint(0, topology.num_classes, (batch_size, 1, *shape), generator=generator)
                                 for _, *shape in topology.logit_shapes(patch_size)]}
        self.parts = _training_parts(topology, None)
        self.bfloat16 = bfloat16

    def __call__(self) -> float:
        import itertools

        import torch

        from covnet.training.loop import train_epoch

        network, optimizer, loss, scaler = self.parts
        return train_epoch(network, itertools.repeat(self.batch), loss, optimizer, scaler, 1, torch.device("cpu"),
                           GRADIENT_CLIP, mixed_precision=self.bfloat16).seconds
