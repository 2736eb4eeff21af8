"""Nothing leaves the machine: every covnet command, and the Python API, runs end to end on tiny phantoms without
one host-name lookup or internet connection, in any of its processes (workers included), OpenVINO's runtime too;
and nothing is written into the user's home (OpenVINO's telemetry keeps its client id in ~/intel)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from pathlib import Path

from kit.faults import SCRIPTS
from kit.network_watch import watched_environment, watching
from kit.workspaces import TINY_PATCH, tiny_topology

import covnet
from covnet.planning.plans import Plan
from covnet.workspace import Workspace

TINY_STEPS = ("--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1", "--no-val-mirroring")
API_SCRIPT = """
import sys, covnet
result = covnet.load_model(sys.argv[1]).segment(sys.argv[2])
assert result.labels.any(), "the API segmented nothing"
"""


class Watched:
    """Runs commands in the watched environment and says what they attempted."""

    def __init__(self, folder: Path):
        self.environment, self.log = watched_environment(folder)
        self.home = Path(self.environment["HOME"])

    def run(self, *command) -> None:
        result = subprocess.run([str(part) for part in command], env=self.environment, capture_output=True,
                                text=True, encoding="utf-8", timeout=300)
        assert result.returncode == 0, f"{Path(str(command[0])).name} failed:\n{result.stderr[-3000:]}"

    def covnet(self, name: str, *args) -> None:
        self.run(SCRIPTS / name, *args)

    def attempts(self) -> list[str]:
        return self.log.read_text(encoding="utf-8").splitlines()


def test_the_watch_sees_lookups_and_connects_in_every_process_but_not_local_sockets(tmp_path):
    watched = Watched(tmp_path)
    probe = """
import multiprocessing, socket, sys
def look_up():
    try:
        socket.getaddrinfo("covnet-watch.invalid", 80)
    except OSError:
        pass
if __name__ == "__main__":
    look_up()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as internet:
        try:
            internet.connect(("127.0.0.1", 9))
        except OSError:
            pass
    left, right = socket.socketpair(socket.AF_UNIX)
    left.sendall(b"local"); assert right.recv(5) == b"local"
    worker = multiprocessing.get_context("spawn").Process(target=look_up)
    worker.start(); worker.join()
    assert worker.exitcode == 0
"""
    (tmp_path / "probe.py").write_text(probe)      # a file: a spawned worker imports its main module
    watched.run(sys.executable, tmp_path / "probe.py")
    attempts = watched.attempts()
    assert len(attempts) == 3, attempts
    assert "socket.getaddrinfo" in attempts[0] and "socket.connect" in attempts[1] and "127.0.0.1" in attempts[1]
    assert "socket.getaddrinfo" in attempts[2] and attempts[2].split()[1] != attempts[0].split()[1]  # the worker
    with watching() as seen:
        try:
            __import__("socket").gethostbyname("covnet-watch.invalid")
        except OSError:
            pass
    assert len(seen) == 1 and "socket.gethostbyname" in seen[0]


def _shrink_plan(workspace: Workspace) -> None:
    """The tiny network and patch of the tests' workspaces (kit.workspaces): an iteration takes milliseconds."""
    plan = Plan.load(workspace.plans_json)
    dataclasses.replace(plan, patch_size=list(TINY_PATCH), batch_size=2, network=tiny_topology(plan)).save(
        workspace.plans_json)


def _join_new_threads(before: set[threading.Thread]) -> None:
    """Give the threads a run started (a library's reporting thread, say) time to finish, so that what they send
    is seen."""
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=5)


def test_no_command_reaches_the_network(tmp_path):
    watched = Watched(tmp_path / "watch")
    workspace = Workspace(tmp_path / "ws")
    watched.covnet("covnet_make_phantoms", "--workspace", workspace.root, "--num-labelled", "4",
                   "--num-unlabelled", "2")
    watched.covnet("covnet_plan_and_preprocess", "--workspace", workspace.root, "--device", "cpu",
                   "--no-measure-cpu-time", "--plan-only")
    _shrink_plan(workspace)
    watched.covnet("covnet_plan_and_preprocess", "--workspace", workspace.root, "-np", "2")   # worker processes
    watched.covnet("covnet_train", "all", "--workspace", workspace.root, *TINY_STEPS, "--num-workers", "1")
    watched.covnet("covnet_selftrain", "--workspace", workspace.root, "--teacher", "all", "--holdout", "none",
                   "--no-teacher-mirroring", *TINY_STEPS, "--num-workers", "0")
    image = sorted(workspace.images_tr.glob("*_0000.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "case_0000.nii.gz").symlink_to(image)
    for runtime in ("openvino", "torch"):
        watched.covnet("covnet_predict", "-i", inputs, "-o", tmp_path / runtime, "--workspace", workspace.root,
                       "--runtime", runtime)
        assert (tmp_path / runtime / "case.nii.gz").is_file()
    archive = tmp_path / "model.zip"
    watched.covnet("covnet_export_model", "--workspace", workspace.root, "-o", archive)
    watched.covnet("covnet_install_model", archive)
    watched.run(sys.executable, "-c", API_SCRIPT, archive, image)     # OpenVINO, the CPU default
    attempts = watched.attempts()
    assert not attempts, f"{len(attempts)} network attempts, the first: " + "\n".join(attempts[:3])
    assert not (watched.home / "intel").exists(), "something wrote OpenVINO's telemetry files into the home folder"

    before = set(threading.enumerate())
    with watching() as attempts:          # the API in this process too
        result = covnet.load_model(archive).segment(image)
        _join_new_threads(before)
    assert result.labels.any() and attempts == []
