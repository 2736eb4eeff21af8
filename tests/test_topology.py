"""Topology: validation, derived shapes and scales, JSON, and agreement with the torch network it describes."""
import json
import subprocess
import sys
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest
import torch

from covnet.network.topology import Topology
from covnet.network.unet import ResidualEncoderUNet
from covnet.runtime.errors import CovnetError

# z is 4× coarser than y/x: pooled in-plane first, then isotropically, then in-plane again.
ANISOTROPIC = Topology(
    in_channels=1, num_classes=4,
    features_per_stage=[4, 8, 16, 16],
    kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
    strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
    n_blocks_per_stage=[1, 1, 2, 1],
    n_conv_per_stage_decoder=[1, 2, 1],
)
ISOTROPIC_JSON = {"in_channels": 2, "num_classes": 3, "features_per_stage": [4, 8, 16],
                  "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                  "n_blocks_per_stage": [1, 2, 2], "n_conv_per_stage_decoder": [1, 2], "deep_supervision": True}


def test_total_stride_and_stage_shapes_follow_the_cumulative_strides():
    assert ANISOTROPIC.n_stages == 4
    assert ANISOTROPIC.total_stride == (2, 8, 8)
    assert ANISOTROPIC.cumulative_strides == ((1, 1, 1), (1, 2, 2), (2, 4, 4), (2, 8, 8))
    assert ANISOTROPIC.stage_shapes((4, 32, 24)) == [(4, 32, 24), (4, 16, 12), (2, 8, 6), (2, 4, 3)]
    assert ANISOTROPIC.logit_shapes((4, 32, 24)) == [(4, 4, 32, 24), (4, 4, 16, 12), (4, 2, 8, 6)]
    assert ANISOTROPIC.logit_shapes((4, 32, 24), training=False) == [(4, 4, 32, 24)]


def test_patch_validity_is_divisibility_by_the_total_stride():
    assert ANISOTROPIC.patch_is_valid((2, 8, 8)) and ANISOTROPIC.patch_is_valid([6, 40, 16])
    assert ANISOTROPIC.patch_is_valid(np.array([4, 32, 24]))
    for patch in [(3, 8, 8), (2, 12, 8), (0, 8, 8), (2, 8), (2.0, 8, 8), "abc"]:
        assert not ANISOTROPIC.patch_is_valid(patch), patch
    with pytest.raises(CovnetError, match="not divisible by the total stride"):
        ANISOTROPIC.stage_shapes((2, 12, 8))


def test_deep_supervision_scales_for_an_anisotropic_topology():
    # nnU-Net: 1 / cumprod(strides)[:-1], finest first
    expected = 1 / np.cumprod(np.array(ANISOTROPIC.strides), axis=0)[:-1]
    assert np.array(ANISOTROPIC.deep_supervision_scales).tolist() == expected.tolist()
    assert ANISOTROPIC.deep_supervision_scales == ((1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (0.5, 0.25, 0.25))
    # without deep supervision the network returns the input-resolution logits only
    assert replace(ANISOTROPIC, deep_supervision=False).deep_supervision_scales == ((1.0, 1.0, 1.0),)


def test_layer_layouts_describe_every_block_once():
    blocks = ANISOTROPIC.encoder_blocks()
    assert [b.stage for b in blocks] == [0, 1, 2, 2, 3]
    assert [b.stride for b in blocks] == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 1, 1), (1, 2, 2)]
    assert [b.has_projection for b in blocks] == [False, True, True, False, True]  # last: same channels, strided
    assert [(b.in_channels, b.out_channels) for b in blocks] == [(4, 4), (4, 8), (8, 16), (16, 16), (16, 16)]
    decoder = ANISOTROPIC.decoder_stages()
    assert [d.stage for d in decoder] == [2, 1, 0]
    assert [d.upsampling for d in decoder] == [(1, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert [(d.below_channels, d.channels, d.n_convs) for d in decoder] == [(16, 16, 1), (16, 8, 2), (8, 4, 1)]


@pytest.mark.parametrize("change, message", [
    ({"features_per_stage": [4]}, "at least 2 stages"),
    ({"features_per_stage": [4, 0, 16]}, "features_per_stage"),
    ({"features_per_stage": [4, 8.0, 16]}, "features_per_stage"),
    ({"n_blocks_per_stage": [1, 2]}, "n_blocks_per_stage"),
    ({"n_conv_per_stage_decoder": [1, 1, 1]}, "n_conv_per_stage_decoder"),
    ({"strides": [[1, 1, 1], [2, 2, 2]]}, "strides"),
    ({"strides": [[1, 1, 1], [2, 0, 2], [2, 2, 2]]}, "strides"),
    ({"strides": [[1, 2, 2], [2, 2, 2], [2, 2, 2]]}, "first stage must not pool"),
    ({"kernel_sizes": [[3, 3], [3, 3, 3], [3, 3, 3]]}, "kernel_sizes"),
    ({"kernel_sizes": [[3, 3, 3], [3, 2, 3], [3, 3, 3]]}, "odd"),
    ({"in_channels": 0}, "in_channels"),
    ({"num_classes": True}, "num_classes"),
    ({"deep_supervision": "yes"}, "deep_supervision"),
])
def test_inconsistent_topologies_are_rejected(change, message):
    with pytest.raises(CovnetError, match=f"network plan: .*{message}"):
        Topology.from_json({**ISOTROPIC_JSON, **change})


def test_from_json_names_missing_and_unknown_entries_and_defaults_deep_supervision():
    without = {k: v for k, v in ISOTROPIC_JSON.items() if k not in ("strides", "deep_supervision")}
    with pytest.raises(CovnetError, match="missing strides"):
        Topology.from_json(without)
    with pytest.raises(CovnetError, match="unknown entries stride"):
        Topology.from_json({**ISOTROPIC_JSON, "stride": [1, 1, 1]})
    with pytest.raises(CovnetError, match="JSON object"):
        Topology.from_json([1, 2, 3])
    no_flag = {k: v for k, v in ISOTROPIC_JSON.items() if k != "deep_supervision"}
    assert Topology.from_json(no_flag).deep_supervision is True


def test_json_round_trip_is_exact_plain_json_and_the_topology_is_immutable():
    topology = Topology.from_json(ISOTROPIC_JSON)
    assert topology.to_json() == ISOTROPIC_JSON
    assert json.loads(json.dumps(topology.to_json())) == ISOTROPIC_JSON
    assert Topology.from_json(json.loads(json.dumps(ANISOTROPIC.to_json()))) == ANISOTROPIC
    # lists and numpy integers are normalized to tuples of ints, so equal topologies compare and hash equal
    from_numpy = replace(ANISOTROPIC, features_per_stage=np.array([4, 8, 16, 16]))
    assert from_numpy == ANISOTROPIC and hash(from_numpy) == hash(ANISOTROPIC)
    assert all(type(f) is int for f in from_numpy.features_per_stage)
    with pytest.raises(FrozenInstanceError):
        topology.num_classes = 5


@pytest.mark.parametrize("topology, patch", [
    (ANISOTROPIC, (4, 32, 24)),
    (Topology.from_json(ISOTROPIC_JSON), (8, 12, 16)),
    (replace(ANISOTROPIC, deep_supervision=False, num_classes=2), (2, 16, 8)),
])
def test_the_built_network_outputs_exactly_the_predicted_shapes(topology, patch):
    torch.manual_seed(0)
    network = ResidualEncoderUNet(topology)
    x = torch.randn(2, topology.in_channels, *patch)
    with torch.no_grad():
        training_outputs = network.train()(x)
        eval_output = network.eval()(x)
    training_outputs = training_outputs if isinstance(training_outputs, list) else [training_outputs]
    assert [tuple(o.shape[1:]) for o in training_outputs] == topology.logit_shapes(patch, training=True)
    assert [tuple(eval_output.shape[1:])] == topology.logit_shapes(patch, training=False)
    # the deep-supervision scales are the outputs' sizes relative to the input
    for output, scale in zip(training_outputs, topology.deep_supervision_scales):
        assert tuple(o / p for o, p in zip(output.shape[2:], patch)) == scale
    assert sum(p.numel() for p in network.parameters()) == topology.parameter_count()
    assert len(network.encoder) == topology.n_stages and len(network.decoder) == topology.n_stages - 1


def test_the_encoder_stage_outputs_have_the_predicted_stage_shapes():
    network = ResidualEncoderUNet(ANISOTROPIC).eval()
    shapes = []
    with torch.no_grad():
        x = network.stem(torch.randn(1, 1, 4, 32, 24))
        for stage in network.encoder:
            x = stage(x)
            shapes.append(tuple(x.shape[1:]))
    expected = [(f, *s) for f, s in zip(ANISOTROPIC.features_per_stage, ANISOTROPIC.stage_shapes((4, 32, 24)))]
    assert shapes == expected


def test_topology_and_planning_import_no_torch():
    code = ("import sys, covnet.network, covnet.network.topology, covnet.planning.planner, covnet.planning.rules; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert not any(m.startswith('covnet.training') for m in sys.modules), 'training imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
