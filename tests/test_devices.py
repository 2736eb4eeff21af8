"""``--device``: auto, cpu, cuda and cuda:N are the choices; anything else, and CUDA where there is none or not
that many, is one line in every command that takes the flag."""
from __future__ import annotations

import pytest
import torch
from kit.images import make_tiny_case
from kit.workspaces import command

from covnet.image.io import write_image
from covnet.runtime.devices import resolve_device
from covnet.runtime.errors import CovnetError


def test_the_valid_choices_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["gpu", "foo", "mps", "cpu:0", "cuda:", "cuda:-1", "cuda:x", ""])
def test_other_names_are_refused_with_the_choices(name):
    with pytest.raises(CovnetError) as raised:
        resolve_device(name)
    assert str(raised.value) == f"--device {name}: choose auto, cpu, cuda or cuda:N"


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(CovnetError, match=f"--device {name}: no CUDA device is available here; use --device cpu"):
            resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu")


def test_a_cuda_index_beyond_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(CovnetError, match="--device cuda:2: this machine has 2 CUDA device\\(s\\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.fixture
def predict_arguments(tmp_path):
    image, _, geometry = make_tiny_case(0)
    write_image(image, geometry, tmp_path / "in" / "case_0000.nii.gz")
    model = tmp_path / "checkpoint_final.pth"
    model.write_bytes(b"never loaded: the device is checked first")
    return ["-i", tmp_path / "in", "-o", tmp_path / "out", "--model", model]


@pytest.mark.parametrize("name", ["gpu", "foo", "mps"])
@pytest.mark.parametrize("program", ["covnet_train", "covnet_selftrain", "covnet_predict"])
def test_every_command_refuses_a_bad_device_in_one_line(program, name, tmp_path, predict_arguments, capsys):
    arguments = {"covnet_train": ["0", "--workspace", tmp_path / "ws"],
                 "covnet_selftrain": ["--workspace", tmp_path / "ws"],
                 "covnet_predict": predict_arguments}[program]
    assert command(program, *arguments, "--device", name) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"{program}: error: --device {name}: choose auto, cpu, cuda or cuda:N"]
    assert not (tmp_path / "ws" / "results").exists()
