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
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from covnet.checkpoint import Checkpoint
from covnet.image.io import Geometry, write_image
from covnet.image.orientation import LEFT_RIGHT_AXIS
from covnet.inference.postprocessing import postprocess
from covnet.inference.sliding_window import predict_sliding_window
from covnet.network.unet import ResidualEncoderUNet
from covnet.planning.plans import Plan
from covnet.preprocessing.case import CaseProperties, preprocess_case, probabilities_to_original
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger

log = logger(__name__)
# 3D mirroring (augmentation and test time) along every axis, as nnU-Net does for 3D configurations.
MIRROR_AXES = (0, 1, 2)


@dataclass(frozen=True)
class InferenceSettings:
    step_size: float = 0.5
    use_mirroring: bool = True
    batch_windows: int = 2
    use_amp: bool = True          # autocast where available: float16 on CUDA, bfloat16 on CPUs with AMX/AVX512-BF16
    postprocess: bool = False


class Predictor:
    def __init__(self, checkpoints: Sequence[Checkpoint], device: torch.device = torch.device("cpu"),
                 settings: InferenceSettings = InferenceSettings()):
        if not checkpoints:
            raise CovnetError(None, "no trained model to predict with")
        self.plan = checkpoints[0].typed_plan
        for checkpoint in checkpoints[1:]:
            other = checkpoint.typed_plan
            if other.network != self.plan.network or other.preprocessing_key() != self.plan.preprocessing_key():
                raise CovnetError(None, f"fold {checkpoint.fold} was trained under another plan than fold "
                                        f"{checkpoints[0].fold}; an ensemble needs one plan")
        self.device, self.settings = device, settings
        self.network = ResidualEncoderUNet(self.plan.network).to(device).eval()
        self.states = [checkpoint.network_state for checkpoint in checkpoints]
        self.folds = [checkpoint.fold for checkpoint in checkpoints]

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], device: torch.device = torch.device("cpu"),
                   settings: InferenceSettings = InferenceSettings()) -> "Predictor":
        return cls([Checkpoint.load(path) for path in paths], device, settings)

    def predict_probabilities(self, image: np.ndarray) -> torch.Tensor:
        """(C, z, y, x) preprocessed image → (classes, z, y, x) softmax probabilities averaged over the models."""
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
    lungs = [labels[name] for name in ("left_lung", "right_lung") if name in labels]
    if not lungs:
        return segmentation
    return postprocess(segmentation, lung_labels=lungs, infection_label=labels.get("infection"))


def fold_checkpoints(results_dir: Path, folds: Sequence[str], checkpoint: str = "final") -> list[Path]:
    """``results/fold_K/checkpoint_<checkpoint>.pth`` of each fold; a missing one is a one-line error."""
    paths = [results_dir / f"fold_{fold}" / f"checkpoint_{checkpoint}.pth" for fold in folds]
    for path in paths:
        if not path.is_file():
            raise CovnetError(path, "not found; train the fold first (covnet_train)")
    return paths
