"""The reliability patterns every command relies on: damaged files are refused, dead runs' temporary files are
swept, workspace locks (a writer's, and readers' shared ones) name their holder and die with it, workers die with
their parent, a damaged checkpoint is refused without advice to load it unsafely."""
from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from kit.images import make_tiny_case

from covnet.checkpoint import Checkpoint
from covnet.image.io import read_geometry, read_image, write_image
from covnet.runtime.atomic import atomic_path, process_alive, sweep_dead_temporaries, temporary_sibling
from covnet.runtime.errors import CovnetError
from covnet.runtime.locking import exclusive, holding, lock_file, readers_folder, shared


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


HOLD = """
import sys, time
from covnet.runtime.errors import CovnetError
from covnet.runtime.locking import exclusive, shared
root, mode, command, scope, seconds = sys.argv[1:]
try:
    with (shared if mode == "reading" else exclusive)(root, scope, command):
        print("held", flush=True)
        time.sleep(float(seconds))
except CovnetError as error:
    sys.exit(str(error))
"""


def start_holder(root, mode: str, command: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root), mode, command, "preprocessed", "60"],
                              stdout=subprocess.PIPE, text=True, encoding="utf-8")
    assert holder.stdout.readline().strip() == "held"
    return holder


def refusal_in_another_process(root, mode: str, scope: str) -> str:
    """What another process is told when it tries to hold ``scope`` (empty when it could)."""
    other = subprocess.run([sys.executable, "-c", HOLD, str(root), mode, "other", scope, "0"], capture_output=True,
                           text=True, encoding="utf-8", timeout=60)
    return other.stderr.strip()


def refusal_here(root, mode: str, scope: str = "preprocessed") -> str:
    """What this process is told when it tries to hold ``scope`` (it must be refused)."""
    with pytest.raises(CovnetError) as raised:
        with (shared if mode == "reading" else exclusive)(root, scope, "this test"):
            pass
    return raised.value.problem


def stop(*holders: subprocess.Popen) -> None:
    for holder in holders:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = start_holder(tmp_path, "writing", "holder-command")
    try:
        problem = refusal_here(tmp_path, "writing")
        assert "is busy" in problem and f"pid {holder.pid}" in problem and "holder-command" in problem
        with exclusive(tmp_path, "raw", "other scope"):  # other parts of the workspace stay free
            pass
    finally:
        stop(holder)
    assert json.loads(lock_file(tmp_path, "preprocessed").read_text())["pid"] == holder.pid  # stale content
    with exclusive(tmp_path, "preprocessed", "after the kill"):
        assert json.loads(lock_file(tmp_path, "preprocessed").read_text())["pid"] == os.getpid()


def test_a_reader_refuses_the_writer_naming_it_and_dies_with_it(tmp_path):
    reader = start_holder(tmp_path, "reading", "covnet_train")
    try:
        problem = refusal_here(tmp_path, "writing")
        assert problem.startswith(f"is busy: covnet_train (pid {reader.pid}, since ")
        assert "is reading its preprocessed" in problem
        with shared(tmp_path, "preprocessed", "another reader"):   # readers share
            pass
    finally:
        stop(reader)
    with exclusive(tmp_path, "preprocessed", "after the kill"):
        assert json.loads(lock_file(tmp_path, "preprocessed").read_text())["pid"] == os.getpid()
    assert list(readers_folder(tmp_path, "preprocessed").iterdir()) == []   # the dead reader's record is gone


def test_two_readers_are_both_named_and_a_writer_refuses_readers(tmp_path):
    readers = [start_holder(tmp_path, "reading", name) for name in ("covnet_train", "covnet_selftrain")]
    try:
        problem = refusal_in_another_process(tmp_path, "writing", "preprocessed")
        assert f"covnet_train (pid {readers[0].pid}" in problem and f"covnet_selftrain (pid {readers[1].pid}" in problem
        assert "are reading its preprocessed" in problem
    finally:
        stop(*readers)
    writer = start_holder(tmp_path, "writing", "covnet_plan_and_preprocess")
    try:
        problem = refusal_here(tmp_path, "reading")
        assert problem.startswith(f"is busy: covnet_plan_and_preprocess (pid {writer.pid}")
        assert "is writing its preprocessed" in problem
    finally:
        stop(writer)
    with shared(tmp_path, "preprocessed", "after the kill"):
        pass


def test_one_process_never_mixes_a_read_and_a_write_of_one_scope(tmp_path):
    """A record lock belongs to the process, so the kernel would let it write what it reads: refused here, and a
    nested read does not drop the outer one."""
    with shared(tmp_path, "preprocessed", "covnet_train"):
        with shared(tmp_path, "preprocessed", "nested reader"):
            pass
        assert refusal_here(tmp_path, "writing").startswith(f"is busy: covnet_train (pid {os.getpid()}")
        assert "is reading its preprocessed" in refusal_in_another_process(tmp_path, "writing", "preprocessed")
    with exclusive(tmp_path, "preprocessed", "covnet_plan_and_preprocess"):
        assert "is writing its preprocessed" in refusal_here(tmp_path, "reading")


def test_holding_takes_the_write_and_read_locks_and_sweeps(tmp_path):
    output = tmp_path / "results" / "fold_0"
    output.mkdir(parents=True)
    stale = output / ".tmp-999999999-0123abcd-checkpoint_latest.pth"
    stale.write_text("partial")
    with holding(tmp_path, "fold_0", "covnet_train", sweep=[output], reading=["preprocessed"]):
        assert not stale.exists()
        assert f"covnet_train (pid {os.getpid()}" in refusal_in_another_process(tmp_path, "reading", "fold_0")
        assert "is reading its preprocessed" in refusal_in_another_process(tmp_path, "writing", "preprocessed")
        assert refusal_in_another_process(tmp_path, "reading", "preprocessed") == ""
    with holding(tmp_path, "fold_0", "covnet_train", main_process=False):   # other ranks take nothing
        assert refusal_in_another_process(tmp_path, "writing", "fold_0") == ""


def test_a_truncated_checkpoint_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    Checkpoint(plan={}, fold="0", settings={}, network_state={"weight": torch.ones(2000)}).save(path)
    assert Checkpoint.load(path).network_state["weight"].sum() == 2000
    data = path.read_bytes()
    for keep in (0.1, 0.5, 0.9, 0.999):
        path.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(CovnetError) as raised:
            Checkpoint.load(path)
        assert raised.value.problem.startswith("is truncated or not a covnet checkpoint (")
        assert "weights_only" not in str(raised.value) and "\n" not in str(raised.value)


def test_a_checkpoint_with_code_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"format": 1, "settings": argparse.Namespace(epochs=1)}, path)
    with pytest.raises(CovnetError) as raised:
        Checkpoint.load(path)
    message = str(raised.value)
    assert "is truncated or not a covnet checkpoint (it holds objects a safe weights-only load refuses" in message
    assert "argparse.Namespace" in message and "weights_only" not in message and "\n" not in message


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
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, text=True, encoding="utf-8")
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
