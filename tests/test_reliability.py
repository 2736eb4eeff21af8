"""The reliability patterns every command relies on: damaged files are refused, dead runs' temporary files are
swept, workspace locks name their holder and die with it, workers die with their parent."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from kit.images import make_tiny_case

from covnet.image.io import read_geometry, read_image, write_image
from covnet.runtime.atomic import atomic_path, process_alive, sweep_dead_temporaries, temporary_sibling
from covnet.runtime.errors import CovnetError
from covnet.runtime.locking import exclusive, lock_file


@pytest.fixture
def tiny_image_file(tmp_path):
    def write(suffix: str):
        image, _, geometry = make_tiny_case(0)
        path = tmp_path / f"image{suffix}"
        write_image(image, geometry, path, compress=suffix != ".nii")
        return path, image
    return write


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("keep", [0.95, 0.5])
def test_a_cut_off_file_is_refused_naming_it(tiny_image_file, suffix, keep, capfd):
    path, _ = tiny_image_file(suffix)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CovnetError) as raised:
        read_image(path)
    assert raised.value.path == str(path) and "truncated" in raised.value.problem
    assert "No such file" not in raised.value.problem
    # ITK's own console lines (MetaIO's "data not read completely") stay off the console.
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_a_zero_byte_file_is_called_empty(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    for reader in (read_image, read_geometry):
        with pytest.raises(CovnetError, match="is empty"):
            reader(path)


def test_complete_files_still_read_exactly(tiny_image_file):
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd"):
        path, image = tiny_image_file(suffix)
        assert np.array_equal(read_image(path)[0], image)


def test_a_nifti_gzip_whose_trailer_disagrees_is_decompressed_to_decide(tiny_image_file, tmp_path):
    # Two gzip members (legal, e.g. written by concatenation): the last trailer counts only the second member.
    path, image = tiny_image_file(".nii.gz")
    raw = gzip.decompress(path.read_bytes())
    split = tmp_path / "two_members.nii.gz"
    split.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert np.array_equal(read_image(split)[0], image)
    cut = tmp_path / "cut_members.nii.gz"
    cut.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])[:-40])
    with pytest.raises(CovnetError, match="truncated"):
        read_image(cut)


def test_sweep_removes_only_dead_writers_temporaries(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    nested = tmp_path / "cases"
    nested.mkdir()
    dead_file = nested / f".tmp-{dead.pid}-0123abcd-case.npy"
    dead_folder = tmp_path / f".tmp-{dead.pid}-0123abcd-staging"
    live_file = temporary_sibling(tmp_path / "live.npy")      # this process is alive
    foreign = tmp_path / ".tmp-not-ours.npy"
    for path in (dead_file, live_file, foreign):
        path.write_bytes(b"x")
    dead_folder.mkdir()
    (dead_folder / "inside.nii.gz").write_bytes(b"x")
    removed = sweep_dead_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead_file, dead_folder])
    assert live_file.exists() and foreign.exists() and not dead_file.exists() and not dead_folder.exists()


def test_a_reused_pid_does_not_keep_a_temporary_alive(tmp_path):
    # pid 1 runs, but this file was last written (1970) before pid 1 started: it cannot be the writer.
    stale = tmp_path / ".tmp-1-0123abcd-case.npy"
    stale.write_bytes(b"x")
    recent = tmp_path / ".tmp-1-4567abcd-case.npy"   # written while pid 1 ran: it might be pid 1's
    recent.write_bytes(b"x")
    os.utime(stale, (0, 0))
    assert process_alive(1)
    assert sweep_dead_temporaries(tmp_path) == [stale]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


HOLD_LOCK = """
import sys, time
from covnet.runtime.locking import exclusive
with exclusive(sys.argv[1], "preprocessed", "holder-command"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CovnetError) as raised:
            with exclusive(tmp_path, "preprocessed", "second"):
                pass
        assert "is busy" in raised.value.problem and f"pid {holder.pid}" in raised.value.problem
        assert "holder-command" in raised.value.problem
        with exclusive(tmp_path, "raw", "other scope"):  # other parts of the workspace stay free
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads(lock_file(tmp_path, "preprocessed").read_text())["pid"] == holder.pid  # stale content
    with exclusive(tmp_path, "preprocessed", "after the kill"):
        assert json.loads(lock_file(tmp_path, "preprocessed").read_text())["pid"] == os.getpid()


ORPHAN = """
import os, sys, time
from covnet.runtime.parallel import die_with_parent
parent = os.getpid()
pid = os.fork()
if pid == 0:
    die_with_parent(parent)
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(60)
"""


def test_a_worker_exits_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = process_alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the worker outlived its killed parent"
