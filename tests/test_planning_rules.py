import json

import numpy as np
import pytest
from kit.workspaces import command

from covnet.dataset import DatasetDescription, left_right_pairs
from covnet.planning import rules
from covnet.planning.memory import estimate_training_memory_bytes

GIB = 2 ** 30


def test_isotropic_dataset_gets_median_spacing():
    spacings = np.array([[1.0, 0.8, 0.8], [1.2, 0.7, 0.7], [0.9, 0.75, 0.75]])
    shapes = np.array([[300, 400, 400], [280, 420, 420], [320, 380, 380]])
    decision = rules.choose_target_spacing(spacings, shapes)
    assert decision.value == pytest.approx([1.0, 0.75, 0.75])
    assert decision.reason.startswith("median spacing")


def test_anisotropic_dataset_gets_tenth_percentile_along_the_coarse_axis():
    # z ≈ 5 mm vs 0.7 mm in-plane (ratio > 3), and few slices (60 × 3 < 500): nnU-Net's rule kicks in.
    z = np.array([5.0, 5.0, 5.0, 5.0, 6.0, 1.0, 1.5, 5.0, 5.0, 2.0])
    spacings = np.stack([z, np.full(10, 0.7), np.full(10, 0.7)], axis=1)
    shapes = np.array([[60, 500, 500]] * 10)
    decision = rules.choose_target_spacing(spacings, shapes)
    assert decision.value[0] == pytest.approx(np.percentile(z, 10))
    assert decision.value[1:] == pytest.approx([0.7, 0.7])
    assert "10th percentile" in decision.reason and "anisotropy" in decision.reason


def test_anisotropic_spacing_with_many_slices_keeps_the_median():
    spacings = np.array([[5.0, 0.7, 0.7]] * 5)
    shapes = np.array([[200, 500, 500]] * 5)          # 200 × 3 ≥ 500: enough slices, keep the median
    decision = rules.choose_target_spacing(spacings, shapes)
    assert decision.value == pytest.approx([5.0, 0.7, 0.7])


def test_anisotropy_compares_the_coarse_axis_with_the_next_coarsest():
    spacings = np.array([[2.8, 1.0, 0.8]] * 5)          # 2.8 / 1.0 < 3 although 2.8 / 0.8 > 3
    shapes = np.array([[40, 400, 400]] * 5)
    assert rules.choose_target_spacing(spacings, shapes).value == pytest.approx([2.8, 1.0, 0.8])


def test_topology_pools_only_axes_within_twice_the_finest_spacing():
    network = rules.network_topology([5.0, 1.0, 1.0], [40, 192, 192], 1, 4).to_json()
    strides, kernels = network["strides"], network["kernel_sizes"]
    assert strides[0] == [1, 1, 1]
    # z (5 mm) waits until y/x have been pooled to 4 mm and beyond; before that its kernel is 1.
    assert strides[1] == [1, 2, 2] and strides[2] == [1, 2, 2]
    assert kernels[0] == [1, 3, 3] and kernels[1] == [1, 3, 3]
    assert any(stride[0] == 2 for stride in strides) and kernels[-1] == [3, 3, 3]
    # No axis is pooled below 4 voxels.
    size = np.array([40, 192, 192])
    for stride in strides:
        size = size // np.array(stride)
    assert size.min() >= rules.MIN_FEATURE_MAP_SIZE
    assert network["features_per_stage"][:3] == [32, 64, 128] and max(network["features_per_stage"]) <= 320
    assert network["n_blocks_per_stage"][:4] == [1, 3, 4, 6]
    assert len(network["n_conv_per_stage_decoder"]) == len(strides) - 1


def test_topology_follows_nnunet_details():
    # A thin axis that cannot be pooled does not stop the others (finest spacing among poolable axes).
    thin = rules.network_topology([1.0, 1.0, 1.0], [64, 4, 64], 1, 4).to_json()
    assert thin["strides"] == [[1, 1, 1]] + [[2, 1, 2]] * 4          # 64 → 4 voxels along z and x
    # A lone poolable axis needs ≥ 12 voxels; the bottleneck always has 3-wide kernels.
    lone = rules.network_topology([4.0, 1.0, 1.0], [20, 4, 4], 1, 4).to_json()
    assert lone["strides"] == [[1, 1, 1], [2, 1, 1]]
    assert lone["kernel_sizes"][-1] == [3, 3, 3]
    assert rules.network_topology([1.0, 1.0, 1.0], [8, 8, 10], 1, 4).to_json()["strides"] == [[1, 1, 1], [2, 2, 2]]


def test_patch_is_divisible_by_the_total_pooling_and_capped_by_the_median_shape():
    median_shape = np.array([37.0, 101.0, 95.0])
    decision, network = rules.choose_patch_and_network([2.0, 1.0, 1.0], median_shape, 8 * GIB, 1, 4)
    patch = np.array(decision.value)
    assert np.all(patch <= median_shape)
    assert np.all(patch % np.array(network.total_stride) == 0)


def test_smaller_budget_gives_smaller_patch_that_fits():
    median_shape = [200.0, 300.0, 300.0]
    large, _ = rules.choose_patch_and_network([1.0, 1.0, 1.0], median_shape, 10 * GIB, 1, 4)
    small, network = rules.choose_patch_and_network([1.0, 1.0, 1.0], median_shape, 2 * GIB, 1, 4)
    assert np.prod(small.value) < np.prod(large.value)
    assert "shrunk" in small.reason
    assert estimate_training_memory_bytes(small.value, 2, network) <= 2 * GIB
    assert estimate_training_memory_bytes(large.value, 2, network) > 2 * GIB


