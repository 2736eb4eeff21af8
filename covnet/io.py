"""Reading and writing images with SimpleITK.

This is the only module that knows SimpleITK orders array axes (x, y, z): everything it hands out is
(z, y, x). ``Geometry.spacing`` and ``Geometry.shape`` follow the array axes (z, y, x);
``origin`` and ``direction`` are physical-space quantities and keep SimpleITK's meaning (an LPS point,
and the row-major 3×3 matrix whose columns are the directions of the x, y, z index axes).
"""
from __future__ import annotations

import gzip
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from covnet.atomic import atomic_path
from covnet.errors import CovnetError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


@dataclass(frozen=True)
class Geometry:
    """Where an array lies in the patient: spacing and shape in (z, y, x), origin/direction as SimpleITK."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    shape: tuple[int, int, int]

    def to_json(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> "Geometry":
        return cls(tuple(float(v) for v in data["spacing"]), tuple(float(v) for v in data["origin"]),
                   tuple(float(v) for v in data["direction"]), tuple(int(v) for v in data["shape"]))

    def matches(self, other: "Geometry", tolerance: float = 1e-3) -> bool:
        """Same grid up to a relative ``tolerance`` (spacing, origin in mm, direction cosines)."""
        if self.shape != other.shape:
            return False
        scale = max(1.0, float(np.max(np.abs(self.spacing))))
        return (np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=tolerance * scale)
                and np.allclose(self.origin, other.origin, atol=tolerance * 100 * scale)
                and np.allclose(self.direction, other.direction, atol=tolerance))


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def strip_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_dicom_series_dir(path: Path) -> bool:
    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def _geometry_of(image) -> Geometry:
    """From a ``sitk.Image`` or an ``ImageFileReader`` that has read the header (same getters)."""
    spacing_xyz = image.GetSpacing()
    size_xyz = image.GetSize()
    return Geometry(spacing=tuple(float(s) for s in spacing_xyz[::-1]),
                    origin=tuple(float(o) for o in image.GetOrigin()),
                    direction=tuple(float(d) for d in image.GetDirection()),
                    shape=tuple(int(s) for s in size_xyz[::-1]))


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise CovnetError(path, "file not found")
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise CovnetError(path, "folder holds no DICOM series")
            # A study folder may also hold scouts or reformats: take the series with the most slices.
            files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid) for uid in series), key=len)
            if len(series) > 1:
                warnings.warn(f"{path}: holds {len(series)} DICOM series; reading the largest ({len(files)} files)")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except CovnetError:
        raise
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise CovnetError(path, f"cannot be read as an image ({first_line})") from None


def _check_3d(image: sitk.Image, path: Path) -> None:
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        raise CovnetError(path, f"is not a 3D volume (size {list(image.GetSize())}); covnet needs 3D CT")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CovnetError(path, "has vector pixels; covnet needs one scalar channel per file")


def read_geometry(path: str | os.PathLike) -> Geometry:
    """Only the header (cheap); DICOM folders are read whole."""
    path = Path(path)
    if path.is_dir():
        return read_image(path)[1]
    if not path.exists():
        raise CovnetError(path, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise CovnetError(path, "cannot be read as an image") from None
    if reader.GetDimension() != 3 or reader.GetSize()[2] < 2:
        raise CovnetError(path, f"is not a 3D volume (size {list(reader.GetSize())}); covnet needs 3D CT")
    return _geometry_of(reader)


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _count_non_finite_nifti(path: Path) -> int:
    """ITK silently turns NaN/inf in NIfTI float data into 0 on reading, so look at the stored values."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        header = handle.read(540)
        for endian in "<>":
            size = struct.unpack(endian + "i", header[:4])[0]
            if size in (348, 540):
                break
        else:
            return 0
        if size == 348:
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        else:
            datatype = struct.unpack(endian + "h", header[12:14])[0]
            offset = int(struct.unpack(endian + "q", header[168:176])[0])
        if datatype not in _NIFTI_FLOAT_TYPES:
            return 0
        handle.seek(offset)
        data = np.frombuffer(handle.read(), dtype=np.dtype(endian + _NIFTI_FLOAT_TYPES[datatype]))
    return int((~np.isfinite(data)).sum())


def read_image(path: str | os.PathLike, dtype=None, check_finite: bool = True) -> tuple[np.ndarray, Geometry]:
    """Read a 3D image file or DICOM series folder as a (z, y, x) array and its geometry."""
    path = Path(path)
    image = _read_sitk(path)
    _check_3d(image, path)
    array = sitk.GetArrayFromImage(image)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if check_finite:
        non_finite = int((~np.isfinite(array)).sum()) if array.dtype.kind == "f" else 0
        if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")):
            non_finite = max(non_finite, _count_non_finite_nifti(path))
        if non_finite:
            raise CovnetError(path, f"contains {non_finite} NaN/inf voxels")
    return array, _geometry_of(image)


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in geometry.spacing[::-1]))
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True) -> None:
    """Write atomically: a killed job leaves no truncated image under the final name."""
    path = Path(path)
    image = to_sitk(array, geometry)
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=compress)
