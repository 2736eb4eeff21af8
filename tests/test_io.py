import numpy as np
import pytest
import SimpleITK as sitk

from covnet.image.io import Geometry, read_geometry, read_image, write_image
from covnet.runtime.errors import CovnetError

OBLIQUE = (0.0, 0.6, 0.8, 1.0, 0.0, 0.0, 0.0, 0.8, -0.6)   # a proper rotation, far from identity


def sample_volume(shape=(5, 7, 9)):
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 1000, size=shape).astype(np.int16)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_geometry_round_trips_exactly(tmp_path, suffix):
    volume = sample_volume()
    geometry = Geometry(spacing=(2.5, 0.75, 0.625), origin=(-123.5, 17.25, 300.0), direction=OBLIQUE,
                        shape=volume.shape)
    path = tmp_path / f"case{suffix}"
    write_image(volume, geometry, path)
    array, read_back = read_image(path)
    np.testing.assert_array_equal(array, volume)
    assert read_back.shape == volume.shape
    np.testing.assert_allclose(read_back.spacing, geometry.spacing, rtol=0, atol=1e-6)
    np.testing.assert_allclose(read_back.origin, geometry.origin, rtol=0, atol=1e-5)
    np.testing.assert_allclose(read_back.direction, geometry.direction, rtol=0, atol=1e-6)
    assert read_geometry(path).matches(read_back)


def test_axis_order_is_z_y_x(tmp_path):
    """SimpleITK's size is (x, y, z); covnet's arrays and spacing are (z, y, x)."""
    image = sitk.Image(9, 7, 5, sitk.sitkInt16)   # x=9, y=7, z=5
    image.SetSpacing((0.5, 0.6, 3.0))
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    array, geometry = read_image(tmp_path / "a.nii.gz")
    assert array.shape == (5, 7, 9) and geometry.shape == (5, 7, 9)
    assert geometry.spacing == pytest.approx((3.0, 0.6, 0.5))


def test_dicom_series_is_read_with_its_geometry(tmp_path, dicom_series_writer):
    volume = sample_volume((6, 8, 10))
    dicom_series_writer(volume, tmp_path / "series", spacing_zyx=(2.5, 0.8, 0.7), origin_xyz=(-100, -120, 30))
    array, geometry = read_image(tmp_path / "series")
    np.testing.assert_array_equal(array, volume)
    assert geometry.spacing == pytest.approx((2.5, 0.8, 0.7), abs=1e-4)
    assert geometry.origin == pytest.approx((-100, -120, 30), abs=1e-4)


def test_write_is_atomic_and_leaves_no_temporary(tmp_path):
    volume = sample_volume()
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), volume.shape)
    with pytest.raises(ValueError):
        write_image(volume[:2], geometry, tmp_path / "bad.nii.gz")
    write_image(volume, geometry, tmp_path / "good.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.nii.gz"]


def test_two_dimensional_image_is_refused(tmp_path):
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(CovnetError, match="flat.nii.gz: is not a 3D volume"):
        read_image(tmp_path / "flat.nii.gz")


def test_non_finite_voxels_are_refused(tmp_path):
    volume = sample_volume().astype(np.float32)
    volume[1, 2, 3] = np.nan
    volume[0, 0, 0] = np.inf
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), volume.shape)
    write_image(volume, geometry, tmp_path / "nan.nii.gz")
    with pytest.raises(CovnetError, match="nan.nii.gz: contains 2 NaN/inf voxels"):
        read_image(tmp_path / "nan.nii.gz")


def test_unreadable_file_is_refused(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"this is not a nifti file")
    with pytest.raises(CovnetError, match="broken.nii.gz: is truncated or unreadable"):
        read_image(tmp_path / "broken.nii.gz")
