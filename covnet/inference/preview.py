"""A quick-look PNG of one predicted case: axial, coronal and sagittal slices with the labels overlaid.

The slices go through the centre of mass of the infection, or of the lungs when there is no infection, or
through the middle of the volume when nothing is segmented. The case is first turned to covnet's canonical
orientation (array axes towards patient Superior, Posterior, Left), so every preview looks the same way as a
radiologist's screen: axial with anterior up and the patient's right on the image's left, coronal and
sagittal with superior up. Pixels keep their physical aspect ratio (the spacing). The figure is drawn with
matplotlib's Agg canvas, without pyplot (no global state, safe in a background thread), and the PNG is
written atomically.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import ndimage

from covnet.dataset import COVID_LABELS, INFECTION, LEFT_LUNG, RIGHT_LUNG
from covnet.image.io import Geometry
from covnet.image.orientation import canonical_reorientation
from covnet.runtime.atomic import atomic_path

# A lung window: the parenchyma, ground glass and consolidation are all told apart in it.
WINDOW_HU = (-1350.0, 150.0)
OVERLAY_ALPHA = 0.45
LABEL_COLOURS = {LEFT_LUNG: (0.20, 0.55, 1.00), RIGHT_LUNG: (0.15, 0.80, 0.35), INFECTION: (1.00, 0.15, 0.10)}
OTHER_COLOUR = (1.00, 0.85, 0.10)


def slice_centre(segmentation: np.ndarray, infection_labels: Sequence[int], lung_labels: Sequence[int]
                 ) -> tuple[int, int, int]:
    """(z, y, x) index of the infection's centre of mass, else the lungs', else the middle of the array."""
    for labels in (infection_labels, lung_labels):
        mask = np.isin(segmentation, list(labels)) if labels else None
        if mask is not None and mask.any():
            centre = ndimage.center_of_mass(mask)
            return tuple(int(np.clip(round(c), 0, size - 1)) for c, size in zip(centre, segmentation.shape))
    return tuple(size // 2 for size in segmentation.shape)


def _colour_table(labels: Mapping[str, int]) -> np.ndarray:
    """RGBA per label value; background and unknown values transparent."""
    table = np.zeros((max(labels.values(), default=0) + 1, 4), dtype=np.float32)
    for name, value in labels.items():
        if value > 0:
            table[value, :3] = LABEL_COLOURS.get(name, OTHER_COLOUR)
            table[value, 3] = OVERLAY_ALPHA
    return table


def _overlay(labels_2d: np.ndarray, table: np.ndarray) -> np.ndarray:
    return table[np.clip(labels_2d, 0, len(table) - 1)]


def draw_preview(image: np.ndarray, segmentation: np.ndarray, geometry: Geometry,
                 labels: Mapping[str, int] = COVID_LABELS, title: str = "") -> Figure:
    """The three-panel figure of a CT (z, y, x, in HU) and its labels on the same grid."""
    if image.shape != segmentation.shape:
        raise ValueError(f"image {image.shape} and segmentation {segmentation.shape} differ in shape")
    reorientation = canonical_reorientation(geometry.direction)
    ct = reorientation.to_canonical(np.asarray(image))
    seg = reorientation.to_canonical(np.asarray(segmentation))
    spacing_z, spacing_y, spacing_x = reorientation.spacing(geometry.spacing)
    infection = [value for name, value in labels.items() if name == INFECTION]
    lungs = [value for name, value in labels.items() if value > 0 and name != INFECTION]
    z, y, x = slice_centre(seg, infection, lungs)
    table = _colour_table(labels)
    # (name, CT slice, label slice, height/width of one pixel, row 0 at the bottom)
    panels = [(f"axial z={z}", ct[z], seg[z], spacing_y / spacing_x, False),
              (f"coronal y={y}", ct[:, y, :], seg[:, y, :], spacing_z / spacing_x, True),
              (f"sagittal x={x}", ct[:, :, x], seg[:, :, x], spacing_z / spacing_y, True)]
    figure = Figure(figsize=(13, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    for axis, (name, ct_slice, label_slice, aspect, bottom_up) in zip(axes, panels):
        origin = "lower" if bottom_up else "upper"
        axis.imshow(ct_slice, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect, origin=origin,
                    interpolation="nearest")
        axis.imshow(_overlay(label_slice, table), aspect=aspect, origin=origin, interpolation="nearest")
        axis.set_title(name, fontsize=10)
        axis.set_axis_off()
    handles = [Patch(color=table[value, :3], label=name) for name, value in sorted(labels.items(), key=lambda i: i[1])
               if value > 0]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.06, 1, 0.95))
    return figure


def write_preview(image: np.ndarray, segmentation: np.ndarray, geometry: Geometry, path: str | os.PathLike,
                  labels: Mapping[str, int] = COVID_LABELS, title: str = "") -> None:
    """Draw the preview and write it as a PNG, atomically."""
    figure = draw_preview(image, segmentation, geometry, labels, title)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            figure.savefig(handle, format="png")
