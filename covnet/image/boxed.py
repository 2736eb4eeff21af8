"""Class probabilities that are certain background outside a box, stored as the box alone.

Why: with the lung box the network predicts only part of the image, and the rest is label 0 with probability 1.
A chest CT's four class channels on its original grid take 0.6 GB as float32; holding, resampling and reorienting
only the box (about 60 % of the body box) saves that time and memory, and the full array is made only when asked
for (:meth:`BoxedProbabilities.full`). Exact: every operation here gives what it would give on the full array.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from covnet.image.orientation import Reorientation

Box = tuple[slice, slice, slice]
BACKGROUND = 0   # the class that has probability 1 outside the box


def whole(shape: Sequence[int]) -> Box:
    return tuple(slice(0, int(size)) for size in shape)


def background_probabilities(num_classes: int, shape: Sequence[int]) -> np.ndarray:
    """(num_classes, *shape) float32: certain background."""
    probabilities = np.zeros((num_classes, *shape), dtype=np.float32)
    probabilities[BACKGROUND] = 1.0
    return probabilities


@dataclass(frozen=True)
class BoxedProbabilities:
    """(C, *box) float32 ``values`` inside ``box`` of an array of spatial ``shape``; certain background elsewhere."""
    values: np.ndarray
    box: Box
    shape: tuple[int, int, int]

    def __post_init__(self):
        sizes = tuple(part.stop - part.start for part in self.box)
        if self.values.ndim != 4 or self.values.shape[1:] != sizes or any(
                part.start < 0 or part.stop > size for part, size in zip(self.box, self.shape)):
            raise ValueError(f"values {self.values.shape} do not fill box {self.box} of an image {self.shape}")

    @classmethod
    def everywhere(cls, values: np.ndarray) -> "BoxedProbabilities":
        """Probabilities of a whole image (the box is the image)."""
        return cls(values, whole(values.shape[1:]), tuple(int(size) for size in values.shape[1:]))

    @property
    def num_classes(self) -> int:
        return int(self.values.shape[0])

    def full(self) -> np.ndarray:
        """The (C, *shape) array."""
        probabilities = background_probabilities(self.num_classes, self.shape)
        probabilities[(slice(None), *self.box)] = self.values
        return probabilities

    def labels(self) -> np.ndarray:
        """The argmax, (z, y, x) uint8: label 0 outside the box."""
        labels = np.zeros(self.shape, dtype=np.uint8)
        labels[self.box] = np.argmax(self.values, axis=0)
        return labels

    def placed(self, offset: Sequence[int], shape: Sequence[int]) -> "BoxedProbabilities":
        """The same values in a larger image of ``shape`` that holds this one's at ``offset`` (e.g. the body box
        in the whole CT; what lies outside it is background too)."""
        box = tuple(slice(part.start + int(start), part.stop + int(start)) for part, start in zip(self.box, offset))
        return BoxedProbabilities(self.values, box, tuple(int(size) for size in shape))

    def reoriented(self, reorientation: Reorientation) -> "BoxedProbabilities":
        """From the canonical frame to the original array's (``Reorientation.to_original``)."""
        box = [None, None, None]
        shape = [0, 0, 0]
        for axis, (part, size) in enumerate(zip(self.box, self.shape)):
            flipped = reorientation.flips[axis]
            start, stop = (size - part.stop, size - part.start) if flipped else (part.start, part.stop)
            original_axis = reorientation.permutation[axis]
            box[original_axis], shape[original_axis] = slice(start, stop), size
        return BoxedProbabilities(reorientation.to_original(self.values), tuple(box), tuple(shape))

    def confidence(self, segmentation: np.ndarray, foreground_labels: Sequence[int]) -> float | None:
        """Mean over voxels labelled one of ``foreground_labels`` of the largest class probability there (1
        outside the box, where background is certain); None without such voxels."""
        foreground = np.isin(segmentation, list(foreground_labels))
        total = int(np.count_nonzero(foreground))
        if total == 0:
            return None
        inside = foreground[self.box]
        summed = float(self.values.max(axis=0)[inside].sum(dtype=np.float64))
        return (summed + (total - int(np.count_nonzero(inside)))) / total
