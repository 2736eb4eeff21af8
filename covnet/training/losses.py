"""Training losses: soft Dice + cross-entropy (weight 1:1) and its deep-supervision wrapper.

Shapes: logits (B, K, z, y, x) (any number of spatial axes), targets (B, 1, z, y, x) or (B, z, y, x) holding
label values 0..K-1 (any integer or float dtype). An optional ``ignore_label`` marks voxels that contribute
to neither term, in value or in gradient; it may lie outside 0..K-1 (e.g. K itself).

Conventions (covnet's choices):
- The Dice term is ``1 - mean soft Dice`` over the foreground classes (background is left out), with
  ``smooth = 1e-5`` in numerator and denominator, so a class absent from both target and prediction scores 1.
  ``DiceCELoss`` is therefore >= 0 and reaches 0 for a perfect, fully confident prediction (nnU-Net reports
  ``-Dice`` instead, which shifts its numbers by 1).
- ``batch_dice=True`` sums true/false positives over the batch and the voxels (one Dice per class);
  ``batch_dice=False`` computes one Dice per sample and class, then averages.
- Cross-entropy is the mean over the voxels that are not ignored (0 if all are ignored).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

DICE_SMOOTH = 1e-5


def _labels(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, *spatial) int64 labels from a (B, 1, *spatial) or (B, *spatial) target."""
    if target.ndim == logits.ndim:
        if target.shape[1] != 1:
            raise ValueError(f"target has {target.shape[1]} channels; expected one channel of label values")
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    return target.long()


def _valid_and_labels(target: torch.Tensor, logits: torch.Tensor, ignore_label: int | None
                      ) -> tuple[torch.Tensor | None, torch.Tensor]:
    labels = _labels(target, logits)
    if ignore_label is None:
        return None, labels
    valid = labels != ignore_label
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


class SoftDiceLoss(nn.Module):
    """``1 - mean soft Dice`` of the softmax probabilities over the foreground classes."""

    def __init__(self, batch_dice: bool = False, smooth: float = DICE_SMOOTH, ignore_label: int | None = None):
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, labels = _valid_and_labels(target, logits, self.ignore_label)
        probabilities = torch.softmax(logits.float(), dim=1)[:, 1:]
        num_classes = logits.shape[1]
        foreground = torch.arange(1, num_classes, device=logits.device).view(1, -1, *([1] * (logits.ndim - 2)))
        truth = (labels.unsqueeze(1) == foreground).to(probabilities.dtype)
        if valid is not None:
            weight = valid.unsqueeze(1).to(probabilities.dtype)
            probabilities = probabilities * weight
            truth = truth * weight
        axes = tuple(range(2, logits.ndim))
        if self.batch_dice:
            axes = (0,) + axes
        intersection = (probabilities * truth).sum(axes)
        denominator = probabilities.sum(axes) + truth.sum(axes)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        return 1 - dice.mean()


class MaskedCrossEntropyLoss(nn.Module):
    """Mean cross-entropy over the voxels whose label is not ``ignore_label``."""

    def __init__(self, ignore_label: int | None = None):
        super().__init__()
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, labels = _valid_and_labels(target, logits, self.ignore_label)
        log_probabilities = torch.log_softmax(logits.float(), dim=1)
        voxel_loss = -log_probabilities.gather(1, labels.unsqueeze(1)).squeeze(1)
        if valid is None:
            return voxel_loss.mean()
        # where() rather than multiplication: ignored voxels then get an exact zero gradient
        voxel_loss = torch.where(valid, voxel_loss, torch.zeros_like(voxel_loss))
        return voxel_loss.sum() / valid.sum().clamp_min(1)


class DiceCELoss(nn.Module):
    """``dice_weight * (1 - soft Dice) + ce_weight * cross-entropy``, both honouring ``ignore_label``."""

    def __init__(self, batch_dice: bool = False, ignore_label: int | None = None, dice_weight: float = 1.0,
                 ce_weight: float = 1.0, smooth: float = DICE_SMOOTH):
        super().__init__()
        self.dice = SoftDiceLoss(batch_dice=batch_dice, smooth=smooth, ignore_label=ignore_label)
        self.cross_entropy = MaskedCrossEntropyLoss(ignore_label=ignore_label)
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.ce_weight * self.cross_entropy(logits, target)


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """Weights of the deep-supervision outputs, full resolution first: ``1/2**i``, the coarsest output 0,
    normalised to sum 1. A single output gets weight 1."""
    if num_outputs < 1:
        raise ValueError(f"need at least one output, not {num_outputs}")
    if num_outputs == 1:
        return [1.0]
    raw = [0.5 ** index for index in range(num_outputs - 1)] + [0.0]
    total = sum(raw)
    return [weight / total for weight in raw]


class DeepSupervisionLoss(nn.Module):
    """``sum_i weight_i * loss(outputs[i], targets[i])`` over lists of outputs (full resolution first) and
    matching targets; outputs with weight 0 are not evaluated. Weights default to
    ``deep_supervision_weights(len(outputs))``."""

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):   # a network without deep supervision
            outputs = [outputs]
        if isinstance(targets, torch.Tensor):
            targets = [targets]
        weights = self.weights if self.weights is not None else deep_supervision_weights(len(outputs))
        if not len(outputs) == len(targets) == len(weights):
            raise ValueError(f"{len(outputs)} outputs, {len(targets)} targets and {len(weights)} weights; "
                             "they must match one to one")
        total = None
        for output, target, weight in zip(outputs, targets, weights):
            if weight == 0:
                continue
            term = weight * self.loss(output, target)
            total = term if total is None else total + term
        if total is None:
            raise ValueError("every deep-supervision weight is 0")
        return total
