"""Tiny images written to disk in the formats covnet reads, and where the real CTs are."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from covnet.image.io import Geometry

REPO_ROOT = Path(__file__).resolve().parents[2]
REAL_CT_DIR = REPO_ROOT.parent / "shared" / "data" / "real_ct"
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def write_dicom_series(volume: np.ndarray, folder: Path, spacing_zyx=(2.5, 0.8, 0.7), origin_xyz=(-100.0, -120.0, 30.0),
                       series_uid: str = "1.2.826.0.1.3680043.2.1125.1", orientation=(1, 0, 0, 0, 1, 0),
                       descending_storage: bool = False) -> None:
    """Write an int16 (z, y, x) volume as one CT DICOM file per slice: slice k at ``origin + k·spacing_z·normal``
    (normal = row direction × column direction of ``orientation``, the ImageOrientationPatient), row r and column
    c of ``volume[k]`` its pixel (r, c). Files, InstanceNumber and SOPInstanceUID follow k, or run against it with
    ``descending_storage`` (file 0 is the last slice along the normal)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    for index in range(volume.shape[0]):
        stored = volume.shape[0] - 1 - index if descending_storage else index
        slice_image = sitk.GetImageFromArray(volume[index].astype(np.int16))
        slice_image.SetSpacing((spacing_zyx[2], spacing_zyx[1]))
        position = np.asarray(origin_xyz, float) + index * spacing_zyx[0] * normal
        tags = {"0008|0060": "CT", "0020|000d": series_uid + ".0", "0020|000e": series_uid,
                "0020|0052": series_uid + ".99", "0020|0013": str(stored + 1),
                "0020|0032": "\\".join(f"{v:.4f}" for v in position),
                "0020|0037": "\\".join(f"{v:g}" for v in orientation),
                "0028|0030": f"{spacing_zyx[1]:.4f}\\{spacing_zyx[2]:.4f}",
                "0018|0050": f"{spacing_zyx[0]:.4f}", "0008|0018": f"{series_uid}.{stored + 1}",
                "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{stored:04d}.dcm"))
        writer.Execute(slice_image)


def make_tiny_case(seed: int):
    """A 20×28×32 block 'CT': air around a body on every side, two lungs, a blob of infection."""
    rng = np.random.default_rng(seed)
    image = np.full((20, 28, 32), -1000, dtype=np.int16)
    image[3:15, 4:22, 4:26] = 40
    image[4:14, 6:20, 6:14] = -850
    image[4:14, 6:20, 16:24] = -850
    image = (image + rng.normal(0, 10, image.shape)).astype(np.int16)
    label = np.zeros(image.shape, np.uint8)
    label[4:14, 6:20, 6:14] = 2
    label[4:14, 6:20, 16:24] = 1
    label[7:10, 9:12, 17:20] = 3
    geometry = Geometry((2.5, 1.5, 1.5), (-20.0, 35.5, 110.0), IDENTITY, image.shape)
    return image, label, geometry
