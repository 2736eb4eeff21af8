"""DistributedDataParallel on the CPU: two gloo processes under torchrun train one fold and end with identical
weights (the trainer checks it across ranks and says so)."""
from __future__ import annotations

import json
import subprocess

from kit.faults import SCRIPTS, free_port
from kit.workspaces import make_tiny_trainable_workspace

from covnet.checkpoint import Checkpoint


def test_two_processes_train_with_identical_weights(tmp_path):
    workspace = make_tiny_trainable_workspace(tmp_path / "ws")
    result = subprocess.run(
        [str(SCRIPTS / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
         str(free_port()), str(SCRIPTS / "covnet_train"), "0", "--workspace", str(workspace.root), "--epochs", "2",
         "--iters-per-epoch", "2", "--val-iters", "1", "--num-workers", "0", "--no-val-mirroring"],
        capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all 2 processes end with identical weights" in result.stdout
    assert result.stdout.count("epoch 2: train loss") == 1          # only rank 0 reports
    fold = workspace.fold(0)
    assert json.loads((fold / "settings.json").read_text())["world_size"] == 2
    assert Checkpoint.load(fold / "checkpoint_final.pth").epoch == 2
    assert (fold / "validation" / "summary.json").is_file()
