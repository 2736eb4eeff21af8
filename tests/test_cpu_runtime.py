"""OpenVINO as the network's runtime on a CPU: chosen by --runtime (auto: when installed), the same labels as
torch, and a one-line error where it cannot run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from kit.workspaces import phantom_image, run_predict

import covnet.inference.cpu_runtime as cpu_runtime
from covnet.checkpoint import Checkpoint
from covnet.image.io import read_image, write_image
from covnet.inference.cpu_runtime import AUTO, OPENVINO, TORCH, OpenVinoNetwork, resolve_runtime
from covnet.network.unet import ResidualEncoderUNet
from covnet.runtime.errors import CovnetError

needs_openvino = pytest.mark.skipif(not cpu_runtime.openvino_installed(), reason="openvino is not installed")


def test_auto_is_openvino_on_a_cpu_only_when_installed(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for installed in (True, False):
        monkeypatch.setattr(cpu_runtime, "openvino_installed", lambda: installed)
        assert resolve_runtime(AUTO, cpu) == (OPENVINO if installed else TORCH)
        assert resolve_runtime(AUTO, cuda) == TORCH and resolve_runtime(TORCH, cpu) == TORCH
    with pytest.raises(CovnetError, match="pip install 'covnet\\[openvino\\]'"):
        resolve_runtime(OPENVINO, cpu)                          # not installed
    monkeypatch.setattr(cpu_runtime, "openvino_installed", lambda: True)
    with pytest.raises(CovnetError, match="runs on a CPU"):
        resolve_runtime(OPENVINO, cuda)


def test_openvino_without_the_package_is_one_line(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cpu_runtime, "openvino_installed", lambda: False)
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 0), inputs / "case_0000.nii.gz")
    code = run_predict("-i", inputs, "-o", tmp_path / "out", "--workspace", trained.root, "--runtime", "openvino")
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "openvino" in error[0] and not (tmp_path / "out").exists()


@needs_openvino
def test_openvino_computes_the_networks_logits(trained):
    checkpoint = Checkpoint.load(trained.fold(0) / "checkpoint_final.pth")
    network = ResidualEncoderUNet(checkpoint.typed_plan.network).eval()
    network.load_state_dict(checkpoint.network_state)
    patch = checkpoint.typed_plan.patch_size
    converted = OpenVinoNetwork(network, torch.zeros((2, 1, *patch)), bfloat16=False, threads=1)
    # a full batch, a last partial one (padded), a wider window
    for batch in (torch.randn(2, 1, *patch), torch.randn(1, 1, *patch), torch.randn(1, 1, patch[0], 2 * patch[1],
                                                                                    patch[2])):
        with torch.inference_mode():
            expected = network(batch)
            expected = expected[0] if isinstance(expected, (list, tuple)) else expected
        logits = converted(batch)
        assert logits.shape == expected.shape and logits.dtype == torch.float32
        assert torch.allclose(logits, expected, atol=1e-3, rtol=1e-3)
    assert len(converted._requests) == 2          # the partial batch used the full batch's compiled model


@needs_openvino
def test_the_cpu_default_runs_openvino_with_torchs_labels(trained, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 3), inputs / "case_0000.nii.gz")
    for runtime in (AUTO, TORCH):
        assert run_predict("-i", inputs, "-o", tmp_path / runtime, "--workspace", trained.root, "-f", "0",
                           "--device", "cpu", "--runtime", runtime) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.endswith(", OpenVINO") == (runtime == AUTO)
    labels = {runtime: read_image(tmp_path / runtime / "case.nii.gz")[0] for runtime in (AUTO, TORCH)}
    assert labels[TORCH].any() and np.mean(labels[AUTO] == labels[TORCH]) > 0.999
