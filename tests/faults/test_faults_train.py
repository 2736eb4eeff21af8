"""covnet_train under faults: kill -9 while writing a checkpoint (then --continue), data-loader workers
orphaned by a kill, a second run on the same fold and a re-preprocessing while a training reads the cases (both
refused), a damaged checkpoint."""
from __future__ import annotations

import os

import pytest
from kit.faults import (
    SCRIPTS,
    TIMEOUT,
    assert_no_orphans,
    assert_one_line_error,
    children_of,
    run,
    run_crashing,
    run_ok,
    run_without_write_permission,
    snapshot,
    temporaries,
)
from kit.workspaces import TRAIN_FLAGS, copy_workspace, make_tiny_trainable_workspace

from covnet.checkpoint import Checkpoint
from covnet.runtime.locking import exclusive
from covnet.training import run as training_run
from covnet.training.settings import TrainingSettings


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
    assert temporaries(fold.path), "the kill should leave the unfinished checkpoint under a temporary name"
    assert Checkpoint.load(fold.checkpoint("latest")).epoch == 1   # never the partial one
    run_ok("covnet_train", *arguments, "--continue")
    assert temporaries(fold.path) == []
    final = Checkpoint.load(fold.checkpoint("final"))
    assert final.epoch == 3
    assert all(len(curve) == 3 for curve in final.history.values()), "a gap or a repeat in the curves"
    log = fold.log_file.read_text()
    assert "resuming after epoch 1 of 3" in log
    assert fold.validation_summary()["per_case"]


def test_kill_leaves_no_orphaned_data_loader_workers(workspace):
    arguments = ["0", "--workspace", workspace.root, *flags(num_workers=2)]
    _, group = run_crashing("self@checkpoint_latest.pth#1", "covnet_train", *arguments)
    assert_no_orphans(group)


def test_a_training_holds_its_fold_and_the_preprocessed_cases(workspace, monkeypatch):
    """While a training runs, a second one on its fold and covnet_plan_and_preprocess (which would rewrite the
    cases it reads) are refused, naming it. The training is stood in for: the locks are what is tested."""
    preprocessed = snapshot(workspace.preprocessed)
    seen = {}

    def while_training(job, *_, **__):
        seen["train"] = run("covnet_train", "0", "--workspace", workspace.root, *flags())
        seen["plan"] = run("covnet_plan_and_preprocess", "--workspace", workspace.root, "--overwrite")

    monkeypatch.setattr(training_run, "run_training", while_training)
    training_run.train_fold(workspace, "0", TrainingSettings(device="cpu"))
    holder = f"covnet_train (pid {os.getpid()}"
    assert_one_line_error(seen["train"], "is busy", holder, "is writing its fold_0")
    assert_one_line_error(seen["plan"], "is busy", holder, "is reading its preprocessed")
    assert not workspace.fold(0).exists()
    after = snapshot(workspace.preprocessed)
    assert after.pop("splits.json") and after == preprocessed     # the split is the training's; nothing else changed
    # Afterwards both locks are free again.
    with exclusive(workspace.root, "preprocessed"), exclusive(workspace.root, "fold_0"):
        pass


def test_damaged_checkpoint_is_one_line(workspace):
    fold = workspace.fold(0)
    fold.path.mkdir(parents=True)
    fold.checkpoint("latest").write_bytes(b"PK\x03\x04 not really a checkpoint")
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
                               text=True, encoding="utf-8")
    deadline = time.monotonic() + 120
    while not children_of(process.pid) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.1)
    for child in children_of(process.pid):
        __import__("os").kill(child, signal.SIGKILL)
    _, stderr = process.communicate(timeout=TIMEOUT)
    lines = [line for line in stderr.splitlines() if line.startswith("covnet_train: error:")]
    assert process.returncode == 2 and len(lines) == 1 and "data-loading worker process died" in lines[0]
