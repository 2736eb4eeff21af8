"""Training's precision follows plans.json's mixed_precision (float16 on CUDA, bfloat16 on CPUs with AMX or
AVX512-BF16) unless --fp32; the loss, the weights and the optimizer's state stay float32; CPU plans record the
precision they were sized for, and their time model and measurement use it."""
import itertools
import json

import pytest
import torch
from kit.workspaces import command, make_tiny_trainable_workspace, tiny_topology

from covnet.cli import train
from covnet.cli.settings_flags import settings_from_args
from covnet.network.unet import ResidualEncoderUNet
from covnet.planning.cpu_measure import NetworkStep
from covnet.runtime import precision
from covnet.training import session as session_module
from covnet.training.loop import train_epoch
from covnet.training.losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights
from covnet.training.session import training_precision
from covnet.training.settings import TrainingSettings
from covnet.workspace import Workspace

NATIVE = precision.cpu_has_native_bfloat16()
needs_bfloat16 = pytest.mark.skipif(not NATIVE, reason="this CPU has neither AMX nor AVX512-BF16")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------ the decision
@pytest.mark.parametrize("planned, fp32, native, device, expected, words", [
    (False, False, True, "cpu", False, "mixed_precision is false"),
    (True, True, True, "cpu", False, "--fp32"),
    (True, False, True, "cpu", True, "bfloat16 autocast"),
    (True, False, False, "cpu", False, "neither AMX nor AVX512-BF16"),
    (True, False, False, "cuda", True, "float16 autocast (plans.json's mixed_precision; float32 weights, a GradScaler"),
    (False, False, False, "cuda", False, "mixed_precision is false"),
])
def test_training_precision_follows_the_plan_the_flag_and_the_device(monkeypatch, planned, fp32, native, device,
                                                                      expected, words):
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: native)
    plan = type("PlanStub", (), {"mixed_precision": planned})()
    mixed, text = training_precision(plan, TrainingSettings(fp32=fp32), torch.device(device))
    assert mixed is expected and words in text


def test_fp32_is_a_covnet_train_flag_that_a_continued_run_may_change():
    settings = settings_from_args(TrainingSettings, train.build_parser().parse_args(["0", "--fp32"]))
    assert settings.fp32 and not TrainingSettings().fp32
    assert "fp32" in TrainingSettings.CHANGEABLE_ON_CONTINUE
    assert TrainingSettings.from_json({k: v for k, v in TrainingSettings().to_json().items() if k != "fp32"}) \
        == TrainingSettings()      # settings recorded before the flag existed still load


# ------------------------------------------------------------------------------------------------ one step
def _topology():
    plan = type("PlanStub", (), {"in_channels": 1, "num_classes": 3})()
    return tiny_topology(plan)


def _step(mixed_precision: bool):
    """One training step of a tiny network on a random batch; the dtypes a conv, the loss's logits and the loss
    had, the optimizer's momentum buffers and the weights after it."""
    topology, patch = _topology(), (16, 16, 16)
    torch.manual_seed(0)
    network = ResidualEncoderUNet(topology)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    loss = DeepSupervisionLoss(DiceCELoss(batch_dice=True), deep_supervision_weights(len(topology.logit_shapes(patch))))
    seen = {"conv": [], "logits": [], "loss": []}
    network.stem[0].register_forward_hook(lambda module, inputs, output: seen["conv"].append(output.dtype))

    def spy(outputs, targets):
        seen["logits"] += [output.dtype for output in outputs]
        value = loss(outputs, targets)
        seen["loss"].append(value.dtype)
        return value

    batch = {"data": torch.randn(2, 1, *patch),
             "target": [torch.randint(0, 3, (2, 1, *shape)) for _, *shape in topology.logit_shapes(patch)]}
    result = train_epoch(network, itertools.repeat(batch), spy, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                         2, CPU, 12.0, mixed_precision=mixed_precision)
    assert result.iterations == 2 and torch.isfinite(torch.tensor(result.mean_loss))
    momentum = [optimizer.state[p]["momentum_buffer"].dtype for p in network.parameters() if p in optimizer.state]
    return seen, momentum, {p.dtype for p in network.parameters()}


@needs_bfloat16
def test_a_cpu_training_step_under_mixed_precision_runs_the_network_in_bfloat16_and_the_rest_in_float32():
    seen, momentum, weights = _step(mixed_precision=True)
    assert set(seen["conv"]) == {torch.bfloat16}
    assert set(seen["logits"]) == {torch.float32} and set(seen["loss"]) == {torch.float32}
    assert momentum and set(momentum) == {torch.float32} and weights == {torch.float32}


def test_a_float32_training_step_runs_the_network_in_float32():
    seen, momentum, weights = _step(mixed_precision=False)
    assert set(seen["conv"]) == {torch.float32} and set(seen["loss"]) == {torch.float32}
    assert set(momentum) == {torch.float32} and weights == {torch.float32}


# ------------------------------------------------------------------------------------------------ covnet_train
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Workspace:
    return make_tiny_trainable_workspace(tmp_path_factory.mktemp("precision") / "ws", num_labelled=3)


def _train(workspace: Workspace, monkeypatch, *flags) -> tuple[set, str]:
    """covnet_train all for one iteration; the dtypes the network's first conv computed in (training and patch
    validation) and the training log."""
    dtypes = set()

    def network(topology):
        built = ResidualEncoderUNet(topology)
        built.stem[0].register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
        return built

    monkeypatch.setattr(session_module, "ResidualEncoderUNet", network)
    assert command("covnet_train", "all", "--workspace", workspace.root, "--epochs", "1", "--iters-per-epoch", "1",
                   "--val-iters", "1", "--num-workers", "0", "--device", "cpu", *flags) == 0
    folder = workspace.fold("all")
    return dtypes, folder.log_file.read_text()


def _with_mixed_precision(workspace: Workspace, tmp_path, mixed: bool) -> Workspace:
    copy = Workspace(tmp_path / "ws")
    copy.root.mkdir()
    (copy.root / "raw").symlink_to(workspace.raw)
    (copy.root / "preprocessed").mkdir()
    for item in workspace.preprocessed.iterdir():
        (copy.preprocessed / item.name).symlink_to(item)
    (copy.preprocessed / "plans.json").unlink()
    data = json.loads(workspace.plans_json.read_text())
    data["mixed_precision"] = mixed
    copy.plans_json.write_text(json.dumps(data))
    return copy


def test_a_plan_without_mixed_precision_trains_in_float32(tiny, tmp_path, monkeypatch):
    dtypes, log = _train(_with_mixed_precision(tiny, tmp_path, False), monkeypatch)
    assert dtypes == {torch.float32}
    assert "training precision: float32 (plans.json's mixed_precision is false)" in log


@needs_bfloat16
def test_a_plan_with_mixed_precision_trains_in_bfloat16_on_this_cpu_unless_fp32(tiny, tmp_path, monkeypatch):
    workspace = _with_mixed_precision(tiny, tmp_path, True)
    dtypes, log = _train(workspace, monkeypatch)
    assert dtypes == {torch.bfloat16} and "training precision: bfloat16 autocast" in log
    dtypes, log = _train(workspace, monkeypatch, "--continue", "--epochs", "2", "--fp32")
    assert dtypes == {torch.float32} and "training precision: float32 (--fp32)" in log


@needs_bfloat16
def test_the_planners_timing_step_runs_in_the_precision_it_is_given():
    for bfloat16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        step = NetworkStep(_topology(), (16, 16, 16), 2, bfloat16=bfloat16)
        dtypes = set()
        step.parts[0].stem[0].register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
        assert step() > 0 and dtypes == {expected}
