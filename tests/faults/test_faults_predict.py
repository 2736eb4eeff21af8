"""covnet_predict under faults: kill -9 while writing a label map (then --continue; also in a rerun over an
earlier run's outputs), damaged and empty input
files among good ones, an output folder without write permission."""
from __future__ import annotations

import json

import pytest
from kit.faults import (
    assert_one_line_error,
    run,
    run_crashing,
    run_ok,
    run_without_write_permission,
    snapshot,
    temporaries,
    truncate,
)
from kit.workspaces import phantom_image, run_predict

from covnet.image.io import write_image

CASES = ("c0", "c1", "c2")


@pytest.fixture(scope="module")
def inputs(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict_faults") / "in"
    for index, case in enumerate(CASES):
        write_image(*phantom_image(trained, index), folder / f"{case}_0000.nii.gz")
    return folder


def arguments(trained, inputs, output) -> list:
    # --no-lateral-fix: the tiny model calls lungs either side, and the warning would add lines to count;
    # --runtime torch: the runs in this process (run_predict) use torch, and a folder records its runtime
    return ["-i", inputs, "-o", output, "--workspace", trained.root, "-f", "0", "--disable-tta", "--no-lateral-fix",
            "--runtime", "torch"]


def test_kill_while_writing_a_label_map_then_continue_gives_the_full_run(trained, inputs, tmp_path):
    reference, output = tmp_path / "reference", tmp_path / "out"
    assert run_predict(*arguments(trained, inputs, reference)) == 0
    # The second label map (c1) is complete under its temporary name when the process is killed.
    run_crashing("self@.nii.gz#2", "covnet_predict", *arguments(trained, inputs, output))
    assert (output / "c0.nii.gz").is_file() and not (output / "c1.nii.gz").exists()
    assert [path.name.endswith("-c1.nii.gz") for path in temporaries(output)] == [True]
    run_ok("covnet_predict", *arguments(trained, inputs, output), "--continue")
    assert temporaries(output) == []
    assert snapshot(output) == snapshot(reference)        # label maps, report and per-case rows, byte for byte
    rows = json.loads((output / "report.json").read_text())["cases"]
    assert [row["case"] for row in rows] == list(CASES)



def test_a_killed_rerun_leaves_no_earlier_label_map_beside_its_new_report_row(trained, inputs, tmp_path):
    """A rerun (another model, no --continue) into a finished output folder is killed as c1's label map is
    renamed: c1's row is then the new model's, and the old c1 label map must be gone, or --continue would take
    the pair as complete."""
    reference, output = tmp_path / "reference", tmp_path / "out"
    new_model = arguments(trained, inputs, reference)
    new_model[new_model.index("-f") + 1] = "1"
    assert run_predict(*new_model) == 0
    assert run_predict(*arguments(trained, inputs, output)) == 0
    assert (output / "c1.nii.gz").read_bytes() != (reference / "c1.nii.gz").read_bytes()  # the models differ
    rerun = [str(output) if value == reference else value for value in new_model]
    run_crashing("self@.nii.gz#2", "covnet_predict", *rerun)
    assert not (output / "c1.nii.gz").exists()
    run_ok("covnet_predict", *rerun, "--continue")
    assert snapshot(output) == snapshot(reference)


def test_continue_refuses_a_folder_another_model_wrote(trained, inputs, tmp_path):
    output = tmp_path / "out"
    assert run_predict(*arguments(trained, inputs, output)) == 0
    before = snapshot(output)
    other_model = arguments(trained, inputs, output)
    other_model[other_model.index("-f") + 1] = "1"
    assert_one_line_error(run("covnet_predict", *other_model, "--continue"), str(output), "another model", "(model)")
    assert_one_line_error(run("covnet_predict", *arguments(trained, inputs, output), "--continue", "--step-size", "0.75"),
                          "inference.step_size")
    assert snapshot(output) == before
    run_ok("covnet_predict", *arguments(trained, inputs, output), "--continue")   # the same model goes on


def test_a_new_part_with_another_model_removes_every_case_of_the_earlier_model(trained, inputs, tmp_path):
    """Part 0 of a new run with another model, then part 1 with --continue: no case of the first model may be
    kept (part 1's cases would otherwise count as complete)."""
    output, reference = tmp_path / "out", tmp_path / "reference"
    assert run_predict(*arguments(trained, inputs, output)) == 0
    new_model = arguments(trained, inputs, output)
    new_model[new_model.index("-f") + 1] = "1"
    assert run_predict(*new_model, "--num-parts", "2", "--part-id", "0") == 0
    assert run_predict(*new_model, "--num-parts", "2", "--part-id", "1", "--continue") == 0
    alone = [str(reference) if value == output else value for value in new_model]
    assert run_predict(*alone) == 0
    assert snapshot(output) == snapshot(reference)

def test_damaged_and_empty_inputs_are_one_line_each(trained, inputs, tmp_path):
    folder, output = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    (folder / "good.nii.gz").write_bytes((inputs / "c0_0000.nii.gz").read_bytes())
    (folder / "cut.nii.gz").write_bytes((inputs / "c1_0000.nii.gz").read_bytes())
    truncate(folder / "cut.nii.gz")
    (folder / "blank.nii.gz").write_bytes(b"")
    (folder / "blank_mha.mha").write_bytes(b"")
    result = run("covnet_predict", *arguments(trained, folder, output))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    problems = {"cut.nii.gz": "is truncated", "blank.nii.gz": "is empty", "blank_mha.mha": "is empty"}
    for name, problem in problems.items():
        mentioning = [line for line in lines if str(folder / name) in line]
        assert len(mentioning) == 1 and problem in mentioning[0], result.stderr
    assert lines[-1] == "covnet_predict: 1 case(s) written, 3 failed: blank, blank_mha, cut"
    assert len(lines) == 4, result.stderr
    assert (output / "good.nii.gz").is_file() and temporaries(output) == []
    assert [row["case"] for row in json.loads((output / "report.json").read_text())["cases"]] == ["good"]


def test_output_folder_without_write_permission_is_one_line(trained, inputs, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    result = run_without_write_permission(output, "covnet_predict", *arguments(trained, inputs, output))
    assert_one_line_error(result, str(output), "Permission denied")
    assert list(output.iterdir()) == []
