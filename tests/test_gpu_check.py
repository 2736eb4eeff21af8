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
from types import SimpleNamespace

import pytest
from kit.images import make_tiny_case

from benchmarks.gpu_check.__main__ import build_parser, skipped_steps
from benchmarks.gpu_check.packing import pack_nifti, recompress_wheel, unpack_nifti
from benchmarks.gpu_check.runner import Budget, Report, StepTimeout
from benchmarks.gpu_check.scale import GPU
from benchmarks.gpu_check.speed import step_variants
from benchmarks.gpu_check.variants import (COMPILED, EAGER, VARIANTS, deep_supervision_indices, instance_to_group_norm,
                                           targets_built_on)
from covnet.image.io import write_image

REPOSITORY = Path(__file__).resolve().parents[1]
STEPS = ("environment", "small_data", "phantom_model", "correctness", "clinical_data", "memory", "training_speed",
         "inference", "training_speed_compile", "step_profile", "step_variants")


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


def test_dry_run_profiles_the_training_step(dry_run):
    profile = dry_run[0]["steps"]["step_profile"]["figures"]
    assert positive(profile["seconds_per_250_iterations"]) and positive(profile["flops_per_iteration"])
    top = profile["profile"]["top_self_cpu"]
    assert len(top) >= 5 and all(row["name"] and positive(row["self_ms_per_iteration"]) for row in top)
    assert any("convolution" in row["name"] for row in top)
    # train_epoch's own host syncs (each a wait for the GPU on CUDA), named by the line that asks for them
    assert profile["python_syncs_per_iteration"] == sum(profile["python_syncs"].values()) >= 1
    assert all("covnet/training/loop.py:" in caller for caller in profile["python_syncs"])
    assert {"forward_and_loss", "backward", "optimizer_step"} <= set(profile["phases"])
    assert all(phase["s_per_iteration"] >= 0 for phase in profile["phases"].values())


# On the CPU, bfloat16 autocast (oneDNN, torch 2.13) now and then gives a non-finite gradient: a finding recorded as
# the variant's failure, not a broken code path.
CPU_BFLOAT16_FAILURE = "training loss became"


def test_dry_run_times_every_variant(dry_run):
    figures = dry_run[0]["steps"]["step_variants"]["figures"]
    variants = figures["variants"]
    assert tuple(variants) == EAGER + COMPILED == tuple(VARIANTS)
    for name, variant in variants.items():
        if variant["status"] == "failed":
            assert VARIANTS[name].bfloat16 and CPU_BFLOAT16_FAILURE in variant["reason"], (name, variant["reason"])
            continue
        assert variant["status"] in ("ran", "not applicable on cpu"), (name, variant)
        assert positive(variant["seconds_per_250_iterations"]) and variant["iterations"] == 1, name
        assert variant["peak_gib"] >= 0 and math.isfinite(variant["mean_loss"]), name
        cuda_only = VARIANTS[name].cudnn_benchmark or VARIANTS[name].bfloat16 or VARIANTS[name].targets_on_device \
            or VARIANTS[name].compile_mode is not None
        assert (variant["status"] == "not applicable on cpu") == cuda_only, name
        assert (variant["reason"] or "").startswith("not applicable on cpu") == cuda_only, name
    # the harness's copy of train_epoch is train_epoch: the same loss, to the last bit, on the CPU
    assert variants["replica"]["mean_loss"] == variants["baseline"]["mean_loss"]
    assert math.isclose(variants["deferred_syncs"]["mean_loss"], variants["baseline"]["mean_loss"], rel_tol=1e-6)
    assert figures["fastest"] in VARIANTS and positive(figures["baseline_250_iterations_s"])


class FakeCheck:
    """What speed.step_variants asks of benchmarks.gpu_check.steps.Check."""

    def __init__(self, tmp_path, budget_s, command=None):
        self.scale, self.device, self.work, self.clinical = GPU, "cuda", tmp_path, tmp_path / "clinical"
        self.report = Report(tmp_path / "out", Budget(budget_s), {})
        self.commands = []
        self._command = command

    def needs(self, *steps):
        pass

    def command(self, argv, **kwargs):
        self.commands.append(argv)
        return self._command(argv)


def test_variants_the_budget_cannot_hold_are_recorded_as_not_run(tmp_path):
    check, record = FakeCheck(tmp_path, budget_s=60), {"figures": {}}
    step_variants(check, record)
    assert not check.commands
    assert set(record["figures"]["variants"]) == set(VARIANTS)
    for variant in record["figures"]["variants"].values():
        assert variant["status"] == "not run" and variant["reason"].startswith("budget:")


def test_a_variant_worker_cut_short_keeps_what_it_finished(tmp_path):
    def cut_short(argv):
        out, names = Path(argv[argv.index("-m") + 2]), [arg for arg in argv if arg in VARIANTS]
        out.write_text(json.dumps({"variants": {names[0]: {"status": "ran", "seconds_per_250_iterations": 50.0}}}))
        raise StepTimeout("killed after 100 s")

    check, record = FakeCheck(tmp_path, budget_s=1000, command=cut_short), {"figures": {}}
    step_variants(check, record)
    variants = record["figures"]["variants"]
    assert variants["baseline"]["status"] == "ran" and record["figures"]["fastest"] == "baseline"
    assert variants["combined"] == {"status": "not run", "reason": "cut short by the budget (killed after 100 s)"}
    assert len(check.commands) == 1 + len(COMPILED)       # on a GPU each compiled variant has a process of its own


def test_only_runs_the_steps_it_names():
    args = build_parser().parse_args(["out", "--only", "clinical_data", "step_variants"])
    skipped = skipped_steps(args)
    assert "clinical_data" not in skipped and "step_variants" not in skipped and "memory" in skipped
    assert skipped_steps(build_parser().parse_args(["out", "--skip", "memory"])) == ["memory"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["out", "--skip", "memory", "--only", "memory"])


def test_deep_supervision_targets_built_on_the_device_are_covnets():
    import torch

    from covnet.training.augmentation import downsample_nearest

    scales = [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (1.0, 0.25, 0.25), (0.5, 0.125, 0.25)]
    plan = SimpleNamespace(patch_size=[6, 10, 14], network=SimpleNamespace(deep_supervision_scales=scales))
    target = torch.randint(0, 5, (2, 1, 6, 10, 14), dtype=torch.int16)
    built = targets_built_on(target, deep_supervision_indices(plan, torch.device("cpu")))
    assert [torch.equal(ours, downsample_nearest(target, scale)) for ours, scale in zip(built, scales)] == [True] * 4


def test_instance_norm_as_group_norm_is_the_same_function():
    import torch

    from covnet.network.unet import ConvNormNonlin

    torch.manual_seed(0)
    layer = ConvNormNonlin(2, 6, (3, 3, 3))
    with torch.no_grad():
        layer[1].weight.uniform_(0.5, 2.0)
        layer[1].bias.uniform_(-1.0, 1.0)
    data = torch.randn(2, 2, 5, 6, 7)
    expected = layer(data)
    instance_to_group_norm(layer)
    assert isinstance(layer[1], torch.nn.GroupNorm)
    assert torch.allclose(layer(data), expected, atol=1e-5)


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
