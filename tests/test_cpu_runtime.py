"""OpenVINO as the network's runtime on a CPU: chosen by --runtime (auto: when installed), the same labels as
torch, and a one-line error where it cannot run; each conversion kept in the cache, read back by later runs,
converted again when damaged or changed, once when two processes ask at once; its telemetry off."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kit.network_watch import watched_environment
from kit.workspaces import phantom_image, run_predict

import covnet.inference.cpu_runtime as cpu_runtime
from covnet.checkpoint import Checkpoint
from covnet.image.io import read_image, write_image
from covnet.inference.cpu_runtime import AUTO, OPENVINO, TORCH, OpenVinoNetwork, resolve_runtime
from covnet.inference.openvino_cache import ENTRY_NAME, MODEL_NAME, WEIGHTS_NAME, openvino_without_telemetry
from covnet.network.unet import ResidualEncoderUNet
from covnet.runtime.errors import CovnetError
from covnet.runtime.hashing import hash_file

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


def _network(trained, fold: int = 0):
    checkpoint = Checkpoint.load(trained.fold(fold) / "checkpoint_final.pth")
    network = ResidualEncoderUNet(checkpoint.typed_plan.network).eval()
    network.load_state_dict(checkpoint.network_state)
    return network, checkpoint.typed_plan


def _assert_computes_the_logits(network, converted, patch) -> None:
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
def test_openvino_computes_the_networks_logits(trained):
    network, plan = _network(trained)
    converted = OpenVinoNetwork(network, torch.zeros((2, 1, *plan.patch_size)), bfloat16=False, threads=1)
    _assert_computes_the_logits(network, converted, plan.patch_size)


@pytest.fixture
def conversions(monkeypatch) -> list[int]:
    """Counts OpenVINO's conversions from torch."""
    openvino = openvino_without_telemetry()
    calls, convert = [], openvino.convert_model
    monkeypatch.setattr(openvino, "convert_model", lambda *args, **kwargs: calls.append(1) or convert(*args, **kwargs))
    return calls


def _cached(network, plan, cache: Path) -> OpenVinoNetwork:
    return OpenVinoNetwork(network, torch.zeros((2, 1, *plan.patch_size)), bfloat16=False, threads=1,
                           topology=plan.network.to_json(), cache_dir=cache)


@needs_openvino
def test_a_conversion_is_kept_and_read_back_by_later_runs(trained, tmp_path, conversions):
    network, plan = _network(trained)
    cache = tmp_path / "openvino"
    _cached(network, plan, cache)
    entries = [path for path in cache.iterdir() if not path.name.startswith(".")]
    assert len(conversions) == 1 and len(entries) == 1
    assert {path.name for path in entries[0].iterdir()} == {MODEL_NAME, WEIGHTS_NAME, ENTRY_NAME}
    _assert_computes_the_logits(network, _cached(network, plan, cache), plan.patch_size)
    assert len(conversions) == 1                   # read from the cache, not converted again
    other, _ = _network(trained, fold=1)           # other weights, another entry
    _cached(other, plan, cache)
    assert len(conversions) == 2 and len([path for path in cache.iterdir() if not path.name.startswith(".")]) == 2


def _unreadable_but_listed(entry: Path) -> None:
    """model.xml that OpenVINO cannot read, listed in entry.json with its true SHA-256 and size."""
    (entry / MODEL_NAME).write_text("<net>not OpenVINO")
    record = json.loads((entry / ENTRY_NAME).read_text())
    found = hash_file(entry / MODEL_NAME)
    record["files"][MODEL_NAME] = {"sha256": found.sha256, "size": found.size}
    (entry / ENTRY_NAME).write_text(json.dumps(record))


@pytest.mark.parametrize("damage", ["truncated weights", "no entry.json", "unreadable xml"])
@needs_openvino
def test_a_damaged_entry_is_converted_again(trained, tmp_path, conversions, caplog, damage):
    network, plan = _network(trained)
    cache = tmp_path / "openvino"
    _cached(network, plan, cache)
    entry = next(path for path in cache.iterdir() if not path.name.startswith("."))
    if damage == "truncated weights":
        (entry / WEIGHTS_NAME).write_bytes((entry / WEIGHTS_NAME).read_bytes()[:100])
    elif damage == "no entry.json":
        (entry / ENTRY_NAME).unlink()
    else:
        _unreadable_but_listed(entry)
    with caplog.at_level("WARNING", logger="covnet"):
        converted = _cached(network, plan, cache)
    assert len(conversions) == 2 and "damaged" in caplog.text and str(entry) in caplog.text
    assert ("OpenVINO cannot read it" in caplog.text) == (damage == "unreadable xml")
    _assert_computes_the_logits(network, converted, plan.patch_size)
    _cached(network, plan, cache)                  # the entry is sound again
    assert len(conversions) == 2 and sorted(path.name for path in cache.iterdir()) == [".conversion.lock",
                                                                                          entry.name]


@needs_openvino
def test_a_cache_that_cannot_be_written_is_a_warning(trained, tmp_path, conversions, caplog):
    network, plan = _network(trained)
    (tmp_path / "file").write_text("")
    with caplog.at_level("WARNING", logger="covnet"):
        converted = _cached(network, plan, tmp_path / "file" / "openvino")
    assert len(conversions) == 1 and "cannot keep the OpenVINO conversion" in caplog.text
    _assert_computes_the_logits(network, converted, plan.patch_size)


CONVERTING_PROCESS = """
import sys, time
from pathlib import Path
from covnet.inference.openvino_cache import load_or_convert, openvino_without_telemetry
openvino = openvino_without_telemetry()
import openvino.opset13 as ops

def convert():
    with open(sys.argv[2], "a") as log:
        log.write("converted\\n")
    time.sleep(1.0)        # a slow conversion: the other process arrives meanwhile
    x = ops.parameter([1, 4], name="x")
    return openvino.Model([ops.relu(x)], [x], "tiny")

model = load_or_convert(openvino.Core(), {"weights_sha256": "same for both"}, convert, cache_dir=Path(sys.argv[1]))
assert model.get_friendly_name() == "tiny"
"""


@needs_openvino
def test_two_processes_asking_at_once_convert_once(tmp_path):
    environment, network_log = watched_environment(tmp_path / "watch")
    cache, log = tmp_path / "openvino", tmp_path / "conversions.txt"
    processes = [subprocess.Popen([sys.executable, "-c", CONVERTING_PROCESS, cache, log], env=environment,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors
    assert log.read_text().splitlines() == ["converted"] and network_log.read_text() == ""
    assert len([path for path in cache.iterdir() if not path.name.startswith(".")]) == 1


TELEMETRY_PROBE = """
import sys
if sys.argv[1] == "openvino first":
    import openvino
from covnet.inference.openvino_cache import openvino_without_telemetry, telemetry_active
openvino_without_telemetry()
print(telemetry_active())
"""


@needs_openvino
def test_openvino_is_imported_without_its_telemetry(tmp_path):
    environment, network_log = watched_environment(tmp_path)
    for order, active in (("covnet first", "False"), ("openvino first", "True")):
        result = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, order], env=environment, capture_output=True,
                                text=True, check=True)
        assert result.stdout.split() == [active]
        assert ("warning: openvino was imported before covnet, with its telemetry on" in result.stderr) == (
            active == "True")
    # openvino imported first reported its import (refused by the watch); covnet's import sent nothing
    attempts = network_log.read_text().splitlines()
    assert attempts and all("openvino first" in attempt for attempt in attempts)
    assert not (tmp_path / "home" / "intel" / "openvino_telemetry").exists()


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
