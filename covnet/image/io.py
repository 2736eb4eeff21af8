"""Reading and writing images with SimpleITK.

This is the only module that knows SimpleITK orders array axes (x, y, z): everything it hands out is
(z, y, x). ``Geometry.spacing`` and ``Geometry.shape`` follow the array axes (z, y, x);
``origin`` and ``direction`` are physical-space quantities and keep SimpleITK's meaning (an LPS point,
and the row-major 3×3 matrix whose columns are the directions of the x, y, z index axes).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from covnet.image.nifti import count_non_finite, truncation_problem
from covnet.runtime.atomic import atomic_path, incomplete_write, not_empty
from covnet.runtime.errors import CovnetError, last_line
from covnet.runtime.log import CONSOLE_LOCK, logger

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")

log = logger(__name__)


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

    def differences(self, other: "Geometry", tolerance: float = 1e-3) -> list[str]:
        """The fields in which two grids differ beyond a relative ``tolerance`` (spacing, origin in mm,
        direction cosines), each as ``"<field> <mine> vs <other's>"``; empty when they match."""
        scale = max(1.0, float(np.max(np.abs(self.spacing))))
        same = {"shape": self.shape == other.shape,
                "spacing": np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=tolerance * scale),
                "origin": np.allclose(self.origin, other.origin, atol=tolerance * 100 * scale),
                "direction": np.allclose(self.direction, other.direction, atol=tolerance)}
        return [f"{name} {_rounded(getattr(self, name))} vs {_rounded(getattr(other, name))}"
                for name, equal in same.items() if not equal]

    def matches(self, other: "Geometry", tolerance: float = 1e-3) -> bool:
        return not self.differences(other, tolerance)


def _rounded(values) -> list:
    return [round(float(v), 4) for v in values]


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def strip_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_dicom_series_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    with _native_output_captured():   # GDCM prints "No Series were found" for a folder without DICOM files
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file ("DICM" after the 128-byte preamble), whatever its name."""
    if not path.is_file() or is_image_file(path):
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _geometry_of(image) -> Geometry:
    """From a ``sitk.Image`` or an ``ImageFileReader`` that has read the header (same getters)."""
    spacing_xyz = image.GetSpacing()
    size_xyz = image.GetSize()
    return Geometry(spacing=tuple(float(s) for s in spacing_xyz[::-1]),
                    origin=tuple(float(o) for o in image.GetOrigin()),
                    direction=tuple(float(d) for d in image.GetDirection()),
                    shape=tuple(int(s) for s in size_xyz[::-1]))


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


@contextlib.contextmanager
def _native_output_captured() -> Iterator[list[str]]:
    """Keep what ITK's C++ readers and writers print (e.g. MetaIO's "data not read completely") off the
    console; the captured lines are yielded for the error message instead."""
    with CONSOLE_LOCK, _redirected_console() as captured:
        yield captured


@contextlib.contextmanager
def _redirected_console() -> Iterator[list[str]]:
    captured: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)
            sink.seek(0)
            captured.extend(line.strip() for line in sink.read().decode(errors="replace").splitlines() if line.strip())


def _check_file_complete(path: Path) -> None:
    """A file ITK would read wrongly or with a misleading message: empty, or a NIfTI that ends early."""
    if path.stat().st_size == 0:
        raise CovnetError(path, "is empty (0 bytes)")
    if _is_nifti(path):
        problem = truncation_problem(path)
        if problem:
            raise CovnetError(path, problem)


def _unreadable(path: Path, error: RuntimeError, native_lines: list[str]) -> CovnetError:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    detail = "; ".join(native_lines[:2]) or (lines[-1] if lines else "unknown reason")
    if "No such file" in detail or "Unable to determine ImageIO" in detail:
        detail = "not a readable image"  # ITK's wording for a file it opened but could not parse
    return CovnetError(path, f"is truncated or unreadable ({detail})")


def _through_itk(path: Path, action):
    """Run an ITK read with its console output captured; its failure becomes one line naming ``path``."""
    with _native_output_captured() as native_lines:
        try:
            return action()
        except RuntimeError as error:
            failure = error
    raise _unreadable(path, failure, native_lines) from None


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise CovnetError(path, "file not found")
    if path.is_dir():
        return _read_dicom_series(path)
    if is_dicom_file(path):
        return _read_dicom_series(path.parent, member=path)
    _check_file_complete(path)
    return _through_itk(path, lambda: sitk.ReadImage(str(path)))


