"""A full disk: every covnet writer (label maps, preprocessed arrays, checkpoints, JSON) refuses to rename a
partial file onto its final name and says so in one line; what was finished before stays.

The disk is a real 256 KiB tmpfs (it needs root, or the test is skipped): SimpleITK's NIfTI writer then prints
"wrote only 0 of … bytes" and returns as if it had written the file, torch raises "unexpected pos", numpy
raises ENOSPC without a file name. One test imitates ITK's short write on an ordinary disk, so that the
verification itself is checked everywhere.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from kit.faults import assert_one_line_error, run, temporaries
from kit.workspaces import phantom_image

import covnet.image.io as image_io
from covnet.checkpoint import Checkpoint
from covnet.image.io import Geometry, read_image, write_image
from covnet.preprocessing.storage import save_array
from covnet.runtime.atomic import write_json
from covnet.runtime.errors import CovnetError

TINY_DISK = "256k"
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def mount_tmpfs(folder, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a tiny disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True, encoding="utf-8")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tiny tmpfs here ({mounted.stderr.strip() or mounted.returncode})")


def resize_tmpfs(folder, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


@pytest.fixture
def tiny_disk(tmp_path):
    folder = tmp_path / "disk"
    mount_tmpfs(folder, TINY_DISK)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def noise_volume(shape=(40, 100, 100)) -> tuple[np.ndarray, Geometry]:
    """Incompressible voxels: 800 KB as int16 that no compression squeezes under the 256 KiB disk."""
    array = np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16)
    return array, Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY, shape)


def assert_disk_full_error(raised: pytest.ExceptionInfo, final) -> None:
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{final}: could not be written completely"), message
    assert "the disk is full" in message, message


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_an_image_written_into_a_full_disk_is_one_line_and_leaves_nothing(tiny_disk, suffix, capfd):
    array, geometry = noise_volume()
    small, small_geometry = np.zeros((4, 8, 8), np.uint8), Geometry((1.0,) * 3, (0.0,) * 3, IDENTITY, (4, 8, 8))
    write_image(small, small_geometry, tiny_disk / f"finished{suffix}")
    final = tiny_disk / f"label{suffix}"
    with pytest.raises(CovnetError) as raised:
        write_image(array, geometry, final)
    assert_disk_full_error(raised, final)
    assert sorted(path.name for path in tiny_disk.iterdir()) == [f"finished{suffix}"]   # no partial, no temporary
    assert np.array_equal(read_image(tiny_disk / f"finished{suffix}")[0], small)
    console = capfd.readouterr()
    assert "wrote only" not in console.err + console.out and "ITK" not in console.err + console.out


def test_a_preprocessed_array_written_into_a_full_disk_is_one_line(tiny_disk):
    final = tiny_disk / "case.npy"
    with pytest.raises(CovnetError) as raised:
        save_array(final, np.ones((1, 50, 50, 50), np.float32))
    assert_disk_full_error(raised, final)
    assert list(tiny_disk.iterdir()) == []


def test_a_checkpoint_saved_into_a_full_disk_is_one_line(tiny_disk):
    final = tiny_disk / "checkpoint_latest.pth"
    checkpoint = Checkpoint(plan={}, fold="0", settings={}, network_state={"weight": torch.ones(100_000)})
    with pytest.raises(CovnetError) as raised:
        checkpoint.save(final)
    assert_disk_full_error(raised, final)
    assert list(tiny_disk.iterdir()) == []


def test_json_written_into_a_full_disk_is_one_line(tiny_disk):
    write_json(tiny_disk / "small.json", {"kept": True})
    final = tiny_disk / "summary.json"
    with pytest.raises(CovnetError) as raised:
        write_json(final, {"values": list(range(100_000))})
    assert_disk_full_error(raised, final)
    assert [path.name for path in tiny_disk.iterdir()] == ["small.json"]


def test_a_short_image_write_is_refused_on_any_disk(tmp_path, monkeypatch):
    """ITK's behaviour on a full disk, imitated: a NIfTI cut after its header and a console message."""
    real_write = image_io.sitk.WriteImage

    def short_write(image, path, useCompression=True):
        real_write(image, path, useCompression=useCompression)
        with open(path, "r+b") as handle:
            handle.truncate(400)
        os.write(2, b"** ERROR: NWAD: wrote only 0 of 800000 bytes to file\n")

    monkeypatch.setattr(image_io.sitk, "WriteImage", short_write)
    array, geometry = noise_volume((20, 30, 30))
    final = tmp_path / "label.nii"
    with pytest.raises(CovnetError) as raised:
        write_image(array, geometry, final)
    assert str(raised.value).startswith(f"{final}: could not be written completely (the written file is truncated")
    assert list(tmp_path.iterdir()) == []


def test_predict_into_a_full_disk_stops_in_one_line_and_continue_redoes_only_the_cut_case(trained, tmp_path):
    """Two identical CTs; the disk holds the outputs of one. The first run stops at the second label map with
    one line and keeps the first; after the disk grows, --continue skips the first and writes the second."""
    image, geometry = phantom_image(trained, 0)
    inputs = tmp_path / "in"
    for name in ("a", "b"):
        write_image(image, geometry, inputs / f"{name}.nii.gz")
    probe = tmp_path / "probe"
    arguments = ["--workspace", trained.root, "--disable-tta", "--device", "cpu", "--runtime", "torch"]
    assert run("covnet_predict", "-i", inputs, "-o", probe, *arguments).returncode == 0
    one_case = sum(-(-path.stat().st_size // 4096) * 4096 for path in probe.rglob("*")
                   if path.is_file() and path.name.startswith("a"))
    output = tmp_path / "out"
    mount_tmpfs(output, str(one_case + 8192))
    try:
        result = run("covnet_predict", "-i", inputs, "-o", output, *arguments)
        line = assert_one_line_error(result, "could not be written completely", "the disk is full")
        assert "Traceback" not in result.stderr and "wrote only" not in result.stderr + result.stdout
        assert (output / "a.nii.gz").is_file() and not (output / "b.nii.gz").exists(), line
        assert temporaries(output) == []
        np.testing.assert_array_equal(read_image(output / "a.nii.gz")[0], read_image(probe / "a.nii.gz")[0])
        resize_tmpfs(output, "16m")
        resumed = run("covnet_predict", "-i", inputs, "-o", output, "--continue", *arguments)
        assert resumed.returncode == 0, resumed.stderr
        assert "1 case(s) written, 1 already done" in resumed.stdout
        np.testing.assert_array_equal(read_image(output / "b.nii.gz")[0], read_image(probe / "b.nii.gz")[0])
    finally:
        subprocess.run(["umount", "-l", str(output)], check=False)
