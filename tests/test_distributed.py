"""DistributedDataParallel on the CPU: two gloo processes under torchrun train one fold and end with identical
weights (the trainer checks it across ranks and says so); a SIGTERM to one rank, or to both at different
moments (a scheduler's preemption), stops every rank at the same iteration, rank 0 writes the checkpoint, and
``--continue`` resumes it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from kit.faults import SCRIPTS, children_of, free_port, live_processes_in_group, run_ok
from kit.workspaces import make_tiny_trainable_workspace

from covnet.checkpoint import Checkpoint

# Guards against a hang, not speed targets (a 2-core machine shared with other jobs).
START_SECONDS = 240
STOP_SECONDS = 90


def torchrun_command(workspace, fold: str, *flags: str) -> list[str]:
    return [str(SCRIPTS / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), str(SCRIPTS / "covnet_train"), fold, "--workspace", str(workspace.root), *flags]


def test_two_processes_train_with_identical_weights(tmp_path):
    workspace = make_tiny_trainable_workspace(tmp_path / "ws")
    result = subprocess.run(
        torchrun_command(workspace, "0", "--epochs", "2", "--iters-per-epoch", "2", "--val-iters", "1",
                         "--num-workers", "0", "--no-val-mirroring"),
        capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all 2 processes end with identical weights" in result.stdout
    assert result.stdout.count("epoch 2: train loss") == 1          # only rank 0 reports
    fold = workspace.fold(0)
    assert json.loads((fold / "settings.json").read_text())["world_size"] == 2
    assert Checkpoint.load(fold / "checkpoint_final.pth").epoch == 2
    assert (fold / "validation" / "summary.json").is_file()


def rank_of(pid: int) -> int:
    """The RANK torchrun gave the worker process ``pid`` (from its environment)."""
    environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(item for item in environment if item.startswith(b"RANK=")).split(b"=", 1)[1])


def wait_until(condition, seconds: float, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"torchrun ended ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {seconds} s")
        time.sleep(0.2)


def train_until_sigterm(workspace, output: Path, signalled_ranks: tuple[int, ...], *flags: str) -> str:
    """Train fold 'all' with 2 ranks (for far more epochs than it gets) until its next epoch ends, send SIGTERM
    to ``signalled_ranks`` a second apart, and return torchrun's output once every rank has exited (a rank that
    does not exit within ``STOP_SECONDS`` fails the test)."""
    log = workspace.fold("all") / "training_log.txt"
    epochs_logged = log.read_text().count(": train loss") if log.is_file() else 0
    with open(output, "w") as sink:
        torchrun = subprocess.Popen(torchrun_command(workspace, "all", "--epochs", "1000", "--iters-per-epoch", "2",
                                                     "--val-iters", "1", "--num-workers", "0", *flags),
                                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: log.is_file() and log.read_text().count(": train loss") > epochs_logged, START_SECONDS,
                   "epoch", torchrun)
        ranks = {rank_of(pid): pid for pid in children_of(torchrun.pid)}
        assert sorted(ranks) == [0, 1], ranks
        for index, rank in enumerate(signalled_ranks):
            time.sleep(1.0 if index else 0.0)
            os.kill(ranks[rank], signal.SIGTERM)
        try:
            torchrun.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the ranks did not stop within {STOP_SECONDS} s of the SIGTERM to rank(s) "
                        f"{signalled_ranks}:\n{output.read_text()[-3000:]}")
        deadline = time.monotonic() + 10
        while live_processes_in_group(torchrun.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not live_processes_in_group(torchrun.pid), "a rank outlived torchrun"
    finally:
        if torchrun.poll() is None or live_processes_in_group(torchrun.pid):
            os.killpg(torchrun.pid, signal.SIGKILL)
            torchrun.wait()
    text = output.read_text()
    assert text.count("stopped during epoch") == 1, text[-3000:]          # the ranks stopped together
    assert (workspace.fold("all") / "checkpoint_latest.pth").is_file(), text[-3000:]
    return text


def test_sigterm_to_one_rank_or_to_both_stops_every_rank_and_continue_resumes(tmp_path):
    """A SIGTERM to rank 1 only, then (in the continued run) to both ranks a second apart, as a scheduler's
    preemption does (rank 1 first: before, it stopped alone and rank 0, which writes the checkpoint, was torn
    down without writing it): every rank exits, rank 0 has written checkpoint_latest.pth, and --continue
    resumes it; the last --continue finishes the training."""
    workspace = make_tiny_trainable_workspace(tmp_path / "ws")
    fold = workspace.fold("all")
    latest = fold / "checkpoint_latest.pth"
    train_until_sigterm(workspace, tmp_path / "one_rank.log", (1,))
    first_stop = Checkpoint.load(latest).epoch
    assert first_stop >= 1
    text = train_until_sigterm(workspace, tmp_path / "both_ranks.log", (1, 0), "--continue")
    assert f"resuming after epoch {first_stop} of 1000" in text
    second_stop = Checkpoint.load(latest).epoch
    assert second_stop > first_stop
    resumed = run_ok("covnet_train", "all", "--workspace", workspace.root, "--continue", "--epochs",
                     second_stop + 1, "--iters-per-epoch", "2", "--val-iters", "0", "--num-workers", "0")
    assert f"resuming after epoch {second_stop} of {second_stop + 1}" in resumed.stdout + resumed.stderr
    assert Checkpoint.load(fold / "checkpoint_final.pth").epoch == second_stop + 1 and not latest.exists()
