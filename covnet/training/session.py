"""The state of one training run and its epoch loop: network, optimizer, loss, data, history, checkpoints.

Nothing here reads flags or paths of its own: ``covnet.training.run`` hands over the job (plan, cases, model
folder) and the settings. Under DDP every rank runs a session; only rank 0 saves and logs.

Seeding: ``settings.seed`` and the job's name seed the network's initialisation (the same on every rank; the
folds of one split start from different weights, as unseeded folds would) and then python's, numpy's and
torch's global generators, which the in-process augmentation draws from (a different stream per rank); the
patch sampler has its own generator from the same seed. On a CPU with ``--num-workers 0`` two runs of one job
with one seed therefore give the same losses.

Precision (``training_precision``): plans.json's ``mixed_precision`` where the device computes it natively
(float16 autocast with a GradScaler on CUDA, bfloat16 autocast on a CPU with AMX or AVX512-BF16), unless
``--fp32``; the weights, the loss and the optimizer's state stay float32 either way.
"""
from __future__ import annotations

import math
import random
import time
import zlib

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from covnet.checkpoint import Checkpoint, capture_rng_state, restore_rng_state
from covnet.image.orientation import MIRROR_AXES
from covnet.network.unet import ResidualEncoderUNet
from covnet.runtime.environment import environment_record
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.runtime.precision import autocast_available, autocast_dtype_name
from covnet.training.augmentation import training_read_size, training_transforms, validation_transforms
from covnet.training.data import PatchSampler, rank_composition
from covnet.training.distributed import DistributedContext
from covnet.training.loop import train_epoch, validate_patches
from covnet.training.losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights
from covnet.training.progress import History, plot_progress
from covnet.planning.plans import Plan
from covnet.training.settings import TrainingJob, TrainingSettings

log = logger(__name__)
POLY_EXPONENT = 0.9
# Under DDP every output must take part in the loss, or DDP waits for gradients that never come.
DDP_COARSEST_WEIGHT = 1e-6


def poly_learning_rate(initial_lr: float, epoch: int, epochs: int) -> float:
    """nnU-Net's schedule, stepped once per epoch: ``initial · (1 − epoch/epochs)^0.9``."""
    return initial_lr * (1 - epoch / epochs) ** POLY_EXPONENT


