"""Every command, through its installed console script, on generated phantom CTs: make phantoms, import them
as the public release plus a pool, plan and preprocess, train a fold, self-train, predict, evaluate."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kit.releases import as_covid19ctseg_release

from covnet.dataset import DatasetDescription
from covnet.planning.plans import Plan
from covnet.preprocessing.storage import load_case

SCRIPTS = Path(sys.executable).parent


def run(command: str, *args) -> str:
    result = subprocess.run([str(SCRIPTS / command), *map(str, args)], capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout



def test_phantoms_import_plan_preprocess_evaluate(tmp_path):
    phantoms = tmp_path / "phantoms"
    run("covnet_make_phantoms", "--workspace", phantoms, "--num-labelled", 10, "--num-unlabelled", 2,
        "--num-test", 1, "--seed", 3)

    # The reference against itself is perfect (the sanity check).
    summary_file = tmp_path / "self" / "summary.json"
    printed = run("covnet_evaluate", "--ref", phantoms / "raw" / "labelsTr", "--pred", phantoms / "raw" / "labelsTr",
                  "-o", summary_file)
    summary = json.loads(summary_file.read_text())
    assert "left_lung" in printed and summary_file.with_suffix(".csv").is_file()
    for name in ("left_lung", "right_lung", "lungs", "infection"):
        assert summary["mean"][name] == {"dice": 1.0, "nsd": 1.0}

    # The same cases as a COVID-19-CT-Seg release, imported into a fresh workspace, plus an unlabelled pool.
    workspace = tmp_path / "workspace"
    cases = as_covid19ctseg_release(phantoms / "raw", tmp_path / "release")
    run("covnet_import_covid19ctseg", "--source", tmp_path / "release", "--workspace", workspace)
    run("covnet_import_unlabelled", "--source", phantoms / "raw" / "imagesUnlabelled", "--workspace", workspace)
    description = DatasetDescription.load(workspace / "raw" / "dataset.json")
    assert description.num_training == len(cases) == 10

    printed = run("covnet_plan_and_preprocess", "--workspace", workspace, "-np", 2, "--device", "cpu",
                  "--no-measure-cpu-time")
    assert "patch size" in printed and "target spacing" in printed
    plan = Plan.load(workspace / "preprocessed" / "plans.json")
    for case in ("coronacases_001", "coronacases_010"):
        image, segmentation, properties = load_case(workspace / "preprocessed" / "cases", case)
        assert list(image.shape[1:]) == properties.shape_after_resampling == list(segmentation.shape)
        assert properties.target_spacing == plan.target_spacing
        # CT normalization: the lungs (~ -850 HU) sit below the foreground mean, soft tissue above the clip.
        lungs = np.asarray(image[0])[np.isin(segmentation, (1, 2))]
        assert -3 < float(np.median(lungs)) < 0.5
    pool = sorted(p.name for p in (workspace / "preprocessed" / "unlabelled").glob("*.json"))
    assert len(pool) == 2
    # A rerun finds everything done.
    assert "(12 already done)" in run("covnet_plan_and_preprocess", "--workspace", workspace, "-np", 1,
                                      "--device", "cpu")

    # Train fold 0 for a moment; it validates its cases whole, in their original geometry.
    printed = run("covnet_train", 0, "--workspace", workspace, "--epochs", 1, "--iters-per-epoch", 2, "--val-iters", 1,
                  "--num-workers", 0, "--no-val-mirroring")
    assert "epoch 1: train loss" in printed
    fold = workspace / "results" / "fold_0"
    validation = json.loads((fold / "validation" / "summary.json").read_text())
    splits = json.loads((workspace / "preprocessed" / "splits.json").read_text())
    assert sorted(case["case"] for case in validation["per_case"]) == sorted(splits[0]["val"])

    # Self-train on the pool (one round: the better half of it), then segment the test CT with the self-trained
    # model.
    printed = run("covnet_selftrain", "--workspace", workspace, "--max-rounds", 1, "--iters-per-epoch", 1,
                  "--val-iters", 1, "--num-workers", 0, "--no-teacher-mirroring", "--no-val-mirroring")
    selftrain = json.loads((workspace / "results" / "selftrain" / "summary.json").read_text())
    assert len(selftrain["rounds"]) == 1 and len(selftrain["rounds"][0]["cases_added"]) == 1
    assert (workspace / "results" / "selftrain" / "final" / "checkpoint_final.pth").is_file()
    # the default student fine-tunes the teacher at a tenth of its learning rate
    student = json.loads((workspace / "results" / "selftrain" / "round_01" / "settings.json").read_text())
    assert student["settings"]["pretrained"] == str(fold / "checkpoint_final.pth")
    assert student["settings"]["initial_lr"] == pytest.approx(0.001)
    predictions = tmp_path / "predictions"
    printed = run("covnet_predict", "--workspace", workspace, "-i", phantoms / "raw" / "imagesTs", "-o", predictions,
                  "--disable-tta")
    assert "self-trained" in printed
    report = (predictions / "report.csv").read_text().splitlines()
    assert report[0].startswith("case,") and len(report) == 2
    run("covnet_evaluate", "--ref", phantoms / "raw" / "labelsTs", "--pred", predictions, "-o",
        tmp_path / "test_summary.json")
    assert json.loads((tmp_path / "test_summary.json").read_text())["per_case"][0]["case"] == "test_000"
