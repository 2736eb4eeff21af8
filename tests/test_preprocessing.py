import json
from dataclasses import replace

import numpy as np
import pytest

from covnet.evaluation.metrics import dice
from covnet.image.io import read_image, write_image
from covnet.phantoms.generate import make_phantom_dataset
from covnet.planning.planner import plan_dataset
from covnet.planning.plans import Plan
from covnet.image.boxed import BoxedProbabilities
from covnet.preprocessing.case import preprocess_case, probabilities_to_original, segmentation_to_original
from covnet.preprocessing.normalization import normalize
from covnet.preprocessing.run import preprocess_dataset
from covnet.preprocessing.storage import load_case, properties_file
from covnet.workspace import Workspace


@pytest.fixture
def planned(tiny_workspace):
    workspace = Workspace(tiny_workspace)
    return workspace, plan_dataset(workspace, gpu_memory_gb=8, num_processes=1)


def test_ct_normalization_statistics_equal_a_direct_numpy_computation(planned):
    workspace, plan = planned
    # Tiny cases have fewer foreground voxels than the per-case sample, so every voxel is used.
    foreground = []
    for index in range(3):
        image, _ = read_image(workspace.images_tr / f"case_{index}_0000.nii.gz")
        label, _ = read_image(workspace.labels_tr / f"case_{index}.nii.gz")
        foreground.append(image[label > 0].astype(np.float64))
    foreground = np.concatenate(foreground)
    scheme = plan.normalization["0"].to_json()
    assert scheme["scheme"] == "CT"
    assert scheme["clip"] == pytest.approx([np.percentile(foreground, 0.5), np.percentile(foreground, 99.5)])
    assert scheme["mean"] == pytest.approx(foreground.mean())
    assert scheme["std"] == pytest.approx(foreground.std())
    image = np.array([-2000.0, scheme["mean"], 5000.0])
    expected = (np.clip(image, *scheme["clip"]) - scheme["mean"]) / scheme["std"]
    np.testing.assert_allclose(normalize(image, plan.normalization["0"]), expected, rtol=1e-5)


def test_plans_json_round_trips_and_names_its_reasons(planned):
    workspace, plan = planned
    loaded = Plan.load(workspace.plans_json)
    assert loaded == plan
    for key in ("target_spacing", "patch_size", "batch_size", "network", "normalization_0"):
        assert plan.reasons[key]
    assert plan.target_spacing == pytest.approx([2.5, 1.5, 1.5])
    assert plan.batch_size >= 2
    fingerprint = json.loads((workspace.preprocessed / "dataset_fingerprint.json").read_text())
    assert [case["case"] for case in fingerprint["cases"]] == ["case_0", "case_1", "case_2"]
    assert fingerprint["cases"][0]["shape_before_crop"] == [20, 28, 32]


def test_crop_and_uncrop_on_the_original_grid_restore_the_label_exactly(planned):
    workspace, plan = planned
    image, geometry = read_image(workspace.images_tr / "case_1_0000.nii.gz")
    label, _ = read_image(workspace.labels_tr / "case_1.nii.gz")
    assert plan.target_spacing == pytest.approx(geometry.spacing)
    array, segmentation, properties = preprocess_case("case_1", [image], geometry, plan, label)
    box = properties.bounding_box
    assert all(start > 0 and stop < size for (start, stop), size in zip(box, label.shape)), box   # cropped on every side
    restored = segmentation_to_original(segmentation, properties, sorted(plan.labels.values()), plan.resampling)
    np.testing.assert_array_equal(restored, label)


def test_crop_resample_and_inverse_reproduce_the_original_geometry(planned):
    workspace, plan = planned
    image, geometry = read_image(workspace.images_tr / "case_1_0000.nii.gz")
    label, _ = read_image(workspace.labels_tr / "case_1.nii.gz")
    plan.target_spacing = [1.7, 1.1, 1.3]        # force a real resampling in every axis
    array, segmentation, properties = preprocess_case("case_1", [image], geometry, plan, label)
    assert array.shape[0] == 1 and list(array.shape[1:]) == properties.shape_after_resampling
    assert segmentation.shape == array.shape[1:]
    assert properties.original_geometry == geometry
    restored = segmentation_to_original(segmentation, properties, sorted(plan.labels.values()), plan.resampling)
    assert restored.shape == label.shape
    for value in (1, 2, 3):
        assert dice(restored == value, label == value) > 0.9
    one_hot = np.stack([segmentation == value for value in range(4)]).astype(np.float32)
    probabilities = probabilities_to_original(BoxedProbabilities.everywhere(one_hot), properties,
                                              plan.resampling).full()
    assert probabilities.shape == (4,) + label.shape
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    # Same interpolation as the label map, so the most probable class agrees with it (up to ties).
    assert np.mean(probabilities.argmax(axis=0) == restored) > 0.99


