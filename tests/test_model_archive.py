"""Model archives: export from a trained workspace, install into the cache once, refuse what was altered."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from kit.workspaces import copy_workspace, phantom_image, run_predict

from covnet.checkpoint import Checkpoint
from covnet.cli import export_model, install_model
from covnet.cli.common import run_command
from covnet.image.io import read_image, write_image
from covnet.inference.model_choice import select_checkpoints
from covnet.model_archive.install import install_model_archive, model_cache_dir, resolve_model_archive
from covnet.model_archive.manifest import MANIFEST_NAME, ModelManifest
from covnet.runtime.atomic import read_json
from covnet.runtime.errors import CovnetError

CHECKPOINT = "fold_1/checkpoint_final.pth"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "covnet" / "models"


@pytest.fixture
def archive(trained, tmp_path_factory) -> Path:
    """Folds 0 and 1 of the trained workspace, exported once per session (tests that alter it copy it)."""
    path = tmp_path_factory.getbasetemp() / "archives" / "folds.zip"
    if not path.is_file():
        assert export(trained.root, path) == 0
    return path


def export(workspace_root: Path, output: Path, *flags) -> int:
    return run_command("covnet_export_model", export_model.main,
                       ["--workspace", str(workspace_root), "-o", str(output), *map(str, flags)])


def install(path: Path) -> int:
    return run_command("covnet_install_model", install_model.main, [str(path)])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_entries(cache: Path) -> list[Path]:
    return sorted(cache.iterdir()) if cache.is_dir() else []


def rewritten(source: Path, destination: Path, *, change=None, add=(), drop=(), relist=True) -> Path:
    """A copy of an archive rebuilt member by member (so its zip CRCs are right): ``change`` maps a member name to
    a function of its bytes, ``add`` is (name, bytes, is_symlink) members, ``drop`` member names; with ``relist``,
    added members are listed in the manifest with their true SHA-256 (so only the path checks can refuse them)."""
    change = change or {}
    with zipfile.ZipFile(source) as original:
        members = {name: original.read(name) for name in original.namelist() if name not in drop}
    manifest = json.loads(members.pop(MANIFEST_NAME))
    for name, data, _ in add:
        if relist:
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with zipfile.ZipFile(destination, "w") as copy:
        for name, data in members.items():
            copy.writestr(name, change[name](data) if name in change else data)
        for name, data, is_symlink in add:
            info = zipfile.ZipInfo(name)
            if is_symlink:
                info.external_attr = 0o120777 << 16
            copy.writestr(info, data)
        copy.writestr(MANIFEST_NAME, json.dumps(manifest))
    return destination


def flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


# ---------------------------------------------------------------------------------------------- round trip
def test_export_and_install_round_trip(trained, archive, cache, capsys):
    assert install(archive) == 0
    assert "installed:" in capsys.readouterr().out
    (folder,) = cache_entries(cache)
    manifest = ModelManifest.from_bytes((folder / MANIFEST_NAME).read_bytes(), folder)
    assert folder.name == hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
    assert manifest.folds == ["0", "1"] and manifest.checkpoint == "final"
    for fold in ("0", "1"):
        original, copy = trained.fold(fold) / "checkpoint_final.pth", folder / f"fold_{fold}" / "checkpoint_final.pth"
        assert sha256(copy) == sha256(original) == manifest.files[f"fold_{fold}/checkpoint_final.pth"].sha256
        loaded, expected = Checkpoint.load(copy).network_state, Checkpoint.load(original).network_state
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[key], expected[key]) for key in expected)
        summary = read_json(trained.fold(fold) / "validation" / "summary.json", "")
        model = next(model for model in manifest.models if model.name == f"fold_{fold}")
        assert model.validation == summary["mean"]
    assert json.loads((folder / "plans.json").read_text()) == Checkpoint.load(folder / "fold_0" /
                                                                               "checkpoint_final.pth").plan
    assert (folder / "dataset.json").read_bytes() == trained.dataset_json.read_bytes()
    assert manifest.files["dataset.json"].size == trained.dataset_json.stat().st_size
    # covnet_predict's model choice reads the installed folder as a results folder.
    paths, _ = select_checkpoints(folder)
    assert paths == [folder / "fold_0" / "checkpoint_final.pth", folder / "fold_1" / "checkpoint_final.pth"]
    assert install(archive) == 0
    assert "already installed" in capsys.readouterr().out
    assert cache_entries(cache) == [folder]
    assert resolve_model_archive(archive) == folder
    assert resolve_model_archive(trained.results) == trained.results


def test_the_same_model_exported_twice_has_the_same_id(trained, archive, tmp_path):
    assert export(trained.root, tmp_path / "again.zip") == 0
    assert sha256(tmp_path / "again.zip") == sha256(archive)


def test_cache_follows_xdg_cache_home_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    assert model_cache_dir() == tmp_path / "elsewhere" / "covnet" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache_dir() == tmp_path / "home" / ".cache" / "covnet" / "models"


def test_best_checkpoint_of_chosen_folds(trained, tmp_path, cache):
    assert export(trained.root, tmp_path / "best.zip", "-f", "1", "--checkpoint", "best") == 0
    installed = install_model_archive(tmp_path / "best.zip")
    assert installed.manifest.folds == ["1"] and installed.manifest.checkpoint == "best"
    with zipfile.ZipFile(tmp_path / "best.zip") as archive:
        assert sorted(archive.namelist()) == ["dataset.json", "fold_1/checkpoint_best.pth", MANIFEST_NAME,
                                              "plans.json"]
    paths, _ = select_checkpoints(installed.folder, installed.manifest.folds, installed.manifest.checkpoint)
    assert paths == [installed.folder / "fold_1" / "checkpoint_best.pth"]
    assert sha256(paths[0]) == sha256(trained.fold(1) / "checkpoint_best.pth")


def test_self_trained_model_is_the_default_like_predict(trained, tmp_path, cache):
    workspace = copy_workspace(trained, tmp_path / "ws")
    final = Path(os.fspath(workspace.selftrain_final))
    final.mkdir(parents=True)
    shutil.copyfile(workspace.fold(0) / "checkpoint_final.pth", final / "checkpoint_final.pth")
    validation = {"lungs": {"dice": 0.5, "nsd": 0.25}}
    (final / "model.json").write_text(json.dumps({"round": 1, "validation": validation}))
    for flags in ((), ("--selftrain",)):
        output = tmp_path / f"model{len(flags)}.zip"
        assert export(workspace.root, output, *flags) == 0
        installed = install_model_archive(output)
        assert [(model.name, model.file, model.validation) for model in installed.manifest.models] == \
            [("selftrain", "selftrain/final/checkpoint_final.pth", validation)]
        assert installed.manifest.folds == []
        assert select_checkpoints(installed.folder)[0] == [installed.folder / "selftrain" / "final" /
                                                           "checkpoint_final.pth"]


@pytest.mark.parametrize("flags, needle", [(("--selftrain", "-f", "0"), "either --selftrain or -f"),
                                           (("--selftrain",), "run covnet_selftrain first"),
                                           (("-f", "3"), "fold_3"),
                                           (("--selftrain", "--checkpoint", "best"), "only checkpoint_final")])
def test_export_refuses_what_is_not_there_in_one_line(trained, tmp_path, capsys, flags, needle):
    output = tmp_path / "model.zip"
    assert export(trained.root, output, *flags) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("covnet_export_model: error:") and needle in error and "\n" not in error
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_export_without_a_trained_model_says_what_its_user_can_do(tmp_path, capsys):
    assert export(tmp_path / "empty_ws", tmp_path / "model.zip") == 2
    error = capsys.readouterr().err.strip()
    assert error == f"covnet_export_model: error: {tmp_path / 'empty_ws' / 'results'}: not found; no trained model " \
                    "here: train one with covnet_train, or point --workspace at the workspace that trained one"
    assert "--model" not in error and not (tmp_path / "model.zip").exists()


# ---------------------------------------------------------------------------------------------- refusals
def refused(path: Path, cache: Path, capsys, *needles: str) -> str:
    assert install(path) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"covnet_install_model: error: {path}:"), error
    for needle in needles:
        assert needle in error, error
    assert cache_entries(cache) == [], "a refused archive left something in the cache"
    return error


def test_a_checkpoint_altered_with_a_recomputed_crc_is_refused(archive, tmp_path, cache, capsys):
    tampered = rewritten(archive, tmp_path / "tampered.zip", change={CHECKPOINT: flip_byte})
    refused(tampered, cache, capsys, CHECKPOINT, "SHA-256")


def test_a_byte_flipped_in_the_zip_file_is_refused(archive, tmp_path, cache, capsys):
    damaged = tmp_path / "damaged.zip"
    shutil.copyfile(archive, damaged)
    with zipfile.ZipFile(damaged) as opened:
        info = opened.getinfo(CHECKPOINT)
    data = bytearray(damaged.read_bytes())
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[data_start + info.compress_size // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    refused(damaged, cache, capsys, CHECKPOINT)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_zip_is_refused(archive, tmp_path, cache, capsys, keep):
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[: int(archive.stat().st_size * keep)])
    refused(truncated, cache, capsys, "truncated or damaged")


def test_a_zip_missing_a_listed_file_is_refused(archive, tmp_path, cache, capsys):
    refused(rewritten(archive, tmp_path / "missing.zip", drop=[CHECKPOINT]), cache, capsys, f"lacks {CHECKPOINT}")


def test_a_zip_with_an_unlisted_file_is_refused(archive, tmp_path, cache, capsys):
    extra = rewritten(archive, tmp_path / "extra.zip", add=[("fold_2/checkpoint_final.pth", b"x", False)],
                      relist=False)
    refused(extra, cache, capsys, "fold_2/checkpoint_final.pth", "does not list")


@pytest.mark.parametrize("name, is_symlink, needle", [
    ("../evil.pth", False, "steps out"),
    ("fold_0/../../evil.pth", False, "steps out"),
    ("/tmp/covnet-evil.pth", False, "absolute path"),
    ("fold_0/link.pth", True, "symbolic link"),
])
def test_a_member_path_that_escapes_is_refused_before_anything_is_written(archive, tmp_path, cache, capsys, name,
                                                                          is_symlink, needle):
    escaping = rewritten(archive, tmp_path / "escape.zip", add=[(name, b"/etc/passwd", is_symlink)])
    with zipfile.ZipFile(escaping) as check:
        assert name in check.namelist()
    refused(escaping, cache, capsys, needle)
    assert not (tmp_path / "evil.pth").exists() and not (cache.parent / "evil.pth").exists()
    assert not Path("/tmp/covnet-evil.pth").exists()


def test_a_kill_during_install_leaves_no_model_and_the_next_install_completes(archive, tmp_path, cache):
    """SIGKILL while the second file is being unpacked: no model folder appears, and the next install removes the
    dead install's temporary folder and installs."""
    killer = (
        "import os, signal\n"
        "from covnet.model_archive import install\n"
        "real, calls = install.hash_stream, []\n"
        "def dying(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*args, **kwargs)\n"
        "install.hash_stream = dying\n"
        f"install.install_model_archive({str(archive)!r})\n")
    result = subprocess.run([sys.executable, "-c", killer], env={**os.environ}, capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr
    leftovers = cache_entries(cache)
    assert leftovers and all(entry.name.startswith(".tmp-") for entry in leftovers)
    installed = install_model_archive(archive)
    assert cache_entries(cache) == [installed.folder] and installed.newly_installed
    with pytest.raises(CovnetError, match="not found"):
        install_model_archive(tmp_path / "absent.zip")


# ---------------------------------------------------------------------------------------------- covnet_predict --model
def test_predict_with_a_model_zip_gives_the_workspaces_labels(trained, archive, cache, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 3), inputs / "case.nii.gz")
    assert run_predict("-i", inputs, "-o", tmp_path / "ws", "--workspace", trained.root, "--disable-tta") == 0
    assert run_predict("-i", inputs, "-o", tmp_path / "zip", "--model", archive, "--workspace", tmp_path / "none",
                       "--disable-tta") == 0
    (installed,) = cache_entries(cache)
    assert f"; model: model {installed.name[:12]}: folds 0, 1 (checkpoint_final); " in capsys.readouterr().out
    labels = read_image(tmp_path / "ws" / "case.nii.gz")[0]
    np.testing.assert_array_equal(read_image(tmp_path / "zip" / "case.nii.gz")[0], labels)
    assert len(np.unique(labels)) > 1
    # An archive of fold 1's best checkpoint is used as it was exported, without -f or --checkpoint.
    assert export(trained.root, tmp_path / "best.zip", "-f", "1", "--checkpoint", "best") == 0
    assert run_predict("-i", inputs, "-o", tmp_path / "best_zip", "--model", tmp_path / "best.zip",
                       "--disable-tta") == 0
    assert run_predict("-i", inputs, "-o", tmp_path / "best_ws", "--workspace", trained.root, "-f", "1",
                       "--checkpoint", "best", "--disable-tta") == 0
    np.testing.assert_array_equal(read_image(tmp_path / "best_zip" / "case.nii.gz")[0],
                                  read_image(tmp_path / "best_ws" / "case.nii.gz")[0])


