"""Training-memory estimate: pure arithmetic on the plan, checked against the real network's structure."""
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from covnet.network.topology import Topology
from covnet.network.unet import ResidualEncoderUNet
from covnet.planning import memory
from covnet.planning.memory import (
    estimate_activation_elements,
    estimate_training_memory,
    estimate_training_memory_bytes,
)
from covnet.runtime.errors import CovnetError

PLAN = Topology(in_channels=1, num_classes=4, **{
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "kernel_sizes": [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
    "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
    "n_conv_per_stage_decoder": [1, 1, 1, 1, 1],
    "deep_supervision": True,
})
SMALL_PLAN = Topology(in_channels=1, num_classes=4, **{
    "features_per_stage": [4, 8, 16],
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
    "n_blocks_per_stage": [1, 2, 2],
    "n_conv_per_stage_decoder": [2, 1],
    "deep_supervision": True,
})
PATCH = (16, 128, 128)


def test_activation_part_is_linear_in_batch_size_and_parameter_part_constant():
    estimates = [estimate_training_memory(PATCH, b, PLAN) for b in (1, 2, 3, 8)]
    one = estimates[0]
    assert one.activation_bytes > 0 and one.parameter_bytes > 0
    for batch_size, estimate in zip((1, 2, 3, 8), estimates):
        assert estimate.parameter_bytes == one.parameter_bytes
        assert estimate.activation_bytes == pytest.approx(batch_size * one.activation_bytes, abs=batch_size)


def test_total_is_the_sum_of_its_parts():
    estimate = estimate_training_memory(PATCH, 2, PLAN)
    expected_parameters = 3 * 4 * PLAN.parameter_count()
    elements = estimate_activation_elements(PATCH, PLAN)
    expected_activations = round(memory.CALIBRATED_BYTES_PER_ACTIVATION * 2 * elements)
    assert estimate.parameter_bytes == expected_parameters
    assert estimate.activation_bytes == expected_activations
    assert estimate.total_bytes == expected_parameters + expected_activations
    assert estimate_training_memory_bytes(PATCH, 2, PLAN) == estimate.total_bytes


def test_estimate_grows_with_patch_size_roughly_in_proportion_to_voxels():
    patches = [(16, 64, 64), (16, 128, 128), (32, 128, 128), (32, 192, 256)]
    elements = [estimate_activation_elements(p, PLAN) for p in patches]
    totals = [estimate_training_memory_bytes(p, 2, PLAN) for p in patches]
    assert elements == sorted(elements) and len(set(elements)) == len(elements)
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    # all stages scale with the voxel count when the patch grows by a whole factor
    assert estimate_activation_elements((32, 256, 256), PLAN) == 8 * elements[1]


def test_deep_supervision_and_classes_only_add_logit_maps():
    no_ds = replace(PLAN, deep_supervision=False)
    with_ds, without_ds = (estimate_activation_elements(PATCH, p) for p in (PLAN, no_ds))
    lower_resolution_voxels = sum(z * y * x for z, y, x in PLAN.stage_shapes(PATCH)[1:-1])
    assert with_ds - without_ds == memory.LOSS_MAPS_PER_LOGIT * 4 * lower_resolution_voxels
    assert (estimate_activation_elements(PATCH, replace(no_ds, num_classes=5)) - without_ds
            == memory.LOSS_MAPS_PER_LOGIT * 16 * 128 * 128)


def test_stage_shapes_follow_cumulative_strides():
    assert PLAN.stage_shapes((16, 128, 128)) == [
        (16, 128, 128), (16, 64, 64), (8, 32, 32), (4, 16, 16), (2, 8, 8), (2, 4, 4)]


def test_counted_activations_match_what_autograd_keeps():
    """The element count models torch's saved tensors; check it on a tiny real network."""
    torch.manual_seed(0)
    network = ResidualEncoderUNet(SMALL_PLAN).train()
    parameter_storages = {p.untyped_storage().data_ptr() for p in network.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.is_floating_point() and tensor.untyped_storage().data_ptr() not in parameter_storages:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes() // 4
        return tensor

    x = torch.randn(1, 1, 4, 16, 16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = network(x)
    counted = replace(SMALL_PLAN, deep_supervision=False).saved_activation_elements((4, 16, 16), maps_per_logit=0)
    # without the loss (maps_per_logit=0 drops the logit maps) the count covers the network's own saved maps;
    # the only extra saved floats are per-channel norm vectors (mean, inverse std, repeated affine weight)
    norm_channels = sum(m.num_features for m in network.modules() if isinstance(m, torch.nn.InstanceNorm3d))
    assert len(outputs) == 2
    assert counted <= sum(saved.values()) <= counted + 3 * norm_channels


def test_memory_module_does_not_import_torch():
    code = "import sys, covnet.planning.memory; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("patch, batch_size", [((15, 128, 128), 2), ((16, 128), 2), ((16, 128, 128), 0)])
def test_bad_patch_or_batch_is_rejected(patch, batch_size):
    with pytest.raises(CovnetError, match="network plan"):
        estimate_training_memory_bytes(patch, batch_size, PLAN)


def test_amp_estimate_keeps_float32_parameters_plus_a_half_copy_and_fewer_activation_bytes():
    amp = estimate_training_memory(PATCH, 2, PLAN, amp=True)
    fp32 = estimate_training_memory(PATCH, 2, PLAN)
    elements = estimate_activation_elements(PATCH, PLAN)
    assert amp.parameter_bytes == (3 * 4 + memory.HALF_WEIGHT_BYTES) * PLAN.parameter_count()
    assert amp.activation_bytes == round(memory.CALIBRATED_BYTES_PER_ACTIVATION_AMP * 2 * elements)
    assert amp.activation_bytes < fp32.activation_bytes
    assert estimate_training_memory_bytes(PATCH, 2, PLAN, amp=True) == amp.total_bytes