def training_precision(plan: Plan, settings: TrainingSettings, device: torch.device) -> tuple[bool, str]:
    """Whether training runs under autocast, and a line saying in what and why."""
    if settings.fp32:
        return False, "float32 (--fp32)"
    if not plan.mixed_precision:
        return False, "float32 (plans.json's mixed_precision is false)"
    if not autocast_available(device):
        return False, ("float32: plans.json's mixed_precision asks for bfloat16, but this CPU has neither AMX nor "
                       "AVX512-BF16 and would emulate it, slower than float32")
    scaler = ", a GradScaler" if device.type == "cuda" else ""
    return True, (f"{autocast_dtype_name(device)} autocast (plans.json's mixed_precision; float32 weights{scaler} "
                  "and loss; --fp32 turns it off)")


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global random generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class TrainingSession:
    def __init__(self, job: TrainingJob, settings: TrainingSettings, context: DistributedContext,
                 device: torch.device):
        plan = job.plan
        self.job, self.plan, self.settings = job, plan, settings
        self.train_cases, self.validation_cases = job.train_cases, job.validation_cases
        self.context, self.device, self.folder = context, device, job.folder
        self.label_names = list(plan.foreground_labels)
        seed_everything(_stream_seed(settings.seed, 0, 0, zlib.crc32(job.name.encode())))
        self.network = ResidualEncoderUNet(plan.network).to(device)
        seed_everything(_stream_seed(settings.seed, context.rank, 0, 2))
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=settings.initial_lr, momentum=settings.momentum,
                                         weight_decay=settings.weight_decay, nesterov=True)
        self.mixed_precision, precision = training_precision(plan, settings, device)
        if context.is_main:
            log.info(f"training precision: {precision}")
        # bfloat16 has float32's range: only float16 needs its loss scaled
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.mixed_precision and device.type == "cuda")
        weights = deep_supervision_weights(len(plan.network.deep_supervision_scales))
        if context.enabled and len(weights) > 1:
            weights[-1] = DDP_COARSEST_WEIGHT
        self.loss = DeepSupervisionLoss(DiceCELoss(batch_dice=settings.batch_dice, ignore_label=plan.ignore_label),
                                        weights)
        self.history = History()
        self.best_ema: float | None = None
        self.epoch = 0
        self.model = self.network
        if context.enabled:
            self.model = DistributedDataParallel(self.network, device_ids=[device.index] if device.type == "cuda"
                                                 else None)
        if settings.compile and device.type == "cuda":
            self.model = torch.compile(self.model)
        elif settings.compile and context.is_main:
            # Measured on a busy 2-core CPU (tiny network, torch 2.13): 155 s to compile, then 9.2 s per step against
            # 4.1 s uncompiled.
            log.warning(f"--compile is ignored on {device.type}: torch.compile is used on CUDA only (on a CPU it "
                        "compiled for minutes and then ran slower); training runs uncompiled")

    # ------------------------------------------------------------------------------------------ state
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(plan=self.plan.to_json(), fold=self.job.name, settings=self.settings.to_json(),
                          network_state=self.network.state_dict(), epoch=self.epoch,
                          optimizer_state=self.optimizer.state_dict(), grad_scaler_state=self.scaler.state_dict(),
                          rng_state=capture_rng_state(), history=self.history.to_json(), best_ema_dice=self.best_ema,
                          environment=environment_record())

    def restore(self, checkpoint: Checkpoint) -> None:
        self._check_topology(checkpoint)
        self.network.load_state_dict(checkpoint.network_state)
        if checkpoint.optimizer_state:
            self.optimizer.load_state_dict(checkpoint.optimizer_state)
        if checkpoint.grad_scaler_state:
            self.scaler.load_state_dict(checkpoint.grad_scaler_state)
        restore_rng_state(checkpoint.rng_state)
        self.history = History.from_json(checkpoint.history)
        self.best_ema, self.epoch = checkpoint.best_ema_dice, checkpoint.epoch
        log.info(f"resuming after epoch {self.epoch} of {self.settings.epochs}")

    def load_pretrained(self, checkpoint: Checkpoint) -> None:
        """Start from another model's weights (e.g. a teacher): weights only, a fresh optimizer and schedule."""
        self._check_topology(checkpoint)
        self.network.load_state_dict(checkpoint.network_state)
        log.info(f"initialised from the weights of fold {checkpoint.fold}")

    def _check_topology(self, checkpoint: Checkpoint) -> None:
        if checkpoint.typed_plan.network != self.plan.network:
            raise CovnetError(None, f"checkpoint of fold {checkpoint.fold} has another network topology than "
                                    "plans.json; it cannot be continued or used as initialisation")

    def _save(self, name: str) -> None:
        if self.context.is_main:
            self.checkpoint().save(self.folder.checkpoint(name))

    # ------------------------------------------------------------------------------------------ data
    def _loader(self, cases: list[str], transforms, read_size, workers: int, seed_offset: int, mixed: bool):
        slots = self.context.batch_slots(self.plan.batch_size)
        pseudo = set(self.job.pseudo_cases) if mixed else set()
        experts = [case for case in cases if case not in pseudo] if pseudo else []
        foreground, expert_count = rank_composition(self.plan.batch_size, slots, self.settings.oversample_foreground,
                                                    self.job.expert_share if experts else None)
        sampler = PatchSampler(self.job.case_folders, cases, self.plan.patch_size, len(slots), anchor_cases=experts,
                               anchor_count=expert_count, oversample_foreground=foreground,
                               seed=_stream_seed(self.settings.seed, self.context.rank, self.epoch, seed_offset),
                               pre_augmentation_patch_size=read_size, ignore_label=self.plan.ignore_label,
                               num_threads_in_multithreaded=max(1, workers))
        if workers == 0:
            return SingleThreadedAugmenter(sampler, transforms)
        return MultiThreadedAugmenter(sampler, transforms, workers, num_cached_per_queue=2, seeds=None,
                                      pin_memory=self.device.type == "cuda")

    def _loaders(self):
        scales = self.plan.network.deep_supervision_scales
        workers = self.settings.data_workers
        augmentation = self.settings.augmentation
        train = self._loader(self.train_cases, training_transforms(
            self.plan.patch_size, scales, MIRROR_AXES, [tuple(p) for p in self.plan.lateral_pairs],
            self.plan.ignore_label, augmentation, noised_cases=self.job.pseudo_cases if self.job.strong_noise else ()),
            training_read_size(self.plan.patch_size, augmentation), workers, 0, mixed=True)
        # Fold 'all' has no validation cases: its patch validation watches the training cases.
        validation = self._loader(self.validation_cases or self.train_cases,
                                  validation_transforms(scales, self.plan.ignore_label), None,
                                  min(workers, max(1, workers // 2)), 1, mixed=False)
        return train, validation

    # ------------------------------------------------------------------------------------------ loop
    def run(self, should_stop=lambda: False) -> bool:
        """Train the remaining epochs; True when finished, False when stopped early (latest is saved)."""
        settings = self.settings
        if self.epoch >= settings.epochs:
            self._finish()
            return True
        train_loader, validation_loader = self._loaders()
        try:
            while self.epoch < settings.epochs:
                if not self._run_epoch(train_loader, validation_loader, should_stop):
                    self._save("latest")
                    log.warning(f"stopped during epoch {self.epoch + 1}; checkpoint_latest.pth holds the state "
                                f"after epoch {self.epoch} plus the interrupted epoch's updates; "
                                "resume with --continue")
                    return False
        finally:
            for loader in (train_loader, validation_loader):
                if isinstance(loader, MultiThreadedAugmenter):
                    loader._finish()
        self._finish()
        return True

    def _run_epoch(self, train_loader, validation_loader, should_stop) -> bool:
        settings = self.settings
        learning_rate = poly_learning_rate(settings.initial_lr, self.epoch, settings.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        bar = tqdm(total=settings.iterations_per_epoch, desc=f"epoch {self.epoch + 1}/{settings.epochs}",
                   unit="it", leave=False, disable=None if self.context.is_main else True)
        try:
            started = time.perf_counter()
            result = train_epoch(self.model, train_loader, self.loss, self.optimizer, self.scaler,
                                 settings.iterations_per_epoch, self.device, settings.gradient_clip, bar, should_stop,
                                 mixed_precision=self.mixed_precision)
        finally:
            bar.close()
        if should_stop():
            return False
        validation_loss, pseudo_dice = validate_patches(
            self.model, validation_loader, self.loss, settings.validation_iterations, self.device,
            self.plan.num_classes, self.plan.ignore_label, self.context, mixed_precision=self.mixed_precision
        ) if settings.validation_iterations else \
            (float("nan"), [float("nan")] * (self.plan.num_classes - 1))
        seconds = time.perf_counter() - started
        ema = self.history.record(result.mean_loss, validation_loss, pseudo_dice, learning_rate, seconds,
                                  result.data_wait_share, result.seconds_per_iteration)
        self.epoch += 1
        if self.context.is_main:
            log.info(self.history.epoch_line(self.epoch - 1, self.label_names))
            if not math.isnan(ema) and (self.best_ema is None or ema > self.best_ema):
                self.best_ema = ema
                self._save("best")
                log.info(f"new best moving-average pseudo-Dice {ema:.4f}: checkpoint_best.pth")
            if self.epoch % settings.checkpoint_every == 0 and self.epoch < settings.epochs:
                self._save("latest")
            plot_progress(self.history, self.folder.progress_plot, self.label_names)
        return True

    def _finish(self) -> None:
        self._check_ranks_agree()
        if self.context.is_main:
            self._save("final")
            self.folder.checkpoint("latest").unlink(missing_ok=True)
            log.info(f"training finished after {self.epoch} epochs: checkpoint_final.pth")


    def _check_ranks_agree(self) -> None:
        """Under DDP every rank must end with the same weights; a difference means a broken setup."""
        if not self.context.enabled:
            return
        with torch.no_grad():
            checksum = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                    for p in self.network.parameters()]).sum(dim=0)
        gathered = [torch.zeros_like(checksum) for _ in range(self.context.world_size)]
        torch.distributed.all_gather(gathered, checksum)
        if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
            raise CovnetError(None, f"the {self.context.world_size} processes ended with different weights "
                                    f"({[g.tolist() for g in gathered]})")
        log.info(f"all {self.context.world_size} processes end with identical weights "
                 f"(checksum {gathered[0][0].item():.6f})")


def _stream_seed(seed: int, rank: int, epoch: int, offset: int) -> int:
    """A different patch stream for each rank, each loader, and each (re)start epoch of a resumed run."""
    return (seed * 1_000_003 + rank * 10_007 + epoch * 101 + offset) % (2 ** 31)