@pytest.mark.parametrize("flags, asked", [(("-f", "2"), "-f 2"), (("-f", "0", "4"), "-f 4"),
                                          (("--checkpoint", "best"), "checkpoint_best")])
def test_predict_asking_a_zip_for_a_model_it_lacks_names_what_it_holds(trained, archive, cache, tmp_path, capsys,
                                                                       flags, asked):
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 3), inputs / "case.nii.gz")
    assert run_predict("-i", inputs, "-o", tmp_path / "out", "--model", archive, *flags) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"covnet_predict: error: {archive}: holds folds 0, 1 (checkpoint_final) only, not {asked}: "
                     + ("leave out --checkpoint, or export the model with --checkpoint best" if "best" in asked else
                        "leave out -f to use what it holds, or export the folds you want (covnet_export_model -f)")]
    assert not (tmp_path / "out").exists()


def test_predict_with_a_tampered_zip_is_one_line_and_writes_nothing(trained, archive, cache, tmp_path, capsys):
    tampered = rewritten(archive, tmp_path / "tampered.zip", change={CHECKPOINT: flip_byte})
    inputs = tmp_path / "in"
    write_image(*phantom_image(trained, 3), inputs / "case.nii.gz")
    assert run_predict("-i", inputs, "-o", tmp_path / "out", "--model", tampered) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"covnet_predict: error: {tampered}: {CHECKPOINT} does not match the SHA-256 and size in its manifest "
        f"(altered or damaged); nothing was installed"]
    assert not (tmp_path / "out").exists() and cache_entries(cache) == []
