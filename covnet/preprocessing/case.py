"""One case from raw geometry to the plan's grid (reorient → crop → normalize → resample), and back again.

``CaseProperties`` records everything needed to put a prediction on the preprocessed grid back into the
original image: the original geometry, the reorientation to LPS, the body bounding box (in the reoriented
array) and the shapes before and after resampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from covnet.image.cropping import body_bounding_box
from covnet.image.grid import crop, uncrop
from covnet.image.io import Geometry
from covnet.image.orientation import Reorientation, canonical_reorientation
from covnet.image.boxed import BoxedProbabilities
from covnet.image.resampling import resample_boxed_probabilities, resample_image, resample_segmentation
from covnet.planning.plans import PREPROCESSING_VERSION, Plan, ResamplingSettings  # noqa: F401 (re-exported)
from covnet.preprocessing.normalization import normalize

# Foreground voxel positions stored per class for oversampling patches around rare classes.
LOCATIONS_PER_CLASS = 2000


@dataclass
class CaseProperties:
    case: str
    original_geometry: Geometry
    bounding_box: list[list[int]]          # (start, stop) per axis (z, y, x) in the reoriented array
    shape_after_crop: list[int]
    target_spacing: list[float]
    shape_after_resampling: list[int]
    class_locations: dict[str, list[list[int]]] = field(default_factory=dict)   # label value -> [[z, y, x], ...]
    reorientation: Reorientation = Reorientation()

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        """The whole original array's shape once reoriented (what the bounding box refers to)."""
        return self.reorientation.shape(self.original_geometry.shape)

    def to_json(self) -> dict:
        return {"case": self.case, "original_geometry": self.original_geometry.to_json(),
                "reorientation": self.reorientation.to_json(),
                "bounding_box": self.bounding_box, "shape_after_crop": self.shape_after_crop,
                "target_spacing": self.target_spacing, "shape_after_resampling": self.shape_after_resampling,
                "class_locations": self.class_locations}

    @classmethod
    def from_json(cls, data: dict) -> "CaseProperties":
        return cls(case=data["case"], original_geometry=Geometry.from_json(data["original_geometry"]),
                   bounding_box=[list(b) for b in data["bounding_box"]], shape_after_crop=list(data["shape_after_crop"]),
                   target_spacing=list(data["target_spacing"]), shape_after_resampling=list(data["shape_after_resampling"]),
                   class_locations=data.get("class_locations", {}),
                   reorientation=Reorientation.from_json(data.get("reorientation")))


def sample_class_locations(segmentation: np.ndarray, labels: list[int], rng: np.random.Generator,
                           per_class: int = LOCATIONS_PER_CLASS) -> dict[str, list[list[int]]]:
    locations = {}
    for label in labels:
        where = np.argwhere(segmentation == label)
        if len(where) > per_class:
            where = where[rng.choice(len(where), per_class, replace=False)]
        locations[str(label)] = where.astype(int).tolist()
    return locations


def anisotropy_settings(resampling: ResamplingSettings) -> dict:
    """The separate-z keywords of covnet.image.resampling from a plan's resampling settings."""
    return {"order_z": resampling.order_z, "anisotropy_threshold": resampling.anisotropy_threshold}


def preprocess_case(case: str, channels: list[np.ndarray], geometry: Geometry, plan: Plan,
                    segmentation: np.ndarray | None = None, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Channels (each (z, y, x), raw intensities) → image (C, z, y, x) float32 on the plan's grid,
    segmentation (z, y, x) uint8 or None, and the properties that invert the mapping."""
    reorientation = canonical_reorientation(geometry.direction)
    channels = [reorientation.to_canonical(channel) for channel in channels]
    segmentation = None if segmentation is None else reorientation.to_canonical(segmentation)
    spacing = reorientation.spacing(geometry.spacing)
    box = body_bounding_box(channels[0], segmentation)
    target = plan.target_spacing
    settings = plan.resampling
    anisotropy = anisotropy_settings(settings)
    image = np.stack([resample_image(normalize(crop(channel, box), plan.normalization[str(index)]), spacing,
                                     target, order=settings.image_order, **anisotropy)
                      for index, channel in enumerate(channels)])
    seg = None
    locations = {}
    if segmentation is not None:
        all_labels = sorted(plan.labels.values())
        seg = resample_segmentation(crop(segmentation, box), spacing, target, labels=all_labels,
                                    order=settings.segmentation_order, **anisotropy)
        locations = sample_class_locations(seg, all_labels[1:], np.random.default_rng(seed))
    properties = CaseProperties(case=case, original_geometry=geometry, bounding_box=[list(b) for b in box],
                                shape_after_crop=[b - a for a, b in box], target_spacing=list(target),
                                shape_after_resampling=list(image.shape[1:]), class_locations=locations,
                                reorientation=reorientation)
    return image, seg, properties


def probabilities_to_original(probabilities: BoxedProbabilities, properties: CaseProperties,
                              resampling: ResamplingSettings) -> BoxedProbabilities:
    """Class probabilities on the plan's grid (certain background outside their box) → on the original image grid,
    still as a box: the resampled box inside the body box inside the whole reoriented CT (background outside the
    body box too)."""
    resampled = resample_boxed_probabilities(probabilities, properties.target_spacing,
                                             new_shape=properties.shape_after_crop, **anisotropy_settings(resampling))
    canonical = resampled.placed([start for start, _ in properties.bounding_box], properties.canonical_shape)
    return canonical.reoriented(properties.reorientation)


def segmentation_to_original(segmentation: np.ndarray, properties: CaseProperties, labels: list[int],
                             resampling: ResamplingSettings) -> np.ndarray:
    """(z, y, x) labels on the plan's grid → labels on the original image grid (0 outside the body box)."""
    cropped = resample_segmentation(segmentation, properties.target_spacing, new_shape=properties.shape_after_crop,
                                    labels=labels, order=resampling.segmentation_order,
                                    **anisotropy_settings(resampling))
    box = [tuple(b) for b in properties.bounding_box]
    canonical = uncrop(cropped, box, properties.canonical_shape, fill_value=0).astype(np.uint8)
    return properties.reorientation.to_original(canonical)