def test_the_axis_furthest_above_the_median_shape_shrinks_first():
    # z: 192/200 = 0.96, y: 256/300 = 0.85, x: 256/400 = 0.64 → z first
    assert rules.axis_to_shrink([192, 256, 256], [200, 300, 400], [32, 32, 32]) == 0
    assert rules.axis_to_shrink([128, 256, 256], [200, 300, 400], [32, 32, 32]) == 1
    # an axis already at its minimum is passed over
    assert rules.axis_to_shrink([32, 256, 256], [20, 300, 400], [32, 32, 32]) == 1
    assert rules.axis_to_shrink([8, 8, 8], [20, 30, 40], [8, 8, 8]) is None


def test_batch_size_fits_budget_and_respects_minimum_and_dataset_cap():
    network = rules.network_topology([1.0, 1.0, 1.0], [64, 64, 64], 1, 4)
    patch = [64, 64, 64]
    roomy = rules.choose_batch_size(patch, network, 40 * GIB, 1e12)
    assert roomy.value > 2
    assert estimate_training_memory_bytes(patch, roomy.value, network) <= 40 * GIB
    assert estimate_training_memory_bytes(patch, roomy.value + 1, network) > 40 * GIB
    capped = rules.choose_batch_size(patch, network, 40 * GIB, 20 * 64 ** 3 * 3)
    assert capped.value == 3 and "5%" in capped.reason          # 0.05 × 60 patches
    assert rules.choose_batch_size(patch, network, 40 * GIB, 70 * 64 ** 3).value == 4   # 3.5 rounds up
    tiny_dataset = rules.choose_batch_size(patch, network, 40 * GIB, 64 ** 3)
    assert tiny_dataset.value == rules.MIN_BATCH_SIZE


def test_ct_normalization_uses_the_foreground_percentiles():
    stats = {"percentile_00_5": -1000.0, "percentile_99_5": 200.0, "mean": -600.0, "std": 250.0}
    decision = rules.ct_normalization(stats)
    assert decision.value.to_json() == {"scheme": "CT", "clip": [-1000.0, 200.0], "mean": -600.0, "std": 250.0}


# ------------------------------------------------------------------------------------------ lateral pairs

@pytest.mark.parametrize("names, pairs", [
    (["left_lung", "right_lung", "infection"], [["left_lung", "right_lung"]]),
    (["Lung_Right", "Lung_Left"], [["Lung_Left", "Lung_Right"]]),
    (["kidney_L", "kidney_R", "liver"], [["kidney_L", "kidney_R"]]),
    (["left-lung", "right-lung", "left lung", "RIGHT LUNG"],
     [["left-lung", "right-lung"], ["left lung", "RIGHT LUNG"]]),
    (["left_lung", "right_kidney"], []),                  # another structure on the other side
    (["left_lung", "right-lung"], []),                    # another separator: another name
    (["leftlung", "rightlung", "lung_l", "lungr"], []),   # no separator: not one of the patterns
    (["left_lung", "infection"], []),
    (["left_lung", "right_lung", "Right_Lung"], []),      # ambiguous partner: no guess
])
def test_left_right_label_names_pair(names, pairs):
    assert left_right_pairs(names) == pairs


def nnunet_dataset(workspace_root, lateral_pairs=None) -> None:
    """Rewrite the tiny workspace's dataset.json in nnU-Net v2's own format (``lateral_pairs`` only if given)."""
    data = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "left_lung": 1, "right_lung": 2, "infection": 3},
            "numTraining": 3, "file_ending": ".nii.gz"}
    if lateral_pairs is not None:
        data["lateral_pairs"] = lateral_pairs
    (workspace_root / "raw" / "dataset.json").write_text(json.dumps(data))


def test_an_nnunet_dataset_gets_its_lateral_pairs_from_the_label_names(tiny_workspace, capsys):
    nnunet_dataset(tiny_workspace)
    assert command("covnet_plan_and_preprocess", "--workspace", tiny_workspace, "-np", "1", "--plan-only") == 0
    plan = json.loads((tiny_workspace / "preprocessed" / "plans.json").read_text())
    assert plan["lateral_pairs"] == [[1, 2]]
    assert "found in the label names (left_lung/right_lung)" in plan["reasons"]["lateral_pairs"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lateral pairs")]
    assert lines == [f"lateral pairs [[1, 2]]: {plan['reasons']['lateral_pairs']}"]


def test_an_empty_lateral_pairs_entry_keeps_them_off(tiny_workspace, capsys):
    nnunet_dataset(tiny_workspace, lateral_pairs=[])
    assert command("covnet_plan_and_preprocess", "--workspace", tiny_workspace, "-np", "1", "--plan-only") == 0
    plan = json.loads((tiny_workspace / "preprocessed" / "plans.json").read_text())
    assert plan["lateral_pairs"] == []
    assert plan["reasons"]["lateral_pairs"] == "declared in dataset.json (lateral_pairs)"
    assert "lateral pairs" not in capsys.readouterr().out
    description = DatasetDescription.load(tiny_workspace / "raw" / "dataset.json")
    assert DatasetDescription.from_json(description.to_json()).lateral_label_pairs == []   # kept off when rewritten
