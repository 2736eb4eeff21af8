"""The residual-encoder UNet: shapes, deep supervision, train/eval behaviour, gradients, plan parsing."""
import pytest
import torch
from torch import nn

from covnet.network.topology import Topology
from covnet.network.unet import ResidualBasicBlock, ResidualEncoderUNet
from covnet.runtime.errors import CovnetError

ISOTROPIC_PLAN = {
    "features_per_stage": [4, 8, 16],
    "kernel_sizes": [[3, 3, 3]] * 3,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "n_blocks_per_stage": [1, 2, 2],
    "n_conv_per_stage_decoder": [1, 2],
    "deep_supervision": True,
}
ANISOTROPIC_PLAN = {
    "features_per_stage": [4, 8, 16, 16],
    "kernel_sizes": [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
    "n_blocks_per_stage": [1, 1, 2, 1],
    "n_conv_per_stage_decoder": [1, 1, 1],
    "deep_supervision": True,
}


def _topology(plan, in_channels=1, num_classes=4, **overrides):
    return Topology.from_json({**plan, "in_channels": in_channels, "num_classes": num_classes, **overrides})


def _network(plan, **overrides):
    torch.manual_seed(0)
    return ResidualEncoderUNet(_topology(plan, **overrides))


@pytest.mark.parametrize("plan, patch, expected_shapes", [
    (ISOTROPIC_PLAN, (16, 16, 16), [(16, 16, 16), (8, 8, 8)]),
    (ANISOTROPIC_PLAN, (4, 32, 24), [(4, 32, 24), (4, 16, 12), (2, 8, 6)]),
])
def test_deep_supervision_outputs_full_resolution_first(plan, patch, expected_shapes):
    network = _network(plan).train()
    outputs = network(torch.randn(2, 1, *patch))
    assert isinstance(outputs, list)
    assert len(outputs) == len(plan["features_per_stage"]) - 1
    assert [tuple(o.shape) for o in outputs] == [(2, 4, *shape) for shape in expected_shapes]


@pytest.mark.parametrize("plan, patch", [(ISOTROPIC_PLAN, (8, 12, 16)), (ANISOTROPIC_PLAN, (2, 16, 8))])
def test_eval_mode_returns_one_full_resolution_tensor(plan, patch):
    network = _network(plan).eval()
    with torch.no_grad():
        output = network(torch.randn(1, 1, *patch))
    assert isinstance(output, torch.Tensor)
    assert output.shape == (1, 4, *patch)


def test_eval_output_equals_first_deep_supervision_output():
    network = _network(ISOTROPIC_PLAN)
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        training_outputs = network.train()(x)
        # InstanceNorm uses per-sample statistics in both modes, so the two paths must agree
        eval_output = network.eval()(x)
    assert torch.allclose(training_outputs[0], eval_output, atol=1e-5)


def test_without_deep_supervision_training_returns_one_tensor():
    network = _network(ANISOTROPIC_PLAN, deep_supervision=False).train()
    output = network(torch.randn(2, 1, 4, 16, 16))
    assert isinstance(output, torch.Tensor)
    assert output.shape == (2, 4, 4, 16, 16)


def test_backward_reaches_every_parameter_and_a_step_lowers_the_loss():
    network = _network(ANISOTROPIC_PLAN).train()
    x = torch.randn(2, 1, 4, 16, 16)
    target = (x[:, 0] > 0).long() + 2 * (x[:, 0] > 1).long()  # learnable from the input itself
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.9)

    def loss_value():  # cross-entropy at every deep-supervision resolution
        outputs = network(x)
        targets = [nn.functional.interpolate(target[:, None].float(), size=o.shape[2:])[:, 0].long()
                   for o in outputs]
        return sum(nn.functional.cross_entropy(o, t) for o, t in zip(outputs, targets))

    loss = loss_value()
    loss.backward()
    for name, parameter in network.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in network.parameters())
    first = loss.item()
    for _ in range(5):
        optimizer.step()
        optimizer.zero_grad()
        loss_value().backward()
    assert loss_value().item() < first


def test_encoder_structure_follows_the_plan():
    network = _network(ANISOTROPIC_PLAN)
    assert [len(stage) for stage in network.encoder] == ANISOTROPIC_PLAN["n_blocks_per_stage"]
    first_blocks = [stage[0] for stage in network.encoder]
    # stage 0 keeps shape and channels (no projection); later stages stride and project in their first block
    assert isinstance(first_blocks[0].skip, nn.Identity)
    for stage, block in enumerate(first_blocks[1:], start=1):
        assert isinstance(block, ResidualBasicBlock)
        assert block.conv_norm_nonlin[0].stride == tuple(ANISOTROPIC_PLAN["strides"][stage])
        assert block.skip[0].stride == tuple(ANISOTROPIC_PLAN["strides"][stage])
        assert block.conv_norm_nonlin[0].kernel_size == tuple(ANISOTROPIC_PLAN["kernel_sizes"][stage])
    norms = [m for m in network.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(n.affine and n.eps == 1e-5 for n in norms)
    assert all(m.negative_slope == 1e-2 and m.inplace for m in network.modules() if isinstance(m, nn.LeakyReLU))
    assert [len(d.convs) for d in network.decoder] == ANISOTROPIC_PLAN["n_conv_per_stage_decoder"]


def test_build_network_matches_direct_construction_and_parameter_count():
    built = _network(ISOTROPIC_PLAN)
    torch.manual_seed(0)
    direct = ResidualEncoderUNet(Topology(1, 4, **ISOTROPIC_PLAN))
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), direct.state_dict().values()))
    for plan in (ISOTROPIC_PLAN, ANISOTROPIC_PLAN):
        topology = _topology(plan, in_channels=2, num_classes=3)
        network = ResidualEncoderUNet(topology)
        assert sum(p.numel() for p in network.parameters()) == topology.parameter_count()


def test_he_initialisation_scales_weights_by_fan_in():
    network = _network(ISOTROPIC_PLAN)
    conv = network.encoder[2][1].conv  # 16 -> 16 channels, 3x3x3: fan_in = 432
    expected_std = (2 / (1 + 1e-2 ** 2) / 432) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.1)
    assert torch.count_nonzero(conv.bias) == 0


@pytest.mark.parametrize("change", [
    {"strides": [[1, 1, 1], [2, 2, 2]]},
    {"n_conv_per_stage_decoder": [1, 1, 1]},
    {"kernel_sizes": [[3, 3], [3, 3, 3], [3, 3, 3]]},
    {"features_per_stage": [4, 0, 16]},
])
def test_inconsistent_plans_are_rejected(change):
    with pytest.raises(CovnetError, match="network plan"):
        ResidualEncoderUNet(_topology(ISOTROPIC_PLAN, **change))
