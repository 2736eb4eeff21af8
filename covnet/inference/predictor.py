"""From trained checkpoints to label maps in each case's own geometry: the one inference path.

``Predictor`` holds one network and the weights of every model of an ensemble (folds), loaded with
``weights_only=True`` from self-contained checkpoints: nothing else from the workspace is needed.
Preprocessing is the training stage's own ``preprocess_case`` (reorient, crop, normalize, resample), the
network runs as a Gaussian-weighted sliding window with mirroring (lateral labels swapped along left-right),
fold probabilities are averaged, and export resamples them back, takes the argmax and pastes it into the
original array. The trainer's validation and ``covnet_predict`` both call this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from covnet.checkpoint import Checkpoint
from covnet.dataset import INFECTION, LEFT_LUNG, RIGHT_LUNG
from covnet.image.io import Geometry, write_image
from covnet.image.orientation import LEFT_RIGHT_AXIS, MIRROR_AXES
from covnet.inference.postprocessing import assign_lung_sides, postprocess
from covnet.inference.sliding_window import predict_sliding_window
from covnet.network.unet import ResidualEncoderUNet
from covnet.planning.plans import Plan
from covnet.preprocessing.case import CaseProperties, preprocess_case, probabilities_to_original
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger

log = logger(__name__)


@dataclass(frozen=True)
class InferenceSettings:
    step_size: float = 0.5
    use_mirroring: bool = True
    batch_windows: int = 2
    use_amp: bool = True          # autocast where available: float16 on CUDA, bfloat16 on CPUs with AMX/AVX512-BF16
    postprocess: bool = False
    # Each lung component takes the side of the body's midline it lies on (covnet_predict's default; validation
    # and pseudo-labels score the network itself and keep its labels).
    lateral_fix: bool = False


class Predictor:
    def __init__(self, checkpoints: Sequence[Checkpoint], device: torch.device = torch.device("cpu"),
                 settings: InferenceSettings = InferenceSettings(), *, names: Sequence[str] = ()):
        """``names`` say which model each checkpoint is (e.g. its file) in messages; by default its fold."""
        if not checkpoints:
            raise CovnetError(None, "no trained model to predict with")
        names = list(names) or [f"fold {checkpoint.fold}" for checkpoint in checkpoints]
        self.plan = checkpoints[0].typed_plan
        for name, checkpoint in zip(names[1:], checkpoints[1:]):
            differences = plan_differences(self.plan, checkpoint.typed_plan)
            if differences:
                raise CovnetError(None, f"{name} and {names[0]} were trained under different plans "
                                        f"({'; '.join(differences)}); an ensemble needs one plan: predict with "
                                        f"models of one plan (-f, or --model)")
        self.device, self.settings = device, settings
        self.network = ResidualEncoderUNet(self.plan.network).to(device).eval()
        self.states = [checkpoint.network_state for checkpoint in checkpoints]
        self.folds = [checkpoint.fold for checkpoint in checkpoints]

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], device: torch.device = torch.device("cpu"),
                   settings: InferenceSettings = InferenceSettings()) -> "Predictor":
        return cls([Checkpoint.load(path) for path in paths], device, settings, names=[str(path) for path in paths])

    def predict_probabilities(self, image: np.ndarray, *, member_labels: list | None = None) -> torch.Tensor:
        """(C, z, y, x) preprocessed image → (classes, z, y, x) softmax probabilities averaged over the models.
        ``member_labels``: a list that receives each model's own argmax (uint8), e.g. to measure agreement."""
        total = None
        image = np.array(image, dtype=np.float32)   # a writable copy (memory maps are read-only)
        with torch.inference_mode():                 # in-place sums of the (inference) outputs
            for state in self.states:
                self.network.load_state_dict(state)
                probabilities = predict_sliding_window(
                    self.network, image, self.plan.patch_size, self.plan.num_classes,
                    step_size=self.settings.step_size,
                    mirror_axes=MIRROR_AXES if self.settings.use_mirroring else (),
                    lateral_pairs=self.plan.lateral_pairs, left_right_axis=LEFT_RIGHT_AXIS,
                    batch_windows=self.settings.batch_windows, device=self.device,
                    use_amp=self.settings.use_amp)
                if member_labels is not None:
                    member_labels.append(probabilities.argmax(dim=0).numpy().astype(np.uint8))
                total = probabilities if total is None else total.add_(probabilities)
            if len(self.states) > 1:
                total.div_(len(self.states))
        return total

    def to_original(self, probabilities: torch.Tensor, properties: CaseProperties
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities on the plan's grid → (labels, probabilities) on the case's original grid."""
        original = probabilities_to_original(probabilities.numpy(), properties, self.plan.resampling)
        segmentation = np.argmax(original, axis=0).astype(np.uint8)
        if self.settings.postprocess:
            segmentation = postprocess_segmentation(segmentation, self.plan)
        if self.settings.lateral_fix:
            segmentation = lungs_by_midline(segmentation, properties, self.plan.labels)
        return segmentation, original

    def predict_preprocessed(self, image: np.ndarray, properties: CaseProperties,
                             output_file: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A case already on the plan's grid (e.g. a validation case) → labels (and probabilities) in its
        original geometry, written atomically to ``output_file`` when given."""
        segmentation, original = self.to_original(self.predict_probabilities(image), properties)
        if output_file is not None:
            write_image(segmentation, properties.original_geometry, output_file)
        return segmentation, original

    def predict_image(self, image: np.ndarray, geometry: Geometry, case: str = "case",
                      output_file: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A raw CT (z, y, x) in HU and its geometry → labels (and probabilities) in that geometry."""
        preprocessed, _, properties = preprocess_case(case, [image], geometry, self.plan)
        return self.predict_preprocessed(preprocessed, properties, output_file)


def postprocess_segmentation(segmentation: np.ndarray, plan: Plan) -> np.ndarray:
    """Keep the lungs' largest components and drop infection outside them, for datasets with COVID labels."""
    labels = plan.labels
    lungs = [labels[name] for name in (LEFT_LUNG, RIGHT_LUNG) if name in labels]
    if not lungs:
        return segmentation
    return postprocess(segmentation, lung_labels=lungs, infection_label=labels.get(INFECTION))


def lungs_by_midline(segmentation: np.ndarray, properties: CaseProperties, labels: Mapping[str, int]) -> np.ndarray:
    """Each lung component relabelled by the side of the body's midline it lies on (``assign_lung_sides``), in
    the canonical LPS frame whatever the case's own orientation; a warning when that changed most lung voxels.

    The midline is the middle of the body's extent from left to right: the body box preprocessing cropped to
    (the largest connected component above -500 HU). It is found without the network, so a network that calls
    both lungs one side cannot move it, and unlike the middle of the lungs' own extent it keeps a single lung
    (or one the network missed most of) whole on its side."""
    if LEFT_LUNG not in labels or RIGHT_LUNG not in labels:
        return segmentation
    start, stop = properties.bounding_box[LEFT_RIGHT_AXIS]
    canonical = properties.reorientation.to_canonical(segmentation)
    fixed, relabelled = assign_lung_sides(canonical, (start + stop - 1) / 2, left_label=labels[LEFT_LUNG],
                                          right_label=labels[RIGHT_LUNG], lateral_axis=LEFT_RIGHT_AXIS)
    if relabelled > 0.5:
        log.warning(f"{properties.case}: the network gave {100 * relabelled:.0f}% of the lung voxels the side "
                    f"opposite to the one they lie on; left and right were set by position, from the body's "
                    f"midline (--no-lateral-fix keeps the network's labels)")
    return properties.reorientation.to_original(fixed)


def plan_differences(plan: Plan, other: Plan) -> list[str]:
    """What two plans disagree on among the settings an ensemble must share (the network and everything that
    shapes the preprocessed input), as ``<field> <this> vs <other>``; empty when they agree."""
    mine = _flattened({"network": plan.network.to_json(), **plan.preprocessing_key()})
    theirs = _flattened({"network": other.network.to_json(), **other.preprocessing_key()})
    return [f"{key} {mine.get(key)} vs {theirs.get(key)}" for key in sorted(mine.keys() | theirs.keys())
            if mine.get(key) != theirs.get(key)]


def _flattened(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flattened(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
