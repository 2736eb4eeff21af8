"""covnet_selftrain at scale: one round's pseudo-labelling split into parts (``--num-parts/--part-id``) and
merged by ``--continue``, and the whole command under torchrun (ranks share the pseudo-labelling, the student
is fine-tuned with DistributedDataParallel over gloo). Both select exactly what the one-process run selects."""
from __future__ import annotations

import json
import subprocess

import pytest
from kit.faults import SCRIPTS, free_port
from kit.workspaces import (
    SELFTRAIN_FLAGS,
    best_validated_round,
    copy_workspace,
    run_selftrain,
    selftrained_workspace_once,
)

from covnet.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return selftrained_workspace_once(tmp_path_factory)


def _selection(workspace, round_index: int) -> dict:
    return json.loads((workspace.selftrain_round(round_index) / "selection.json").read_text())


def _scores(selection: dict, name: str) -> dict:
    return {case: scores[name] for case, scores in selection["scores"].items()}


def _same_scores(merged: dict, expected: dict) -> bool:
    return all(_scores(merged, name) == pytest.approx(_scores(expected, name), abs=1e-6)
               for name in ("agreement", "confidence"))


def test_parts_then_merge_select_what_one_run_selects(trained, uninterrupted, tmp_path, capsys):
    workspace = copy_workspace(trained, tmp_path / "ws")
    assert run_selftrain(workspace, "--num-parts", "2", "--part-id", "2") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--part-id 2" in error[0]
    assert run_selftrain(workspace, "--part-id", "1") == 2
    assert "--part-id 1 needs --num-parts" in capsys.readouterr().err
    for part in ("0", "1"):
        assert run_selftrain(workspace, "--num-parts", "2", "--part-id", part) == 0
        assert "pseudo-labelled part " + part + " of 2: 2 case(s)" in capsys.readouterr().out
    candidates = workspace.selftrain_round(1) / "candidates"
    assert len(list(candidates.glob("*_seg.npy"))) == 4          # the two parts together: the whole pool
    assert not (workspace.selftrain_round(1) / "selection.json").exists()
    assert run_selftrain(workspace, "--continue", "--max-rounds", "1") == 0     # the merge
    assert "pseudo-label [" not in capsys.readouterr().out                   # it predicted nothing again
    expected = _selection(uninterrupted, 1)
    merged = _selection(workspace, 1)
    assert merged["cases_added"] == expected["cases_added"]
    assert _same_scores(merged, expected)
    assert (workspace.selftrain_round(1) / "checkpoint_final.pth").is_file()
    # round 2: parts again, now taught by round 1's student; the merge finishes the self-training
    assert run_selftrain(workspace, "--num-parts", "2", "--part-id", "1") == 0
    capsys.readouterr()
    assert run_selftrain(workspace, "--continue") == 0
    log = capsys.readouterr().out
    assert log.count("pseudo-label [") == 2        # part 0's two cases of the refreshed pool, by the merge itself
    assert sorted(_selection(workspace, 2)["cases_added"]) == sorted(_selection(uninterrupted, 2)["cases_added"])
    summary = json.loads((workspace.selftrain / "summary.json").read_text())
    assert [entry["training_cases"] for entry in summary["rounds"]] == [2, 4]
    assert summary["final"]["round"] == best_validated_round(workspace)
    assert not list(workspace.root.rglob(".tmp-*"))


def test_a_part_waits_for_the_previous_round_student(trained, tmp_path, capsys):
    workspace = copy_workspace(trained, tmp_path / "ws")
    assert run_selftrain(workspace, "--num-parts", "1", "--part-id", "0") == 0
    round_1 = workspace.selftrain_round(1)
    round_1.path.mkdir(parents=True, exist_ok=True)
    # round 1 selected but its student not trained: a part of round 2 has no teacher yet
    (round_1 / "selection.json").write_text(json.dumps({"cases_added": ["x"], "training_cases": {}}))
    capsys.readouterr()
    assert run_selftrain(workspace, "--num-parts", "2", "--part-id", "0") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "round 1's student is not trained yet" in error[0]


def test_torchrun_shares_the_pseudo_labelling_and_fine_tunes_with_ddp(trained, uninterrupted, tmp_path):
    workspace = copy_workspace(trained, tmp_path / "ws")
    result = subprocess.run(
        [str(SCRIPTS / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
         str(free_port()), str(SCRIPTS / "covnet_selftrain"), "--workspace", str(workspace.root), *SELFTRAIN_FLAGS,
         "--max-rounds", "1"],
        capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all 2 processes end with identical weights" in result.stdout
    assert result.stdout.count("summary: ") == 1                       # rank 0 reports
    # rank 0 (the one that logs) predicted half of the pool, rank 1 the other half
    assert result.stdout.count("pseudo-label [") == 2 and "pseudo-label [2/2]" in result.stdout
    merged = _selection(workspace, 1)
    assert len(merged["scores"]) == 4
    expected = _selection(uninterrupted, 1)
    assert merged["cases_added"] == expected["cases_added"]
    assert _same_scores(merged, expected)
    round_dir = workspace.selftrain_round(1)
    assert json.loads((round_dir / "settings.json").read_text())["world_size"] == 2
    assert Checkpoint.load(round_dir / "checkpoint_final.pth").fold == "selftrain_round_01"
    summary = json.loads((workspace.selftrain / "summary.json").read_text())
    assert [entry["round"] for entry in summary["rounds"]] == [1] and summary["final"]["round"] == 1
    assert (round_dir / "validation" / "summary.json").is_file()
    assert not list(workspace.root.rglob(".tmp-*"))
