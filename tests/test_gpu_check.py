"""benchmarks/gpu_check cannot rot: its dry run runs every step on the CPU at tiny sizes (the CUDA tests included,
on the CPU) and must record each step as ok with figures of the right kind. Also: what it carries to the GPU
machine comes back byte for byte, and its budget stops steps that would not fit."""
from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from kit.images import make_tiny_case

from benchmarks.gpu_check.packing import pack_nifti, recompress_wheel, unpack_nifti
from benchmarks.gpu_check.runner import Budget, Report
from covnet.image.io import write_image

REPOSITORY = Path(__file__).resolve().parents[1]
STEPS = ("environment", "small_data", "phantom_model", "correctness", "clinical_data", "memory", "training_speed",
         "inference", "training_speed_compile")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# A package that covnet's dependencies import only at some versions (blosc2 before 4.16 imported numexpr) and
# covnet never does: the dry run runs where it cannot be imported, whatever this venv holds.
ABSENT_TRANSITIVE = "numexpr"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess]:
    base = tmp_path_factory.mktemp("gpu_check")
    blocker = base / "blocker"
    blocker.mkdir()
    (blocker / f"{ABSENT_TRANSITIVE}.py").write_text(f"raise ImportError('{ABSENT_TRANSITIVE} is not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", base / "out", "--dry-run",
                                "--budget-s", "1800", "--work-dir", base / "work"], cwd=REPOSITORY, env=env,
                               capture_output=True, text=True, encoding="utf-8", timeout=2400)
    report = json.loads((base / "out" / "gpu_check.json").read_text())
    return report, completed


def test_dry_run_runs_every_step(dry_run):
    report, completed = dry_run
    assert completed.returncode == 0, completed.stdout[-4000:]
    assert report["finished"] and report["dry_run"] and report["device"] == "cpu"
    assert tuple(report["steps"]) == STEPS
    for name, step in report["steps"].items():
        assert step["status"] == "ok", (name, step["error"])
        assert step["exercised"], name
        assert isinstance(step["seconds"], float) and step["seconds"] >= 0


def test_dry_run_needs_only_what_covnet_imports(dry_run):
    environment = dry_run[0]["steps"]["environment"]["figures"]
    assert environment["missing"] == []
    assert ABSENT_TRANSITIVE in environment["transitive_absent"]
    assert "not installed" in environment["transitive"][ABSENT_TRANSITIVE]["error"]
    assert ABSENT_TRANSITIVE not in environment["modules"]


def test_dry_run_ran_the_cuda_tests_on_the_cpu(dry_run):
    correctness = dry_run[0]["steps"]["correctness"]["figures"]
    assert correctness["passed"] == len(correctness["tests"]) >= 5 and correctness["skipped"] == 0
    agreement = next(test for test in correctness["tests"] if test["name"].startswith("test_device_predicts"))
    assert agreement["figures"]["voxel_agreement"] == 1.0      # CPU float32 against itself
    ddp = next(test for test in correctness["tests"] if test["name"].startswith("test_one_process_ddp"))
    assert ddp["figures"]["backend"] == "gloo" and ddp["figures"]["ddp_difference"] == 0.0


def test_dry_run_measures_memory_of_three_plans(dry_run):
    plans = dry_run[0]["steps"]["memory"]["figures"]["plans"]
    assert [plan["budget_gb"] for plan in plans] == [0.03, 0.1, 0.2]
    for plan in plans:
        assert positive(plan["measured_gib"]) and positive(plan["estimate_gib"])
        assert math.isclose(plan["estimate_over_measured"], plan["estimate_gib"] / plan["measured_gib"], rel_tol=0.01)
    assert plans[0]["patch_size"] != plans[1]["patch_size"]


def test_dry_run_times_training_and_inference(dry_run):
    steps = dry_run[0]["steps"]
    for name in ("training_speed", "training_speed_compile"):
        speed = steps[name]["figures"]
        assert speed["epochs"] == 2 and speed["timed_iterations"] == 2
        assert positive(speed["seconds_per_250_iterations"]) and 0 <= speed["data_wait_share_timed"] <= 1
    inference = steps["inference"]["figures"]
    assert len(inference["image"]["shape_zyx"]) == 3
    for tta in ("tta_off", "tta_on"):
        assert inference[tta]["exit_code"] == 0 and positive(inference[tta]["peak_resident_gib"])
        assert len(inference[tta]["network_s"]) == 1 and positive(inference[tta]["network_s"][0])
    assert set(dry_run[0]["goals"]) >= {"memory_error_within_15_percent", "tta_network_s",
                                        "training_speed_250_iterations_s"}


def test_a_packed_ct_unpacks_to_the_same_bytes(tmp_path):
    image, _, geometry = make_tiny_case(0)
    source = tmp_path / "ct.nii.gz"
    write_image(image, geometry, source)
    info = pack_nifti(source, tmp_path / "ct.pack", preset=1)
    restored = unpack_nifti(tmp_path / "ct.pack", tmp_path / "out")
    assert info["dtype"][1:] == image.dtype.str[1:] and info["shape"] == list(image.shape)   # the predictor ran
    assert restored.name == "ct.nii.gz"
    assert gzip.decompress(restored.read_bytes()) == gzip.decompress(source.read_bytes())


def test_a_file_that_is_no_integer_nifti_is_packed_as_it_is(tmp_path):
    source = tmp_path / "notes.nii"
    source.write_bytes(b"not a NIfTI header " * 40)
    assert "width" not in pack_nifti(source, tmp_path / "notes.pack", preset=1)
    assert unpack_nifti(tmp_path / "notes.pack", tmp_path / "out").read_bytes() == source.read_bytes()


def test_a_recompressed_wheel_keeps_every_member(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    members = {"demo/__init__.py": b"x = 1\n" * 1000, "demo-1.0.dist-info/RECORD": b"demo/__init__.py,,\n"}
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    assert recompress_wheel(wheel) and not recompress_wheel(wheel)
    with zipfile.ZipFile(wheel) as archive:
        assert {info.filename: archive.read(info) for info in archive.infolist()} == members
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_LZMA}


def test_a_step_beyond_the_budget_is_skipped_and_recorded(tmp_path):
    report = Report(tmp_path, Budget(10.0), {})
    ran = []

    def fits(record):
        record["figures"]["value"] = 1

    def breaks(record):
        raise ValueError("broken\nsecond line")

    assert report.run_step("fits", 1.0, fits)
    assert not report.run_step("too_long", 60.0, ran.append)
    assert not report.run_step("breaks", 1.0, breaks)
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert not ran
    assert steps["fits"]["status"] == "ok" and steps["fits"]["figures"] == {"value": 1}
    assert steps["too_long"]["status"] == "skipped" and "budget" in steps["too_long"]["error"]
    assert steps["breaks"]["status"] == "failed" and steps["breaks"]["error"] == "ValueError: broken second line"
