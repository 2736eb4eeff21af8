"""covnet_train under faults: kill -9 while writing a checkpoint (then --continue), data-loader workers
orphaned by a kill, a second run on the same fold, a damaged checkpoint."""
from __future__ import annotations

import json

import pytest
from kit.faults import (
    SCRIPTS,
    TIMEOUT,
    assert_no_orphans,
    assert_one_line_error,
    assert_second_run_refused,
    children_of,
    run,
    run_crashing,
    run_ok,
    run_without_write_permission,
    temporaries,
)
from kit.workspaces import TRAIN_FLAGS, copy_workspace, make_tiny_trainable_workspace

from covnet.checkpoint import Checkpoint
from covnet.runtime.locking import lock_file


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_tiny_trainable_workspace(tmp_path_factory.mktemp("train_faults") / "ws").root


@pytest.fixture
def workspace(prepared, tmp_path):
    return copy_workspace(prepared, tmp_path / "ws")


def flags(**changes) -> list[str]:
    values = list(TRAIN_FLAGS)
    for name, value in changes.items():
        values[values.index(f"--{name.replace('_', '-')}") + 1] = str(value)
    return values


def test_kill_while_writing_a_checkpoint_then_continue_gives_the_full_run(workspace):
    arguments = ["0", "--workspace", workspace.root, *flags(epochs=3)]
    # The second write of checkpoint_latest.pth (after epoch 2) is killed before its rename.
    run_crashing("self@checkpoint_latest.pth#2", "covnet_train", *arguments)
    fold = workspace.fold(0)
    assert temporaries(fold), "the kill should leave the unfinished checkpoint under a temporary name"
    assert Checkpoint.load(fold / "checkpoint_latest.pth").epoch == 1   # never the partial one
    run_ok("covnet_train", *arguments, "--continue")
    assert temporaries(fold) == []
    final = Checkpoint.load(fold / "checkpoint_final.pth")
    assert final.epoch == 3
    assert all(len(curve) == 3 for curve in final.history.values()), "a gap or a repeat in the curves"
    log = (fold / "training_log.txt").read_text()
    assert "resuming after epoch 1 of 3" in log
    assert json.loads((fold / "validation" / "summary.json").read_text())["per_case"]


def test_kill_leaves_no_orphaned_data_loader_workers(workspace):
    arguments = ["0", "--workspace", workspace.root, *flags(num_workers=2)]
    _, group = run_crashing("self@checkpoint_latest.pth#1", "covnet_train", *arguments)
    assert_no_orphans(group)


def test_second_run_on_the_same_fold_is_refused(workspace):
    arguments = ["0", "--workspace", workspace.root, *flags(epochs=1)]
    assert_second_run_refused("covnet_train", lock_file(workspace.root, "fold_0"), arguments, arguments)


def test_damaged_checkpoint_is_one_line(workspace):
    fold = workspace.fold(0)
    fold.mkdir(parents=True)
    (fold / "checkpoint_latest.pth").write_bytes(b"PK\x03\x04 not really a checkpoint")
    result = run("covnet_train", "0", "--workspace", workspace.root, *flags(), "--continue")
    assert_one_line_error(result, "checkpoint_latest.pth", "is truncated or not a covnet checkpoint")


def test_read_only_results_is_one_line(workspace):
    result = run_without_write_permission(workspace.root, "covnet_train", "0", "--workspace", workspace.root, *flags())
    assert_one_line_error(result, str(workspace.root), "Permission denied")


def test_a_data_worker_that_dies_is_a_clear_error_not_a_hang(workspace):
    import signal
    import subprocess
    import time
    process = subprocess.Popen([str(SCRIPTS / "covnet_train"), "0", "--workspace", str(workspace.root),
                                *flags(epochs=1000, num_workers=1)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while not children_of(process.pid) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.1)
    for child in children_of(process.pid):
        __import__("os").kill(child, signal.SIGKILL)
    _, stderr = process.communicate(timeout=TIMEOUT)
    lines = [line for line in stderr.splitlines() if line.startswith("covnet_train: error:")]
    assert process.returncode == 2 and len(lines) == 1 and "data-loading worker process died" in lines[0]
