"""Damaged preprocessed arrays: a truncated ``preprocessed/cases/*.npy`` or ``preprocessed/unlabelled/*.npy`` is
not "already done" (preprocessing redoes exactly those cases), and training and self-training stop with one line
naming the file instead of a data-loading worker's traceback."""
from __future__ import annotations

import numpy as np
import pytest
from kit.faults import assert_one_line_error, run, snapshot, truncate
from kit.workspaces import (
    SELFTRAIN_FLAGS,
    TINY_TRAIN,
    copy_workspace,
    make_tiny_trainable_workspace,
)

from covnet.dataset import DatasetDescription
from covnet.planning.plans import Plan
from covnet.preprocessing.run import collect_jobs, preprocess_dataset
from covnet.preprocessing.storage import (
    array_shape,
    image_file,
    is_case_done,
    load_case,
    save_array,
    segmentation_file,
)
from covnet.runtime.errors import CovnetError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_tiny_trainable_workspace(tmp_path_factory.mktemp("integrity") / "ws", num_labelled=5,
                                         num_unlabelled=2)


@pytest.fixture
def workspace(prepared, tmp_path):
    return copy_workspace(prepared, tmp_path / "ws")


def test_a_truncated_array_is_one_line_naming_it_with_both_sizes(tmp_path):
    path = tmp_path / "case.npy"
    save_array(path, np.arange(6000, dtype=np.float32).reshape(1, 10, 20, 30))
    assert array_shape(path) == (1, 10, 20, 30)
    complete = path.stat().st_size
    truncate(path, keep=0.5)
    with pytest.raises(CovnetError) as raised:
        array_shape(path)
    assert raised.value.path == str(path)
    assert raised.value.problem.startswith(f"is truncated: {complete // 2} bytes where its header declares "
                                           f"{complete}; re-run covnet_plan_and_preprocess")
    path.write_bytes(b"not an array")
    with pytest.raises(CovnetError, match="is not a readable .npy array"):
        array_shape(path)


@pytest.mark.parametrize("damaged", ["image", "segmentation"])
def test_load_case_refuses_a_truncated_array(workspace, damaged):
    folder, case = workspace.preprocessed_cases, "phantom_000"
    path = (image_file if damaged == "image" else segmentation_file)(folder, case)
    truncate(path, keep=0.9)
    with pytest.raises(CovnetError) as raised:
        load_case(folder, case)
    assert raised.value.path == str(path) and raised.value.problem.startswith("is truncated: ")


def test_an_array_of_another_shape_than_its_properties_is_refused(workspace):
    folder, case = workspace.preprocessed_cases, "phantom_001"
    image, segmentation, properties = load_case(folder, case, mmap=False)
    save_array(segmentation_file(folder, case), segmentation[:-1])
    with pytest.raises(CovnetError, match="where its image has"):
        load_case(folder, case)
    save_array(image_file(folder, case), image[:, :-1])
    with pytest.raises(CovnetError, match="where its properties record"):
        load_case(folder, case)


def test_preprocessing_redoes_exactly_the_damaged_cases(workspace):
    plan = Plan.load(workspace.plans_json)
    before = snapshot(workspace.preprocessed)
    job = next(job for job in collect_jobs(workspace, DatasetDescription.load(workspace.dataset_json))
               if job.case == "phantom_002")
    assert is_case_done(job.output_folder, job.case, plan.preprocessing_key(), job.source, labelled=True)
    truncate(image_file(workspace.preprocessed_cases, "phantom_002"), keep=0.7)
    truncate(image_file(workspace.preprocessed_pool, "unlabelled_001"), keep=0.7)
    truncate(segmentation_file(workspace.preprocessed_cases, "phantom_004"), keep=0.99)
    assert not is_case_done(job.output_folder, job.case, plan.preprocessing_key(), job.source, labelled=True)
    counts = preprocess_dataset(workspace, plan)
    assert counts == {"done": 3, "skipped": 4, "refused": 0}
    assert snapshot(workspace.preprocessed) == before
    assert preprocess_dataset(workspace, plan)["done"] == 0


def test_training_names_a_truncated_case_in_one_line(workspace):
    path = image_file(workspace.preprocessed_cases, "phantom_003")
    truncate(path, keep=0.8)
    # One data-loading worker (the last --num-workers counts): the check must come before the workers start.
    result = run("covnet_train", "all", "--workspace", workspace.root, *TINY_TRAIN, "--num-workers", "1")
    assert_one_line_error(result, str(path), "is truncated: ", "re-run covnet_plan_and_preprocess")
    assert "Traceback" not in result.stderr


def test_selftraining_names_a_truncated_pool_case_in_one_line(trained, tmp_path):
    workspace = copy_workspace(trained, tmp_path / "ws")
    path = image_file(workspace.preprocessed_pool, sorted(workspace.preprocessed_pool.glob("*.json"))[0].stem)
    truncate(path, keep=0.5)
    result = run("covnet_selftrain", "--workspace", workspace.root, *SELFTRAIN_FLAGS)
    assert_one_line_error(result, str(path), "is truncated: ")
    assert "Traceback" not in result.stderr