def _series_description(files: list[str]) -> str:
    """``<SeriesInstanceUID> "<SeriesDescription>" (<n> slices)`` from the series' first file."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    with _native_output_captured():
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return f"({len(files)} slices)"
    tags = {tag: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
            for tag in ("0020|000e", "0008|103e")}
    uid, description = tags["0020|000e"], tags["0008|103e"]
    named = f"{uid} \"{description}\"" if description else uid
    return f"{named} ({len(files)} slices)".strip()


def _read_dicom_series(path: Path, member: Path | None = None) -> sitk.Image:
    """The series of ``path`` (a folder) with the most slices, or the one holding the file ``member``.

    A study folder may also hold scouts, reformats or a second reconstruction: which series was taken, and how to
    take another (pass one of its files instead of the folder), is one warning line."""
    def series_files() -> list[list[str]]:
        return [list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid))
                for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))]
    every_series = sorted(_through_itk(path, series_files), key=len, reverse=True)
    if not every_series:
        raise CovnetError(member or path, "folder holds no DICOM series")
    if member is None:
        files = every_series[0]
        if len(every_series) > 1:
            others = "; ".join(f"{_series_description(other)}, e.g. {other[0]}" for other in every_series[1:4])
            log.warning(f"{path}: holds {len(every_series)} DICOM series; took {_series_description(files)}, the "
                        f"one with the most slices. Others: {others}"
                        f"{'; ...' if len(every_series) > 4 else ''}. To segment another series, give one of its "
                        f"files as the input (covnet_predict -i FILE) or move it into a folder of its own")
    else:
        wanted = member.resolve()
        files = next((candidate for candidate in every_series
                      if any(Path(name).resolve() == wanted for name in candidate)), None)
        if files is None:
            raise CovnetError(member, "is a DICOM file of no readable series in its folder")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return _through_itk(member or path, reader.Execute)


def _check_3d(image: sitk.Image, path: Path) -> None:
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        raise CovnetError(path, f"is not a 3D volume (size {list(image.GetSize())}); covnet needs 3D CT")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CovnetError(path, "has vector pixels; covnet needs one scalar channel per file")


def read_geometry(path: str | os.PathLike) -> Geometry:
    """Only the header (cheap); DICOM series (a folder, or one file of the series) are read whole."""
    path = Path(path)
    if path.is_dir() or is_dicom_file(path):
        return read_image(path)[1]
    if not path.exists():
        raise CovnetError(path, "file not found")
    _check_file_complete(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _through_itk(path, reader.ReadImageInformation)
    if reader.GetDimension() != 3 or reader.GetSize()[2] < 2:
        raise CovnetError(path, f"is not a 3D volume (size {list(reader.GetSize())}); covnet needs 3D CT")
    return _geometry_of(reader)


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
        if path.is_file() and _is_nifti(path):
            non_finite = max(non_finite, count_non_finite(path))
        if non_finite:
            raise CovnetError(path, f"contains {non_finite} NaN/inf voxels")
    return array, _geometry_of(image)


def from_sitk(image: sitk.Image, name: str) -> tuple[np.ndarray, Geometry]:
    """A 3D scalar SimpleITK image as a (z, y, x) array and its geometry; ``name`` names it in the error."""
    _check_3d(image, Path(name))
    return sitk.GetArrayFromImage(image), _geometry_of(image)


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in geometry.spacing[::-1]))
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def _written_image_problem(path: Path) -> str | None:
    """Why a file ITK has just written is not the whole image (ITK's NIfTI writer prints "wrote only 0 of …
    bytes" on a full disk and returns as if it had succeeded); None when it is complete."""
    problem = not_empty(path)
    if problem:
        return problem
    problem = truncation_problem(path) if _is_nifti(path) else None
    if problem:
        return f"the written file {problem}"
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _native_output_captured() as native_lines:
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            return f"its header cannot be read back ({'; '.join(native_lines[:1]) or last_line(error)})"
    return None


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True) -> None:
    """Write atomically and verified: a killed job or a full disk leaves no partial image under the final
    name, and a write that fails is a one-line ``CovnetError`` (ITK's console messages kept off the terminal)."""
    path = Path(path)
    image = to_sitk(array, geometry)
    with atomic_path(path, verify=_written_image_problem) as temporary:
        with _native_output_captured():
            try:
                sitk.WriteImage(image, str(temporary), useCompression=compress)
                failure = None
            except RuntimeError as error:
                failure = error
        if failure is not None:
            raise incomplete_write(path, last_line(failure))
