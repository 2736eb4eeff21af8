"""From trained checkpoints to label maps in each case's own geometry: the one inference path.

``Predictor`` holds one network and the weights of every model of an ensemble (folds), loaded with
``weights_only=True`` from self-contained checkpoints: nothing else from the workspace is needed.
Preprocessing is the training stage's own ``preprocess_case`` (reorient, crop, normalize, resample), the
network runs as a Gaussian-weighted sliding window with mirroring (lateral labels swapped along left-right),
fold probabilities are averaged, and export resamples them back, takes the argmax and pastes it into the
original array. The trainer's validation and ``covnet_predict`` both call this module.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import torch

from covnet.checkpoint import Checkpoint
from covnet.dataset import LEFT_LUNG, RIGHT_LUNG
from covnet.image.boxed import BoxedProbabilities, whole
from covnet.image.io import Geometry, write_image
from covnet.image.orientation import LEFT_RIGHT_AXIS, MIRROR_AXES
from covnet.inference.lung_box import (
    LungBoxSettings,
    Region,
    find_lung_region,
    region_fraction,
)
from covnet.inference.postprocessing import assign_lung_sides, lungs_on_both_sides, postprocess_segmentation
from covnet.inference.cpu_runtime import OPENVINO, RUNTIMES, TORCH, OpenVinoNetwork, resolve_runtime
from covnet.inference.sliding_window import mirror_combinations, predict_sliding_window
from covnet.network.unet import ResidualEncoderUNet
from covnet.planning.plans import Plan, plan_differences
from covnet.preprocessing.case import CaseProperties, preprocess_case, probabilities_to_original
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.runtime.precision import autocast_available

log = logger(__name__)


def valid_window_scale(scale: Sequence[float]) -> bool:
    """One finite factor of at least 1 per axis (z, y, x)."""
    return len(scale) == len(MIRROR_AXES) and all(1 <= factor < math.inf for factor in scale)


@dataclass(frozen=True)
class InferenceSettings:
    # Neighbouring windows overlap by (1 - step_size) of the training patch: for windows of the patch size, the
    # step as a fraction of the window (nnU-Net's step_size); larger windows keep the same overlap in voxels.
    step_size: float = 0.5
    use_mirroring: bool = True
    mirror_axes: tuple[int, ...] = MIRROR_AXES   # the axes mirroring flips; every subset is one pass (3 axes: 8)
    # The inference window = the plan's patch × this per axis, rounded up to the network's total stride.
    window_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    lung_box: LungBoxSettings | None = None      # the sliding window covers only the air-filled lungs' box
    batch_windows: int = 2
    use_amp: bool = True          # autocast where available: float16 on CUDA, bfloat16 on CPUs with AMX/AVX512-BF16
    runtime: str = TORCH          # the network passes: torch, openvino (CPU), auto (openvino on a CPU if installed)
    postprocess: bool = False
    # Each lung component takes the side of the body's midline it lies on (covnet_predict's default; validation
    # and pseudo-labels score the network itself and keep its labels).
    lateral_fix: bool = False

    def __post_init__(self):
        if not 0 < self.step_size <= 1:
            raise ValueError(f"step_size must be in (0, 1], got {self.step_size}")
        if any(axis not in MIRROR_AXES for axis in self.mirror_axes):
            raise ValueError(f"mirror axes must be among {MIRROR_AXES} (z, y, x), got {self.mirror_axes}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not valid_window_scale(self.window_scale):
            raise ValueError(f"window_scale needs one factor of at least 1 per axis (z, y, x), got "
                             f"{self.window_scale}")

    @property
    def flipped_axes(self) -> tuple[int, ...]:
        """The axes test-time mirroring flips (none without mirroring)."""
        return tuple(self.mirror_axes) if self.use_mirroring else ()

    def describe(self) -> str:
        """What the network pass does, in a few words (e.g. for covnet_predict's first line)."""
        flips = len(mirror_combinations(self.flipped_axes))
        axes = "".join("zyx"[axis] for axis in sorted(self.flipped_axes))
        parts = [f"mirroring {axes} ({flips} passes)" if flips > 1 else "no mirroring", f"step {self.step_size:g}"]
        if any(scale != 1 for scale in self.window_scale):
            parts.append("window " + "×".join(f"{scale:g}" for scale in self.window_scale) + " the patch")
        parts.append(f"lung box (the lungs' air, {self.lung_box.margin_mm:g} mm margin)" if self.lung_box
                     else "whole body box")
        if self.runtime == OPENVINO:
            parts.append("OpenVINO")
        return ", ".join(parts)


FAST, ACCURATE = "fast", "accurate"
FAST_WINDOW_SCALE = (1.0, 2.0, 2.0)
SPEED_MODES = (FAST, ACCURATE)


def speed_mode_settings(mode: str, base: InferenceSettings = InferenceSettings()) -> InferenceSettings:
    """``base`` with the network pass of a speed mode (postprocessing, lateral fix, precision stay ``base``'s).

    ``accurate``: the full prediction, mirroring along z, y and x (8 passes), step 0.5, every window of the body
    box. ``fast``: the sliding window covers only the box of the air-filled lungs plus a margin, with windows
    twice the patch in-plane (overlapping by half a patch: 2.25 times fewer voxels through the network), without
    mirroring (BENCHMARKS.md, "Fast prediction on the CPU", measures what each costs)."""
    if mode == ACCURATE:
        return replace(base, step_size=0.5, use_mirroring=True, mirror_axes=MIRROR_AXES, window_scale=(1.0, 1.0, 1.0),
                       lung_box=None)
    if mode == FAST:
        return replace(base, step_size=0.5, use_mirroring=False, mirror_axes=MIRROR_AXES,
                       window_scale=FAST_WINDOW_SCALE, lung_box=LungBoxSettings())
    raise ValueError(f"speed mode must be one of {', '.join(SPEED_MODES)}, got {mode!r}")


def default_speed_mode(device: torch.device) -> str:
    """``fast`` on a CPU (the full prediction of a chest CT takes 20 minutes on 2 cores), ``accurate`` on a GPU."""
    return FAST if torch.device(device).type == "cpu" else ACCURATE


class Predictor:
    def __init__(self, checkpoints: Sequence[Checkpoint], device: torch.device = torch.device("cpu"),
                 settings: InferenceSettings = InferenceSettings(), *, names: Sequence[str] = ()):
        """``names`` say which model each checkpoint is (e.g. its file) in messages; by default its fold."""
        if not checkpoints:
            raise CovnetError(None, "no trained model to predict with")
        names = list(names) or [f"fold {checkpoint.fold}" for checkpoint in checkpoints]
        self.plan = checkpoints[0].typed_plan
        for name, checkpoint in zip(names[1:], checkpoints[1:]):
            differences = ensemble_plan_differences(self.plan, checkpoint.typed_plan)
            if differences:
                raise CovnetError(None, f"{name} and {names[0]} were trained under different plans "
                                        f"({'; '.join(differences)}); an ensemble needs one plan: predict with "
                                        f"models of one plan (-f, or --model)")
        self.device = device
        self.settings = replace(settings, runtime=resolve_runtime(settings.runtime, device))
        self.network = ResidualEncoderUNet(self.plan.network).to(device).eval()
        self.states = [checkpoint.network_state for checkpoint in checkpoints]
        self.folds = [checkpoint.fold for checkpoint in checkpoints]
        self._converted: dict[int, OpenVinoNetwork] = {}      # per model, when the runtime is OpenVINO

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], device: torch.device = torch.device("cpu"),
                   settings: InferenceSettings = InferenceSettings()) -> "Predictor":
        return cls([Checkpoint.load(path) for path in paths], device, settings, names=[str(path) for path in paths])

    def window_layout(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The sliding window for an image of ``shape`` and, per axis, the step between windows as a fraction of
        the window. The window is the plan's patch scaled by ``window_scale``, rounded up to the network's total
        stride, but no larger than the image (rounded down to the stride; a window over padding misleads the
        network) and no smaller than the patch. Neighbouring windows overlap by ``1 - step_size`` of the patch."""
        window = []
        for patch, scale, stride, size in zip(self.plan.patch_size, self.settings.window_scale,
                                              self.plan.network.total_stride, shape):
            scaled = stride * math.ceil(patch * scale / stride)
            window.append(max(int(patch), min(scaled, stride * (int(size) // stride))))
        steps = tuple(1 - (1 - self.settings.step_size) * patch / size
                      for patch, size in zip(self.plan.patch_size, window))
        return tuple(window), steps

    def predict_boxed(self, image: np.ndarray, *, member_labels: list | None = None,
                      region: Region | None = None) -> BoxedProbabilities:
        """(C, z, y, x) preprocessed image → softmax probabilities averaged over the models, for the part of the
        image the network predicts (certain background elsewhere). ``region``: that part; by default the settings'
        lung box (:meth:`lung_region`) or the whole image. ``member_labels``: a list that receives each model's own
        argmax (uint8, the whole image), e.g. to measure agreement."""
        image = torch.from_numpy(np.array(image, dtype=np.float32))   # a writable copy (memory maps are read-only)
        shape = tuple(image.shape[1:])
        total = None
        with torch.inference_mode():                 # in-place sums of the (inference) outputs
            if region is None and self.settings.lung_box is not None:
                region = self.lung_region(image)
            region = region or whole(shape)
            inside = image[(slice(None), *region)]
            for index, state in enumerate(self.states):
                self.network.load_state_dict(state)
                probabilities = self._sliding_window(inside, self._runner(index))
                if member_labels is not None:
                    member_labels.append(BoxedProbabilities(probabilities.numpy(), region, shape).labels())
                total = probabilities if total is None else total.add_(probabilities)
            if len(self.states) > 1:
                total.div_(len(self.states))
        return BoxedProbabilities(total.numpy(), region, shape)

    def predict_probabilities(self, image: np.ndarray, *, member_labels: list | None = None,
                              region: Region | None = None) -> torch.Tensor:
        """:meth:`predict_boxed` as a (classes, z, y, x) tensor of the whole image."""
        return torch.from_numpy(self.predict_boxed(image, member_labels=member_labels, region=region).full())

    def lung_region(self, image: np.ndarray | torch.Tensor) -> Region | None:
        """The part of a preprocessed image the lung box keeps (:mod:`covnet.inference.lung_box`); None (the whole
        image) when it finds no air inside the body."""
        region = find_lung_region(image, self.plan, self.settings.lung_box or LungBoxSettings(),
                                  patch_size=self.plan.patch_size)
        if region is None:
            log.info("the lung box found no air inside the body: predicting the whole image")
            return None
        log.debug(f"lung box {[(part.start, part.stop) for part in region]}: "
                  f"{100 * region_fraction(region, image.shape[1:]):.0f}% of the image")
        return region

    def _runner(self, index: int):
        """What runs the network of model ``index`` (whose weights ``self.network`` holds): the network itself, or
        its OpenVINO conversion (made on first use)."""
        if self.settings.runtime != OPENVINO:
            return self.network
        if index not in self._converted:
            example = torch.zeros((self.settings.batch_windows, self.plan.in_channels, *self.plan.patch_size))
            self._converted[index] = OpenVinoNetwork(
                self.network, example, bfloat16=self.settings.use_amp and autocast_available(self.device),
                threads=torch.get_num_threads(), topology=self.plan.network.to_json())
        return self._converted[index]

    def _sliding_window(self, image: torch.Tensor, network) -> torch.Tensor:
        window, steps = self.window_layout(image.shape[1:])
        return predict_sliding_window(
            network, image, window, self.plan.num_classes, step_size=steps,
            mirror_axes=self.settings.flipped_axes, lateral_pairs=self.plan.lateral_pairs,
            left_right_axis=LEFT_RIGHT_AXIS, batch_windows=self.settings.batch_windows, device=self.device,
            use_amp=self.settings.use_amp)

    def to_original(self, probabilities: BoxedProbabilities, properties: CaseProperties
                    ) -> tuple[np.ndarray, BoxedProbabilities]:
        """Probabilities on the plan's grid → (labels, probabilities) on the case's original grid."""
        original = probabilities_to_original(probabilities, properties, self.plan.resampling)
        return self.labels(original, properties), original

    def labels(self, original: BoxedProbabilities, properties: CaseProperties) -> np.ndarray:
        """The label map of probabilities on the case's original grid: argmax, then the settings' postprocessing
        and lateral fix."""
        segmentation = original.labels()
        if self.settings.postprocess:
            segmentation = postprocess_segmentation(segmentation, self.plan)
        if self.settings.lateral_fix:
            segmentation = lungs_by_midline(segmentation, properties, self.plan.labels)
        return segmentation

    def predict_preprocessed(self, image: np.ndarray, properties: CaseProperties,
                             output_file: str | os.PathLike | None = None) -> tuple[np.ndarray, BoxedProbabilities]:
        """A case already on the plan's grid (e.g. a validation case) → labels (and probabilities) in its
        original geometry, written atomically to ``output_file`` when given."""
        probabilities = self.predict_boxed(image)
        original = probabilities_to_original(probabilities, properties, self.plan.resampling)
        del probabilities                            # the plan grid's copy, before postprocessing needs memory
        segmentation = self.labels(original, properties)
        if output_file is not None:
            write_image(segmentation, properties.original_geometry, output_file)
        return segmentation, original

    def predict_image(self, image: np.ndarray, geometry: Geometry, case: str = "case",
                      output_file: str | os.PathLike | None = None) -> tuple[np.ndarray, BoxedProbabilities]:
        """A raw CT (z, y, x) in HU and its geometry → labels (and probabilities) in that geometry."""
        preprocessed, _, properties = preprocess_case(case, [image], geometry, self.plan)
        return self.predict_preprocessed(preprocessed, properties, output_file)


def lungs_by_midline(segmentation: np.ndarray, properties: CaseProperties, labels: Mapping[str, int]) -> np.ndarray:
    """Each lung component relabelled by the side of the body's midline it lies on (``assign_lung_sides``), in
    the canonical LPS frame whatever the case's own orientation; a warning when that changed most lung voxels.

    The midline is the middle of the body's extent from left to right: the body box preprocessing cropped to
    (the largest connected component above -500 HU). It is found without the network, so a network that calls
    both lungs one side cannot move it, and unlike the middle of the lungs' own extent it keeps a single lung
    (or one the network missed most of) whole on its side. It is trusted only when the body lies inside the image
    from left to right (air beside it), or when the lungs are two separate components on either side of it
    (``lungs_on_both_sides``). Otherwise (a field of view cropped to one lung, whose middle would cut that lung in
    two) the network's labels are kept, with a warning."""
    if LEFT_LUNG not in labels or RIGHT_LUNG not in labels:
        return segmentation
    start, stop = properties.bounding_box[LEFT_RIGHT_AXIS]
    midline = (start + stop - 1) / 2
    lung_labels = (labels[LEFT_LUNG], labels[RIGHT_LUNG])
    canonical = properties.reorientation.to_canonical(segmentation)
    body_inside = start > 0 and stop < properties.canonical_shape[LEFT_RIGHT_AXIS]
    if not body_inside and not lungs_on_both_sides(canonical, midline, lung_labels, LEFT_RIGHT_AXIS):
        if np.isin(canonical, lung_labels).any():
            log.warning(f"{properties.case}: the body reaches the image's left or right border and the lungs are not "
                        f"two separate components on either side of its middle (a field of view cropped to one "
                        f"lung?): the body's midline is unknown, so the network's left and right labels are kept")
        return segmentation
    fixed, relabelled = assign_lung_sides(canonical, midline, left_label=lung_labels[0], right_label=lung_labels[1],
                                          lateral_axis=LEFT_RIGHT_AXIS)
    if relabelled > 0.5:
        log.warning(f"{properties.case}: the network gave {100 * relabelled:.0f}% of the lung voxels the side "
                    f"opposite to the one they lie on; left and right were set by position, from the body's "
                    f"midline (--no-lateral-fix keeps the network's labels)")
    return properties.reorientation.to_original(fixed)


def ensemble_plan_differences(plan: Plan, other: Plan) -> list[str]:
    """What two plans disagree on among the settings an ensemble must share (the network and everything that
    shapes the preprocessed input), as ``<field> <this> vs <other>``; empty when they agree."""
    shared = [{"network": each.network.to_json(), **each.preprocessing_key()} for each in (plan, other)]
    return [f"{name} {mine} vs {theirs}" for name, mine, theirs in plan_differences(*shared)]
