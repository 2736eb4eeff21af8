"""covnet_selftrain under faults: kill -9 while writing a round's selection.json or its student's checkpoint,
then --continue selects the same cases as an uninterrupted run and leaves no temporaries; a second run at the
same time is refused."""
from __future__ import annotations

import json

import pytest
from kit.faults import assert_second_run_refused, run_crashing, run_ok, temporaries
from kit.workspaces import SELFTRAIN_FLAGS, copy_workspace, selftrained_workspace_once, trained_workspace_once

from covnet.checkpoint import Checkpoint
from covnet.runtime.locking import lock_file

# The uninterrupted run (test_selftrain's, 2 rounds) has the same teacher and settings, so its first round is
# what this one-round run must select.
FLAGS = (*SELFTRAIN_FLAGS, "--max-rounds", "1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return selftrained_workspace_once(tmp_path_factory)


@pytest.mark.parametrize("rule", ["self@selection.json#1", "self@checkpoint_final.pth#1"])
def test_kill_then_continue_selects_the_same_cases(uninterrupted, tmp_path_factory, rule):
    workspace = copy_workspace(trained_workspace_once(tmp_path_factory), tmp_path_factory.mktemp("st") / "ws")
    arguments = ["--workspace", workspace.root, *FLAGS]
    run_crashing(rule, "covnet_selftrain", *arguments)
    round_dir = workspace.selftrain_round(1)
    assert temporaries(workspace.selftrain), "the kill should leave the unfinished file under a temporary name"
    assert not (round_dir / "checkpoint_final.pth").exists()
    assert (round_dir / "selection.json").is_file() == rule.startswith("self@checkpoint")
    if rule.startswith("self@checkpoint"):
        # The resumed run holds the lock: a second run at the same time is refused, then the first completes.
        assert_second_run_refused("covnet_selftrain", lock_file(workspace.root, "selftrain"),
                                  [*arguments, "--continue"], [*arguments, "--continue"])
    else:
        run_ok("covnet_selftrain", *arguments, "--continue")
    assert temporaries(workspace.root) == []
    expected = json.loads((uninterrupted.selftrain_round(1) / "selection.json").read_text())["cases_added"]
    summary = json.loads((workspace.selftrain / "summary.json").read_text())
    assert [entry["cases_added"] for entry in summary["rounds"]] == [expected]
    assert Checkpoint.load(workspace.selftrain_final / "checkpoint_final.pth").fold == "selftrain_round_01"
    assert (round_dir / "validation" / "summary.json").is_file()
    assert len(list((round_dir / "candidates").glob("*.json"))) == 4      # the last round's, kept for a continuation
