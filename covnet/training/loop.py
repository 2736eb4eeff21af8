"""One epoch of training and of patch validation: the inner loops, nothing else.

A step moves a batch to the device, runs the network (under autocast with ``mixed_precision``: float16 on CUDA,
bfloat16 on a CPU), applies the deep-supervision loss to the logits cast to float32, and (training) backpropagates
with gradient clipping and an SGD step; the weights, their gradients and the optimizer's state stay float32.
Patch validation counts true positives, false positives and false negatives per foreground label over all of the
epoch's validation patches (the "pseudo-Dice" nnU-Net tracks), leaving out ignored voxels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from covnet.runtime.errors import CovnetError
from covnet.training.distributed import DistributedContext


@dataclass
class EpochResult:
    mean_loss: float
    seconds: float
    data_seconds: float
    iterations: int

    @property
    def seconds_per_iteration(self) -> float:
        return self.seconds / self.iterations if self.iterations else float("nan")

    @property
    def data_wait_share(self) -> float:
        return self.data_seconds / self.seconds if self.seconds > 0 else 0.0


def next_batch(loader: Iterator) -> dict:
    """The next augmented batch; a data-loading worker that died is a clear error, not a hang."""
    try:
        return next(loader)
    except RuntimeError as error:
        raise CovnetError(None, f"a data-loading worker process died ({str(error).strip()[:120]}); if it "
                                "raised an error, its traceback is printed above") from None


def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    data = torch.as_tensor(batch["data"]).to(device, non_blocking=True)
    target = batch["target"]
    targets = [torch.as_tensor(t).to(device, non_blocking=True) for t in (target if isinstance(target, list)
                                                                           else [target])]
    return data, targets


def _as_list(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (list, tuple)) else [output]


def _float32(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Autocast's logits as float32: the softmax, Dice sums and cross-entropy of the loss lose too much in 16 bits
    (CPU autocast keeps softmax in bfloat16)."""
    return [output.float() for output in outputs]


def train_epoch(network: nn.Module, loader: Iterator, loss_function: nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, iterations: int, device: torch.device, gradient_clip: float,
                progress=None, should_stop=lambda: False, *, mixed_precision: bool) -> EpochResult:
    network.train()
    total_loss, data_seconds, done = 0.0, 0.0, 0
    started = time.perf_counter()
    for _ in range(iterations):
        if should_stop():
            break
        waiting = time.perf_counter()
        batch = next_batch(loader)
        data, targets = _to_device(batch, device)
        data_seconds += time.perf_counter() - waiting
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=mixed_precision):
            outputs = _as_list(network(data))
        loss = loss_function(_float32(outputs), targets)
        if not torch.isfinite(loss):
            raise CovnetError(None, f"training loss became {loss.item()}; lower the learning rate or check the data")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(network.parameters(), gradient_clip)
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item()
        done += 1
        if progress is not None:
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            progress.update()
    seconds = time.perf_counter() - started
    return EpochResult(total_loss / max(done, 1), seconds, data_seconds, done)


def validate_patches(network: nn.Module, loader: Iterator, loss_function: nn.Module, iterations: int,
                     device: torch.device, num_classes: int, ignore_label: int | None,
                     context: DistributedContext, *, mixed_precision: bool) -> tuple[float, list[float]]:
    """Mean loss and per-foreground-label Dice over ``iterations`` validation batches (all ranks summed)."""
    network.eval()
    counts = torch.zeros(3, num_classes - 1, dtype=torch.float64, device=device)   # tp, fp, fn
    total_loss = torch.zeros(2, dtype=torch.float64, device=device)               # sum, batches
    with torch.no_grad():
        network.train(False)
        for _ in range(iterations):
            data, targets = _to_device(next_batch(loader), device)
            with torch.autocast(device.type, enabled=mixed_precision):
                outputs = _float32(_as_list(_forward_all_scales(network, data)))
            total_loss += torch.tensor([loss_function(outputs, targets).item(), 1.0], device=device,
                                       dtype=torch.float64)
            counts += confusion_counts(outputs[0], targets[0], num_classes, ignore_label)
    context.sum(counts)
    context.sum(total_loss)
    true_positive, false_positive, false_negative = counts
    denominator = 2 * true_positive + false_positive + false_negative
    dice = torch.where(denominator > 0, 2 * true_positive / denominator.clamp(min=1), torch.nan)
    return float(total_loss[0] / total_loss[1].clamp(min=1)), [float(v) for v in dice]


def _forward_all_scales(network: nn.Module, data: torch.Tensor):
    """Validation loss needs every deep-supervision output, which the network gives only in train mode; norms
    here are instance norms (no running statistics), so train mode changes nothing else."""
    module = network.module if hasattr(network, "module") else network
    module.train(True)
    try:
        return network(data)
    finally:
        module.train(False)


def confusion_counts(logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_label: int | None) -> torch.Tensor:
    """(3, num_classes - 1) true positives, false positives, false negatives of the argmax per foreground label."""
    predicted = logits.argmax(dim=1)
    labels = target[:, 0] if target.ndim == logits.ndim else target
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_label is None else labels != ignore_label
    rows = []
    for label in range(1, num_classes):
        predicted_mask, reference_mask = (predicted == label) & valid, (labels == label) & valid
        rows.append(torch.stack([(predicted_mask & reference_mask).sum(), (predicted_mask & ~reference_mask).sum(),
                                 (~predicted_mask & reference_mask).sum()]))
    return torch.stack(rows, dim=1).to(torch.float64)
