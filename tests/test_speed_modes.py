"""covnet_predict's speed modes: fast on a CPU, accurate on a GPU, --fast/--accurate and the flags that change
them; the first line of the output names what runs, and the network really runs that."""
from __future__ import annotations

from dataclasses import replace

import pytest
from kit.workspaces import phantom_image, run_predict

import covnet.api
import covnet.cli.predict as cli
from covnet.image.io import write_image
from covnet.inference.cpu_runtime import AUTO, TORCH, resolve_runtime
from covnet.inference.lung_box import LungBoxSettings
from covnet.inference.predictor import ACCURATE, FAST, InferenceSettings, default_speed_mode, speed_mode_settings
from covnet.network.unet import ResidualEncoderUNet


@pytest.fixture(scope="module")
def one_case(trained, tmp_path_factory):
    inputs = tmp_path_factory.mktemp("speed") / "in"
    write_image(*phantom_image(trained, 0), inputs / "case_0000.nii.gz")
    return inputs


@pytest.fixture
def used_settings(monkeypatch) -> list:
    """The InferenceSettings covnet_predict hands to load_model, one per run."""
    seen = []
    load_model = cli.load_model

    def recording_load_model(*args, settings=None, **kwargs):
        seen.append(settings)
        return load_model(*args, settings=settings, **kwargs)

    monkeypatch.setattr(cli, "load_model", recording_load_model)
    return seen


@pytest.fixture
def forwards(monkeypatch) -> list:
    """The number of windows of every network forward."""
    counted = []
    forward = ResidualEncoderUNet.forward

    def counting_forward(self, x):
        counted.append(int(x.shape[0]))
        return forward(self, x)

    monkeypatch.setattr(ResidualEncoderUNet, "forward", counting_forward)
    return counted


def first_line(capsys) -> str:
    return capsys.readouterr().out.splitlines()[0]


def predict(trained, inputs, outputs, *flags) -> None:
    assert run_predict("-i", inputs, "-o", outputs, "--workspace", trained.root, "-f", "0", "--device", "cpu",
                       *flags) == 0


def test_the_cpu_default_is_fast_and_the_first_line_says_so(trained, one_case, tmp_path, used_settings, capsys):
    predict(trained, one_case, tmp_path / "out")
    line = first_line(capsys)
    assert line.startswith("covnet_predict: fast mode (the default on a CPU; --accurate for the full prediction): ")
    assert "no mirroring" in line and "lung box" in line and "window 1×2×2 the patch" in line
    assert used_settings == [replace(speed_mode_settings(FAST, covnet.api.PREDICT_SETTINGS), runtime=TORCH)]
    assert used_settings[0].lung_box == LungBoxSettings() and not used_settings[0].use_mirroring


def test_accurate_is_the_full_prediction(trained, one_case, tmp_path, used_settings, capsys):
    predict(trained, one_case, tmp_path / "out", "--accurate")
    assert first_line(capsys) == ("covnet_predict: accurate mode (--accurate): mirroring zyx (8 passes), step 0.5, "
                                  "whole body box")
    settings = used_settings[0]
    assert settings.flipped_axes == (0, 1, 2) and settings.lung_box is None and settings.step_size == 0.5
    assert settings.postprocess and settings.lateral_fix


@pytest.mark.parametrize("flags, said, changed", [
    (("--accurate", "--disable-tta"), "no mirroring", {"flipped_axes": ()}),
    (("--accurate", "--mirror-axes", "x"), "mirroring x (2 passes)", {"flipped_axes": (2,)}),
    (("--fast", "--mirror-axes", "yx"), "mirroring yx (4 passes)", {"flipped_axes": (1, 2)}),
    (("--fast", "--no-lung-box"), "whole body box", {"lung_box": None}),
    (("--accurate", "--lung-box"), "lung box (the lungs' air, 20 mm margin)", {"lung_box": LungBoxSettings()}),
    (("--fast", "--step-size", "0.75"), "step 0.75", {"step_size": 0.75}),
    (("--accurate", "--window-scale", "1x2x3"), "window 1×2×3 the patch", {"window_scale": (1.0, 2.0, 3.0)}),
    (("--fast", "--fp32"), "fast mode (--fast)", {"use_amp": False}),
])
def test_each_flag_changes_what_the_first_line_says(trained, one_case, tmp_path, used_settings, capsys, flags,
                                                    said, changed):
    predict(trained, one_case, tmp_path / "out", *flags)
    assert said in first_line(capsys)
    for name, value in changed.items():
        assert getattr(used_settings[0], name) == value


def test_mirroring_runs_the_passes_it_names(trained, one_case, tmp_path, forwards):
    """Every window goes through the network once per mirroring: 1, 2 and 8 times."""
    counts = {}
    for name, flags in {"none": ("--disable-tta",), "x": ("--mirror-axes", "x"), "zyx": ()}.items():
        forwards.clear()
        predict(trained, one_case, tmp_path / name, "--accurate", *flags)
        counts[name] = sum(forwards)
    assert counts["none"] > 0
    assert counts == {"none": counts["none"], "x": 2 * counts["none"], "zyx": 8 * counts["none"]}


def test_fast_and_accurate_together_are_a_usage_error(trained, one_case, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        run_predict("-i", one_case, "-o", tmp_path / "out", "--workspace", trained.root, "--fast", "--accurate")
    assert stopped.value.code == 2


@pytest.mark.parametrize("flags", [("--mirror-axes", "xq"), ("--mirror-axes", "x", "--disable-tta"),
                                   ("--window-scale", "1x0.5x2"), ("--window-scale", "2x2"),
                                   ("--window-scale", "1xinfx2")])
def test_bad_mirroring_and_window_flags_are_one_line(trained, one_case, tmp_path, flags, capsys):
    code = run_predict("-i", one_case, "-o", tmp_path / "out", "--workspace", trained.root, *flags)
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and flags[0] in error[0] and not (tmp_path / "out").exists()


def test_the_device_picks_the_mode_for_the_api_too(trained):
    import torch
    assert default_speed_mode(torch.device("cpu")) == FAST
    assert default_speed_mode(torch.device("cuda")) == ACCURATE
    model = covnet.api.load_model(trained.root, folds=["0"], device="cpu")
    assert model.settings == replace(speed_mode_settings(FAST, covnet.api.PREDICT_SETTINGS),
                                     runtime=resolve_runtime(AUTO, torch.device("cpu")))
    assert InferenceSettings().lung_box is None and InferenceSettings().use_mirroring   # validation's settings
