"""covnet from Python: load a trained model once, then segment as many CTs as you like.

    import covnet
    import SimpleITK as sitk

    model = covnet.load_model("lungs_covid.zip")      # or a workspace, results folder, model folder or checkpoint
    result = model.segment("scan.nii.gz")             # or a SimpleITK image, or a DICOM series folder
    sitk.WriteImage(result.label_image, "scan_labels.nii.gz")
    infection_ml = result.report["infection_ml"]     # the report row, as in covnet_predict's report.csv

:func:`load_model` reads the weights once (every fold of an ensemble), and :meth:`Model.segment` runs
covnet_predict's inference on one CT: the same input checks (a label map, an image not in HU or an implausible
grid is a one-line ``CovnetError``), preprocessing, sliding window, postprocessing and lateral fix, and the same
report row. ``covnet_predict`` itself runs on these objects: it loads its model with :func:`load_model` and
segments each case with :meth:`Model.segment`, having read it with :func:`read_input` and :meth:`Model.prepare`
in a background thread (so that the next case is read and preprocessed while the network works on this one).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from covnet.dataset import CHANNEL_SUFFIX, IGNORE_LABEL_NAME
from covnet.image.discovery import propose_case_ids
from covnet.image.io import Geometry, from_sitk, read_image, to_sitk
from covnet.inference.cpu_runtime import AUTO
from covnet.inference.inputs import check_input
from covnet.inference.model_choice import select_checkpoints
from covnet.inference.predictor import InferenceSettings, Predictor, default_speed_mode, speed_mode_settings
from covnet.inference.report import REQUIRED_LABELS, case_report
from covnet.model_archive.install import resolve_model_archive
from covnet.model_archive.manifest import MANIFEST_NAME, ModelManifest, choice_problem, model_id
from covnet.preprocessing.case import CaseProperties, preprocess_case
from covnet.runtime.devices import resolve_device
from covnet.runtime.errors import CovnetError
from covnet.runtime.hashing import hash_file

if TYPE_CHECKING:
    import pydicom

# covnet_predict's defaults: postprocessing and the lateral fix on (validation and self-training keep the
# network's own labels, InferenceSettings' defaults); the speed mode (speed_mode_settings) goes by the device.
PREDICT_SETTINGS = InferenceSettings(postprocess=True, lateral_fix=True, runtime=AUTO)
IN_MEMORY_NAME = "image"


@dataclass(frozen=True)
class InputImage:
    """A CT as read: a (z, y, x) array in HU on its grid, the name its report row carries, and the file or DICOM
    series it came from (None for an image handed over in memory)."""
    array: np.ndarray
    geometry: Geometry
    name: str
    source: Path | None = None


@dataclass(frozen=True)
class PreparedImage:
    """A CT checked and preprocessed for a model (its plan's grid), ready for :meth:`Model.segment`."""
    image: InputImage
    preprocessed: np.ndarray
    properties: CaseProperties


@dataclass(frozen=True)
class Segmentation:
    """What :meth:`Model.segment` returns: the labels on the input's own grid (``labels`` as a (z, y, x) uint8
    array, ``label_image`` as a SimpleITK image with the input's spacing, origin and direction), the report row
    (``case``, lung and infection volumes in mL, percentages, confidence: covnet_predict's ``report.csv``
    columns) and, when asked for, the class probabilities (classes, z, y, x) on the same grid."""
    name: str
    labels: np.ndarray
    geometry: Geometry
    report: dict
    probabilities: np.ndarray | None = None
    source: Path | None = None

    @property
    def label_image(self) -> sitk.Image:
        return to_sitk(self.labels, self.geometry)


ImageLike = Union[str, os.PathLike, sitk.Image, InputImage]


class ImageTypeError(CovnetError, TypeError):
    """``segment``/``prepare``/``read_input`` given something that is no image covnet reads (e.g. a numpy array,
    which has no spacing): a ``TypeError`` that says what is accepted."""


def _image_type_problem(image: object) -> str:
    kind = "a numpy array" if isinstance(image, np.ndarray) else f"an object of type {type(image).__name__}"
    return (f"cannot segment {kind}: give a SimpleITK image, the path of a NIfTI/MHA/NRRD file, or a DICOM series "
            "folder. An array has no voxel spacing: wrap a (z, y, x) array in HU with image = "
            "sitk.GetImageFromArray(array), then image.SetSpacing((x_mm, y_mm, z_mm)) (and SetOrigin and "
            "SetDirection when known)")


def read_input(image: ImageLike, *, name: str | None = None) -> InputImage:
    """A SimpleITK image, or a NIfTI/MHA/NRRD file, DICOM series folder or one file of a DICOM series, as an
    :class:`InputImage`. ``name`` (for the report row) defaults to the file's or folder's name (a trailing
    ``_0000`` dropped), or ``image`` for a SimpleITK image."""
    if isinstance(image, InputImage):
        return image if name is None else dataclasses.replace(image, name=name)
    if isinstance(image, sitk.Image):
        name = name or IN_MEMORY_NAME
        return InputImage(*from_sitk(image, name), name)
    if not isinstance(image, (str, os.PathLike)):
        raise ImageTypeError(None, _image_type_problem(image))
    path = Path(image)
    array, geometry = read_image(path)
    if name is None:
        name = propose_case_ids([path], path.parent, strip_suffix=CHANNEL_SUFFIX)[path]
    return InputImage(array, geometry, name, path)


class Model:
    """A trained model (one checkpoint or an ensemble of folds) with its weights in memory; make one with
    :func:`load_model`."""

    def __init__(self, predictor: Predictor, checkpoints: Sequence[Path], description: str, *,
                 archive_id: str | None = None):
        if predictor.plan.in_channels != 1:
            raise CovnetError(None, f"the model needs {predictor.plan.in_channels} images per case; covnet reads "
                                    f"one CT per case")
        self.predictor = predictor
        self.checkpoints = list(checkpoints)
        self.description = description
        self._archive_id = archive_id

    @property
    def plan(self):
        return self.predictor.plan

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def settings(self) -> InferenceSettings:
        return self.predictor.settings

    @property
    def label_names(self) -> dict[str, int]:
        """The labels the model predicts, ``{name: value}`` (background 0)."""
        return {name: value for name, value in self.plan.labels.items() if name != IGNORE_LABEL_NAME}

    @cached_property
    def model_id(self) -> str:
        """What a DICOM-SEG names as the model: an installed archive's id (the SHA-256 of its manifest), else the
        SHA-256 of the sorted SHA-256s of the checkpoint files."""
        if self._archive_id is not None:
            return self._archive_id
        digests = sorted(hash_file(path).sha256 for path in self.checkpoints)
        return hashlib.sha256("\n".join(digests).encode()).hexdigest()

    def prepare(self, image: ImageLike | PreparedImage, *, name: str | None = None) -> PreparedImage:
        """Read (see :func:`read_input`), check and preprocess a CT for this model. A label map is refused with
        ``LabelMapInput``, an image that is not a CT in HU or whose grid is degenerate or implausible with a
        one-line ``CovnetError``."""
        if isinstance(image, PreparedImage):
            return image
        image = read_input(image, name=name)
        check_input(image.source or image.name, image.array, image.geometry, self.plan)
        preprocessed, _, properties = preprocess_case(image.name, [image.array], image.geometry, self.plan)
        return PreparedImage(image, preprocessed, properties)

    def segment(self, image: ImageLike | PreparedImage, *, name: str | None = None,
                probabilities: bool = False) -> Segmentation:
        """Segment one CT (a SimpleITK image, an image file, a DICOM series folder, or what :meth:`prepare` made):
        the labels in the input's geometry, the report row and, with ``probabilities``, the class probabilities."""
        prepared = self.prepare(image, name=name)
        source = prepared.image
        labels, class_probabilities = self.predictor.predict_preprocessed(prepared.preprocessed, prepared.properties)
        if labels.shape != source.geometry.shape:
            raise RuntimeError(f"{source.name}: prediction of shape {labels.shape} for an image of shape "
                               f"{source.geometry.shape}")
        report = {"case": source.name}
        if all(label in self.label_names for label in REQUIRED_LABELS):
            report.update(case_report(labels, source.geometry.spacing, class_probabilities, self.label_names))
        return Segmentation(source.name, labels, source.geometry, report,
                            class_probabilities.full() if probabilities else None, source.source)

    def write_dicom_seg(self, result: Segmentation, path: str | os.PathLike, *,
                        source: str | os.PathLike | Sequence[pydicom.Dataset] | None = None) -> Path:
        """Write ``result`` as a DICOM-SEG of the DICOM series it was segmented from (``source``: that series'
        folder or headers; by default the input ``result`` came from), with this model's id."""
        from covnet.export.dicom_seg import write_dicom_seg  # highdicom only where a SEG is written

        source = result.source if source is None else source
        if source is None:
            raise CovnetError(None, f"{result.name}: a DICOM-SEG needs the DICOM series that was segmented")
        return write_dicom_seg(result.labels, result.geometry, source, path, self.label_names, model_id=self.model_id)


def load_model(path: str | os.PathLike, *, folds: Sequence[str] | None = None, checkpoint: str | None = None,
               device: str | torch.device = "auto", settings: InferenceSettings | None = None) -> Model:
    """Load a trained model once, to segment many CTs with :meth:`Model.segment`.

    ``path``: a workspace, its ``results/`` folder (or a copy), one model's folder, a checkpoint file, or a model
    zip (``covnet_export_model``: checked and installed into the cache once). Which models (covnet_predict's
    rule, ``select_checkpoints``): ``folds`` (e.g. ``["0", "1"]`` or ``["all"]``) and ``checkpoint`` (``final``
    or ``best``); by default an installed archive's own folds and checkpoint, otherwise the self-trained model,
    else every trained fold, else ``fold_all``, with ``checkpoint_final.pth``. ``device``: ``auto``, ``cpu``,
    ``cuda``, ``cuda:N`` or a ``torch.device``. ``settings``: the inference settings (default: covnet_predict's,
    :data:`PREDICT_SETTINGS` in the device's speed mode: fast on a CPU, accurate on a GPU; e.g.
    ``speed_mode_settings("accurate", PREDICT_SETTINGS)`` or ``dataclasses.replace(PREDICT_SETTINGS,
    use_mirroring=False)``)."""
    folder = resolve_model_archive(path)
    manifest_file = folder / MANIFEST_NAME
    archive_id = None
    if manifest_file.is_file():               # an installed archive: its own choice of models by default
        manifest_bytes = manifest_file.read_bytes()
        manifest = ModelManifest.from_bytes(manifest_bytes, manifest_file)
        problem = choice_problem(manifest, folds, checkpoint)
        if problem:
            raise CovnetError(path, problem)
        archive_id = model_id(manifest_bytes)
        folds = folds or manifest.folds or None
        checkpoint = checkpoint or manifest.checkpoint
    checkpoints, description = select_checkpoints(folder, folds, checkpoint)
    if archive_id is not None:
        description = f"model {archive_id[:12]}: {description}"
    device = device if isinstance(device, torch.device) else resolve_device(device)
    if settings is None:
        settings = speed_mode_settings(default_speed_mode(device), PREDICT_SETTINGS)
    predictor = Predictor.from_files(checkpoints, device, settings)
    return Model(predictor, checkpoints, description, archive_id=archive_id)
