"""Random training patches read from memory-mapped preprocessed cases.

``PatchSampler`` is a batchgenerators ``DataLoader``: iterate it directly, or hand it to batchgenerators'
``MultiThreadedAugmenter`` together with the transforms of ``covnet.training.augmentation``. Each batch is

    {"data": float32 (B, C, *read_size), "target": int16 (B, 1, *read_size), "cases": [case, ...]}

where ``read_size`` is the pre-augmentation patch size (the spatial augmentation rotates/scales and crops
it back to ``patch_size``), or ``patch_size`` itself when none is given.

Sampling rule (nnU-Net's): samples with index >= ``round(batch_size * (1 - oversample_foreground))`` are
centred on a stored voxel (``class_locations`` of the case's JSON) of a class drawn uniformly from the
foreground classes present in that case; the others, and forced samples of cases without foreground, are
placed uniformly at random. The read patch may overhang the case by ``(read_size - patch_size) / 2`` on each
side (so that the final, centre-cropped patch can reach every voxel of the case), and further where the case
is smaller than the patch, which is then centred on it. A foreground patch is shifted back inside those limits
when centring it would overhang more; the chosen voxel stays inside the final patch either way.

Only the patch's slice of each memory map is read, never a whole case. Outside the case:
- the image is padded with 0, the value the spatial augmentation also uses for its border; after covnet's
  CT normalisation 0 is the mean foreground intensity, the same choice as nnU-Net;
- the target is padded with -1 ("outside the case"), the value the spatial augmentation gives its border too;
  the augmentation pipelines later turn -1 into background, or into the ignore label if the dataset has one.

Random numbers come from the sampler's own ``numpy.random.Generator``. Seeded, the sampler in worker
``thread_id`` of a ``MultiThreadedAugmenter`` draws from ``SeedSequence([seed, thread_id])``, so workers never
repeat each other's patches; unseeded, each worker reseeds from fresh entropy.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.data_loader import DataLoader

from covnet.preprocessing.storage import check_case_arrays, image_file, load_case, properties_file
from covnet.runtime.errors import CovnetError
from covnet.runtime.parallel import die_with_parent

IMAGE_PAD_VALUE = 0.0
OUTSIDE_CASE_LABEL = -1
DEFAULT_OVERSAMPLE_FOREGROUND = 0.33
TARGET_DTYPE = np.int16


def number_of_random_samples(batch_size: int, oversample_foreground: float) -> int:
    """Samples ``0 .. n-1`` of a batch are placed at random, the rest on foreground (nnU-Net's rule)."""
    return int(round(batch_size * (1 - oversample_foreground)))


def rank_composition(global_batch_size: int, slots: range, oversample_foreground: float,
                     expert_share: float | None) -> tuple[float, int]:
    """(this rank's foreground share, its number of expert samples) for the global batch positions ``slots``.

    The rules hold for the global batch, whichever way it is split across ranks (nnU-Net sets its per-rank
    oversampling the same way): positions from ``number_of_random_samples`` on are centred on foreground; with an
    ``expert_share`` (a self-training student) the first ``max(1, round(B · share))`` positions are expert
    cases."""
    forced_from = number_of_random_samples(global_batch_size, oversample_foreground)
    foreground = sum(slot >= forced_from for slot in slots) / len(slots)
    if expert_share is None:
        return foreground, 0
    experts = min(global_batch_size, max(1, round(global_batch_size * expert_share)))
    return foreground, sum(slot < experts for slot in slots)


def start_range(case_size: int, read_size: int, patch_size: int) -> tuple[int, int]:
    """Lowest and highest start (inclusive) of a ``read_size`` window along one axis of a case of
    ``case_size`` voxels, when the final ``patch_size`` window is cut from the window's centre."""
    overhang = max(read_size - patch_size, read_size - case_size, 0)
    low = -(overhang // 2)
    high = case_size + (overhang - overhang // 2) - read_size
    return low, high


class _OpenCase:
    """A case's memory maps and foreground locations, opened on first use."""

    def __init__(self, image: np.ndarray, segmentation: np.ndarray, locations: dict[int, np.ndarray]):
        self.image = image
        self.segmentation = segmentation
        self.locations = locations


class PatchSampler(DataLoader):
    def __init__(self, folder: str | Path | Mapping[str, Path], cases: Sequence[str], patch_size: Sequence[int], batch_size: int,
                 oversample_foreground: float = DEFAULT_OVERSAMPLE_FOREGROUND, seed: int | None = None,
                 anchor_cases: Sequence[str] = (), anchor_count: int = 0,
                 pre_augmentation_patch_size: Sequence[int] | None = None, ignore_label: int | None = None,
                 num_threads_in_multithreaded: int = 1):
        """``folder``: where the cases are, or a mapping case -> folder (expert and pseudo-labelled cases live in
        different folders). Cases are drawn uniformly; with ``anchor_cases`` (a self-training student's expert
        cases) ``anchor_count`` samples of every batch are drawn from them and the rest from the other cases, in
        shuffled batch positions (``rank_composition`` says how many). ``ignore_label`` is never chosen as the
        foreground class to centre a patch on."""
        cases = list(cases)
        if not cases:
            raise ValueError("no cases to sample from")
        if len(set(cases)) != len(cases):
            raise ValueError("cases are listed more than once")
        super().__init__(cases, batch_size, num_threads_in_multithreaded, seed_for_shuffle=None,
                         return_incomplete=False, shuffle=False, infinite=True)
        self.folders = {case: Path(folder[case] if isinstance(folder, Mapping) else folder) for case in cases}
        self.cases = cases
        self.indices = list(range(len(cases)))
        self.patch_size = tuple(int(v) for v in patch_size)
        read_size = self.patch_size if pre_augmentation_patch_size is None else pre_augmentation_patch_size
        self.read_size = tuple(int(v) for v in read_size)
        if len(self.patch_size) != 3 or len(self.read_size) != 3:
            raise ValueError(f"patch sizes must be (z, y, x), not {self.patch_size} / {self.read_size}")
        if any(r < p for r, p in zip(self.read_size, self.patch_size)) or min(self.patch_size) < 1:
            raise ValueError(f"pre-augmentation patch {self.read_size} must be at least the patch {self.patch_size}")
        if not 0 <= oversample_foreground <= 1:
            raise ValueError(f"oversample_foreground must lie in [0, 1], not {oversample_foreground}")
        self.oversample_foreground = float(oversample_foreground)
        self.anchors = [case for case in cases if case in set(anchor_cases)]
        self.others = [case for case in cases if case not in set(anchor_cases)]
        if len(self.anchors) != len(set(anchor_cases)):
            raise ValueError(f"anchor cases {sorted(set(anchor_cases) - set(cases))[:5]} are not sampled")
        if not 0 <= anchor_count <= batch_size:
            raise ValueError(f"anchor_count must lie in [0, {batch_size}], not {anchor_count}")
        self.anchor_count = anchor_count if self.anchors and self.others else 0
        self.ignore_label = ignore_label
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._creator_pid = os.getpid()
        self._open_cases: dict[str, _OpenCase] = {}
        self._num_channels: int | None = None
        # Every case checked once here, in the training process, from its headers: a damaged case is one line
        # naming its file, not a traceback from a data-loading worker in the middle of an epoch.
        for case in cases:
            if not properties_file(self.folders[case], case).is_file():
                raise CovnetError(properties_file(self.folders[case], case),
                                  "is missing; training needs each case's image, segmentation and properties "
                                  "(re-run covnet_plan_and_preprocess)")
            check_case_arrays(self.folders[case], case, labelled=True)

    # ------------------------------------------------------------------------------------------------ seeding
    def set_thread_id(self, thread_id: int) -> None:
        """Called by batchgenerators in each worker: give every worker its own random stream, and make it
        exit when the training process dies (batchgenerators' daemon workers outlive a kill -9)."""
        if os.getpid() != self._creator_pid:
            die_with_parent(self._creator_pid)
        super().set_thread_id(thread_id)
        entropy = None if self.seed is None else [int(self.seed), int(thread_id)]
        self.rng = np.random.default_rng(np.random.SeedSequence(entropy))

    # ------------------------------------------------------------------------------------------------ cases
    def _open(self, case: str) -> _OpenCase:
        opened = self._open_cases.get(case)
        if opened is None:
            image, segmentation, properties = load_case(self.folders[case], case, mmap=True)  # shapes checked
            if self._num_channels is None:
                self._num_channels = image.shape[0]
            elif image.shape[0] != self._num_channels:
                raise CovnetError(image_file(self.folders[case], case), f"has {image.shape[0]} channels, other cases "
                                                                 f"{self._num_channels}")
            locations = {}
            for label, voxels in properties.class_locations.items():
                voxels = np.asarray(voxels, dtype=np.int64).reshape(-1, 3)
                if len(voxels) and int(label) != self.ignore_label:
                    locations[int(label)] = voxels
            opened = _OpenCase(image, segmentation, locations)
            self._open_cases[case] = opened
        return opened

    def forced_foreground(self, sample_index: int) -> bool:
        return sample_index >= number_of_random_samples(self.batch_size, self.oversample_foreground)

    def patch_start(self, case_shape: Sequence[int], locations: Mapping[int, np.ndarray],
                    foreground: bool) -> list[int]:
        """Start (z, y, x) of the read window, possibly negative or past the case (padded)."""
        ranges = [start_range(size, read, patch)
                  for size, read, patch in zip(case_shape, self.read_size, self.patch_size)]
        if foreground and locations:
            labels = sorted(locations)
            voxels = locations[labels[self.rng.integers(len(labels))]]
            voxel = voxels[self.rng.integers(len(voxels))]
            return [int(np.clip(centre - read // 2, low, high))
                    for centre, read, (low, high) in zip(voxel, self.read_size, ranges)]
        return [int(self.rng.integers(low, high + 1)) for low, high in ranges]

    # ------------------------------------------------------------------------------------------------ batches
    def draw_cases(self) -> list[str]:
        if not self.anchors or not self.others:
            return [self.cases[index] for index in self.rng.integers(len(self.cases), size=self.batch_size)]
        anchors = [self.anchors[i] for i in self.rng.integers(len(self.anchors), size=self.anchor_count)]
        others = [self.others[i] for i in self.rng.integers(len(self.others), size=self.batch_size - self.anchor_count)]
        drawn = anchors + others
        return [drawn[index] for index in self.rng.permutation(self.batch_size)]

    def generate_train_batch(self) -> dict:
        cases = self.draw_cases()
        samples = []
        for sample_index, case in enumerate(cases):
            opened = self._open(case)
            start = self.patch_start(opened.segmentation.shape, opened.locations, self.forced_foreground(sample_index))
            box = [[begin, begin + read] for begin, read in zip(start, self.read_size)]
            samples.append((crop_and_pad_nd(opened.image, box, pad_value=IMAGE_PAD_VALUE),
                            crop_and_pad_nd(opened.segmentation, box, pad_value=OUTSIDE_CASE_LABEL,
                                            cast_cropped_to=TARGET_DTYPE)))
        data = np.empty((self.batch_size, self._num_channels, *self.read_size), dtype=np.float32)
        target = np.empty((self.batch_size, 1, *self.read_size), dtype=TARGET_DTYPE)
        for index, (image_patch, target_patch) in enumerate(samples):
            data[index] = image_patch
            target[index, 0] = target_patch
        return {"data": data, "target": target, "cases": cases}