def test_preprocess_writes_cases_and_pool_and_is_resumable(planned):
    workspace, plan = planned
    counts = preprocess_dataset(workspace, plan, num_processes=1)
    assert counts == {"done": 5, "skipped": 0, "refused": 0}
    labelled = workspace.preprocessed_cases
    image, segmentation, properties = load_case(labelled, "case_0")
    assert isinstance(image, np.memmap) and image.dtype == np.float32
    assert segmentation.dtype == np.uint8 and set(np.unique(segmentation)) <= {0, 1, 2, 3}
    assert set(properties.class_locations) == {"1", "2", "3"}
    for value, locations in properties.class_locations.items():
        assert all(segmentation[tuple(location)] == int(value) for location in locations)
    pool_image, pool_segmentation, _ = load_case(workspace.preprocessed_pool, "pool_1")
    assert pool_segmentation is None and pool_image.ndim == 4
    # A rerun skips finished cases; a case killed before its JSON was written is redone.
    assert preprocess_dataset(workspace, plan) == {"done": 0, "skipped": 5, "refused": 0}
    properties_file(labelled, "case_2").unlink()
    assert preprocess_dataset(workspace, plan) == {"done": 1, "skipped": 4, "refused": 0}
    # A changed plan makes every case stale.
    plan.normalization["0"] = replace(plan.normalization["0"], mean=plan.normalization["0"].mean + 1.0)
    assert preprocess_dataset(workspace, plan, num_processes=2) == {"done": 5, "skipped": 0, "refused": 0}
    assert not list(workspace.preprocessed.rglob(".tmp-*"))


def test_plan_resampling_fields_drive_the_separate_z_rule(planned):
    workspace, plan = planned
    image, geometry = read_image(workspace.images_tr / "case_0_0000.nii.gz")
    plan.target_spacing = [6.0, 1.5, 1.5]          # target anisotropy 4 > 3: separate z along axis 0

    def preprocessed(**resampling):
        plan.resampling = replace(plan.resampling, **resampling)
        return preprocess_case("case_0", [image], geometry, plan)[0]

    nearest_z = preprocessed(order_z=0, anisotropy_threshold=3.0)
    linear_z = preprocessed(order_z=1, anisotropy_threshold=3.0)
    assert not np.allclose(nearest_z, linear_z)
    # A threshold above the anisotropy turns separate z off, so order_z no longer matters.
    assert np.array_equal(preprocessed(order_z=0, anisotropy_threshold=10.0),
                          preprocessed(order_z=1, anisotropy_threshold=10.0))


def test_edited_raw_files_and_interrupted_writes_are_redone(planned, monkeypatch):
    workspace, plan = planned
    preprocess_dataset(workspace, plan)
    fingerprint_file = workspace.preprocessed / "dataset_fingerprint.json"
    before = fingerprint_file.read_text()
    # Editing a label makes the fingerprint and that case stale.
    label, geometry = read_image(workspace.labels_tr / "case_0.nii.gz")
    label[label == 3] = 1
    write_image(label, geometry, workspace.labels_tr / "case_0.nii.gz")
    plan = plan_dataset(workspace, gpu_memory_gb=8, num_processes=1)
    assert fingerprint_file.read_text() != before
    assert preprocess_dataset(workspace, plan) == {"done": 1, "skipped": 4, "refused": 0}
    _, segmentation, properties = load_case(workspace.preprocessed_cases, "case_0")
    assert 3 not in np.asarray(segmentation) and "3" in properties.class_locations
    # A rerun killed between the two arrays leaves no JSON behind, so the case is redone next time.
    import covnet.preprocessing.storage as storage
    real_save = storage.save_array

    def dies_on_segmentation(path, array):
        if path.name.endswith("_seg.npy"):
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(storage, "save_array", dies_on_segmentation)
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(workspace, plan, overwrite=True)
    monkeypatch.setattr(storage, "save_array", real_save)
    assert not properties_file(workspace.preprocessed_cases, "case_0").exists()
    assert preprocess_dataset(workspace, plan) == {"done": 1, "skipped": 4, "refused": 0}


@pytest.mark.parametrize("mode, rule", [("isotropic", "median spacing (anisotropy"),
                                        ("anisotropic", "axis z = 10th percentile")])
def test_phantom_sets_get_the_expected_spacing_rule(tmp_path, mode, rule):
    workspace = Workspace(tmp_path)
    make_phantom_dataset(workspace, num_labelled=4, num_unlabelled=0, num_test=0, seed=1, spacing_mode=mode,
                         report=lambda *_: None)
    plan = plan_dataset(workspace, gpu_memory_gb=8)
    assert plan.reasons["target_spacing"].startswith(rule) if mode == "isotropic" else rule in plan.reasons["target_spacing"]
    spacing = np.array(plan.target_spacing)
    assert (spacing.max() / spacing.min() < 1.2) if mode == "isotropic" else (spacing[0] > 3 * spacing[1])
    # A smaller memory budget gives a smaller patch (and the plan says why).
    small = plan_dataset(workspace, gpu_memory_gb=0.05)
    assert np.prod(small.patch_size) < np.prod(plan.patch_size) and "shrunk" in small.reasons["patch_size"]
    assert small.estimated_memory_gb <= 0.05
