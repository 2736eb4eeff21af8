"""Plans sized for the training device: CUDA plans by memory (AMP model), CPU plans by time per iteration."""
import json
import math

import pytest

from covnet.cli import plan_and_preprocess
from covnet.cli.common import run_command
from covnet.dataset import covid_description
from covnet.planning import cpu_time, planner, rules
from covnet.planning.fingerprint import CaseFingerprint, DatasetFingerprint
from covnet.planning.memory import estimate_training_memory_bytes
from covnet.planning.planner import make_plan
from covnet.planning.plans import PLANS_VERSION, PREPROCESSING_VERSION, Plan
from covnet.runtime.errors import CovnetError
from covnet.runtime.precision import cpu_has_native_bfloat16
from covnet.workspace import Workspace

GIB = 2 ** 30
FOREGROUND = {"mean": -600.0, "std": 250.0, "median": -700.0, "percentile_00_5": -1000.0,
              "percentile_99_5": 200.0, "min": -1024.0, "max": 400.0}


def fingerprint(shape, spacing, cases=10) -> DatasetFingerprint:
    return DatasetFingerprint(cases=[
        CaseFingerprint(case=f"case_{i}", spacing=list(spacing), shape_before_crop=list(shape),
                        shape_after_crop=list(shape), foreground_sample=[], foreground_voxels=1000, source=[])
        for i in range(cases)], foreground_intensity=dict(FOREGROUND))


ISOTROPIC_1MM = fingerprint([300, 300, 300], [1.0, 1.0, 1.0])
CLINICAL = fingerprint([120, 400, 400], [2.5, 0.8, 0.8])
DESCRIPTION = covid_description("devices", 10)


def network_cost(network) -> tuple:
    return (network.parameter_count(), sum(network.n_blocks_per_stage))


def size_rank(network) -> int:
    """How far down rules.CPU_NETWORK_SIZES (largest first) the plan's network is: larger = smaller network."""
    stages = network.n_stages
    ranks = [i for i, size in enumerate(rules.CPU_NETWORK_SIZES)
             if (tuple(size.features(stages)), tuple(size.blocks(stages)))
             == (network.features_per_stage, network.n_blocks_per_stage)]
    assert len(ranks) == 1
    return ranks[0]


def test_cuda_plan_of_1mm_isotropic_data_at_8_gb_reaches_128_cubed_at_batch_2():
    plan = make_plan(ISOTROPIC_1MM, DESCRIPTION, gpu_memory_gb=8, device="cuda")
    assert plan.device == "cuda" and plan.mixed_precision
    assert all(size >= 128 for size in plan.patch_size) and plan.batch_size >= 2
    assert plan.estimated_memory_gb <= 8
    assert estimate_training_memory_bytes(plan.patch_size, plan.batch_size, plan.network, amp=True) <= 8 * GIB
    assert plan.limited_by == "memory" and "memory" in plan.reasons["patch_size"]
    assert "AMP" in plan.reasons["patch_size"] and "memory is the budget" in plan.reasons["device"]
    assert plan.network.features_per_stage[:2] == (32, 64) and plan.network.n_blocks_per_stage[:4] == (1, 3, 4, 6)
    assert plan.seconds_per_iteration is None and plan.estimated_seconds_per_iteration is None


def test_amp_memory_model_gives_bigger_patches_than_float32():
    amp, _ = rules.choose_patch_and_network([1.0, 1.0, 1.0], [300.0] * 3, 8 * GIB, 1, 4, amp=True)
    fp32, network = rules.choose_patch_and_network([1.0, 1.0, 1.0], [300.0] * 3, 8 * GIB, 1, 4)
    assert math.prod(amp.value) > math.prod(fp32.value)
    assert estimate_training_memory_bytes(amp.value, 2, network, amp=True) < estimate_training_memory_bytes(
        amp.value, 2, network)


@pytest.mark.parametrize("data", [ISOTROPIC_1MM, CLINICAL], ids=["isotropic", "clinical"])
def test_cpu_plan_fits_the_time_budget_by_the_cost_model(data):
    plan = make_plan(data, DESCRIPTION, gpu_memory_gb=8, device="cpu", seconds_per_iteration=1.0)
    assert plan.device == "cpu" and not plan.mixed_precision and plan.batch_size == 2
    estimate = cpu_time.estimate_iteration(plan.patch_size, plan.batch_size, plan.network)
    assert estimate.seconds == pytest.approx(plan.estimated_seconds_per_iteration, rel=1e-3)
    assert estimate.seconds <= plan.seconds_per_iteration == 1.0
    # the data pipeline's share is part of the promise, and the table says what each part costs
    assert 0 < estimate.loader and estimate.network < estimate.seconds
    assert f"augmentation {estimate.loader:.2f} s" in plan.reasons["time_per_iteration"]
    assert plan.network.patch_is_valid(plan.patch_size)
    assert plan.limited_by == "time" and "time is the budget" in plan.reasons["device"]
    assert "CPU plan" in plan.reasons["patch_size"] and "≤ budget 1 s" in plan.reasons["patch_size"]
    assert "CPU plan" in plan.reasons["network"]
    # A useful patch, not a sliver: the rule keeps ≥ CPU_MIN_PATCH_VOXELS by shrinking the network first.
    assert math.prod(plan.patch_size) >= rules.CPU_MIN_PATCH_VOXELS
    # The GPU-sized network would not fit: on a 2-core CPU time, not memory, decides.
    gpu = make_plan(data, DESCRIPTION, gpu_memory_gb=8, device="cuda")
    assert cpu_time.estimate_seconds_per_iteration(gpu.patch_size, 2, gpu.network) > 1.0


def test_cpu_plan_shrinks_with_the_budget_and_never_grows_when_it_shrinks():
    budgets = [0.25, 0.5, 1.0, 2.0, 4.0, 16.0]
    plans = [make_plan(CLINICAL, DESCRIPTION, device="cpu", seconds_per_iteration=b) for b in budgets]
    for smaller, larger in zip(plans, plans[1:]):
        assert size_rank(larger.network) <= size_rank(smaller.network)       # never a smaller network
        if size_rank(larger.network) == size_rank(smaller.network):           # same size: never a smaller patch
            assert all(a >= b for a, b in zip(larger.patch_size, smaller.patch_size))
    assert size_rank(plans[0].network) > size_rank(plans[-1].network)
    assert network_cost(plans[0].network) < network_cost(plans[-1].network)
    assert math.prod(plans[0].patch_size) <= math.prod(plans[-1].patch_size)
    for budget, plan in zip(budgets, plans):
        assert plan.estimated_seconds_per_iteration <= budget


def test_cpu_plan_is_deterministic():
    first = make_plan(CLINICAL, DESCRIPTION, device="cpu", seconds_per_iteration=0.8)
    second = make_plan(CLINICAL, DESCRIPTION, device="cpu", seconds_per_iteration=0.8)
    assert first.to_json() == second.to_json()


def test_cpu_time_scale_from_a_measurement_shrinks_the_plan_on_a_slower_machine():
    here = make_plan(CLINICAL, DESCRIPTION, device="cpu", seconds_per_iteration=1.0)
    slower = make_plan(CLINICAL, DESCRIPTION, device="cpu", seconds_per_iteration=1.0,
                       machine=cpu_time.CALIBRATION_MACHINE.rescaled(3.0))
    assert (size_rank(slower.network) > size_rank(here.network)
            or math.prod(slower.patch_size) < math.prod(here.patch_size))
    assert slower.estimated_seconds_per_iteration <= 1.0 and "measured" in slower.reasons["time_per_iteration"]


def test_augmentation_in_the_training_process_or_on_shared_cores_costs_iteration_time():
    network, loader = 0.8, 0.4
    assert cpu_time.iteration_seconds(network, loader, workers=0, cores=2) == pytest.approx(1.2)   # one after the other
    assert cpu_time.iteration_seconds(network, loader, workers=1, cores=2) == pytest.approx(1.0)   # its CPU share
    assert cpu_time.iteration_seconds(network, loader, workers=3, cores=16) == pytest.approx(0.825)
    assert cpu_time.iteration_seconds(0.1, 0.5, workers=1, cores=16) == pytest.approx(0.5)          # loader-bound
    patch, network = [48, 64, 64], rules.network_topology([1.0] * 3, [48, 64, 64], 1, 4, rules.CPU_NETWORK_SIZES[4])
    in_process = cpu_time.estimate_iteration(patch, 2, network, cpu_time.CpuMachine(cores=2, workers=0))
    one_worker = cpu_time.estimate_iteration(patch, 2, network, cpu_time.CpuMachine(cores=2, workers=1))
    many_cores = cpu_time.estimate_iteration(patch, 2, network, cpu_time.CpuMachine(cores=16, workers=12))
    assert in_process.seconds > one_worker.seconds > many_cores.seconds > in_process.network
    # the loader's cost grows with the patch
    assert cpu_time.estimate_loader_seconds([48, 64, 64], 2) > cpu_time.estimate_loader_seconds([32, 64, 64], 2)


def test_cpu_cost_model_grows_with_patch_width_and_blocks():
    small = rules.network_topology([1.0, 1.0, 1.0], [64, 64, 64], 1, 4, rules.CPU_NETWORK_SIZES[-1])
    wide = rules.network_topology([1.0, 1.0, 1.0], [64, 64, 64], 1, 4, rules.CPU_NETWORK_SIZES[0])
    seconds = cpu_time.estimate_seconds_per_iteration
    assert seconds([64, 64, 64], 2, small) < seconds([64, 64, 64], 2, wide)
    assert seconds([32, 64, 64], 2, small) < seconds([64, 64, 64], 2, small) < seconds([64, 64, 64], 4, small)
    # MACs: one 3×3×3 conv from 1 to 8 channels over 64³ voxels is the stem's share exactly
    assert cpu_time.forward_macs([64, 64, 64], small) > 27 * 8 * 64 ** 3
    assert cpu_time.training_macs([64, 64, 64], small) == 3 * cpu_time.forward_macs([64, 64, 64], small)


def test_network_sizes_for_cpu_plans_shrink_monotonically():
    costs = [network_cost(rules.network_topology([1.0, 1.0, 1.0], [64, 64, 64], 1, 4, size))
             for size in rules.CPU_NETWORK_SIZES]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
    assert rules.CPU_NETWORK_SIZES[0] == rules.RESENC_M


def test_an_impossible_cpu_budget_is_a_clear_error():
    with pytest.raises(CovnetError, match="seconds-per-iteration"):
        make_plan(CLINICAL, DESCRIPTION, device="cpu", seconds_per_iteration=1e-6)
    with pytest.raises(CovnetError, match="--device"):
        make_plan(CLINICAL, DESCRIPTION, device="tpu")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_plans_json_round_trips_the_device_fields(tmp_path, device):
    plan = make_plan(CLINICAL, DESCRIPTION, device=device, seconds_per_iteration=0.5)
    plan.save(tmp_path / "plans.json")
    loaded = Plan.load(tmp_path / "plans.json")
    assert loaded.to_json() == plan.to_json()
    saved = json.loads((tmp_path / "plans.json").read_text())
    assert saved["device"] == device and saved["version"] == PLANS_VERSION
    assert saved["mixed_precision"] == (device == "cuda")
    assert (saved["seconds_per_iteration"] == 0.5) == (device == "cpu")
    table = plan.table()
    assert f"{device}, {'AMP' if device == 'cuda' else 'float32'}" in table and "limited by" in table
    assert ("time per iteration" in table) == (device == "cpu")


def test_old_plans_are_refused_clearly_but_keep_their_preprocessing_key(tmp_path):
    plan = make_plan(CLINICAL, DESCRIPTION)
    old = plan.to_json()
    for name in ("device", "mixed_precision", "limited_by", "seconds_per_iteration",
                 "estimated_seconds_per_iteration"):
        old.pop(name)
    old["version"] = 1
    (tmp_path / "plans.json").write_text(json.dumps(old))
    with pytest.raises(CovnetError, match="plans version 1 is not .*re-run covnet_plan_and_preprocess"):
        Plan.load(tmp_path / "plans.json")
    # The preprocessing key does not follow the plan format: preprocessed cases stay valid.
    assert plan.preprocessing_key()["version"] == PREPROCESSING_VERSION
    cpu = make_plan(CLINICAL, DESCRIPTION, device="cpu")
    assert cpu.preprocessing_key() == plan.preprocessing_key()


def test_a_cpu_plan_needs_its_time_budget():
    data = make_plan(CLINICAL, DESCRIPTION, device="cpu").to_json()
    data["seconds_per_iteration"] = None
    with pytest.raises(CovnetError, match="seconds_per_iteration"):
        Plan.from_json(data)


def test_cli_device_cpu_writes_a_cpu_plan(tiny_workspace, tmp_path, capsys):
    code = plan_and_preprocess.main(["--workspace", str(tmp_path), "--device", "cpu", "--seconds-per-iteration",
                                     "0.5", "--plan-only", "-np", "1", "--no-measure-cpu-time"])
    assert code == 0
    plan = Plan.load(Workspace(tmp_path).plans_json)
    assert plan.device == "cpu" and plan.seconds_per_iteration == 0.5
    assert plan.estimated_seconds_per_iteration <= 0.5 and plan.measured_seconds_per_iteration is None
    output = capsys.readouterr().out
    # the plan trains in bfloat16 where this CPU computes it natively, and says so
    precision = "bfloat16" if cpu_has_native_bfloat16() else "float32"
    assert plan.mixed_precision == cpu_has_native_bfloat16() and precision in plan.reasons["device"]
    assert f"cpu, {precision}" in output and "time per iteration" in output and "measured" not in output


def test_a_measured_cpu_plan_records_the_timing_of_its_own_iteration():
    """The measuring path on a plan whose iteration takes a fraction of a second: data whose median case is
    8×16×16 voxels caps the patch there, so the timing cannot change the network or the patch."""
    tiny = fingerprint([8, 16, 16], [1.0, 1.0, 1.0])
    machine = planner.this_machine()
    plan = planner.measured_cpu_plan(tiny, DESCRIPTION, planner.PlanRequest("cpu", 8.0, 30.0), machine)
    model = make_plan(tiny, DESCRIPTION, device="cpu", seconds_per_iteration=30.0, machine=machine)
    assert (plan.patch_size, plan.network) == (model.patch_size, model.network) and plan.patch_size == [8, 16, 16]
    assert plan.measured_seconds_per_iteration > 0
    # the model is rescaled to the measurement, so the plan's estimate of its own iteration is what was measured
    assert plan.estimated_seconds_per_iteration == pytest.approx(plan.measured_seconds_per_iteration, rel=0.01)
    assert "measured on this machine" in plan.reasons["time_per_iteration"]
    assert f"measured here: {plan.measured_seconds_per_iteration:.2f} s" in plan.reasons["time_per_iteration"]
    assert f"measured {plan.measured_seconds_per_iteration:.2f} s" in plan.table()
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))).measured_seconds_per_iteration == \
        plan.measured_seconds_per_iteration


def test_timing_an_iteration_with_augmentation_workers_leaves_no_process_behind():
    import multiprocessing

    from covnet.network.topology import Topology
    from covnet.planning.cpu_measure import measure_training_iteration

    topology = Topology(in_channels=1, num_classes=4, features_per_stage=(4, 8), kernel_sizes=((3, 3, 3),) * 2,
                        strides=((1, 1, 1), (2, 2, 2)), n_blocks_per_stage=(1, 1), n_conv_per_stage_decoder=(1,))
    timing = measure_training_iteration(topology, [16, 16, 16], 2, workers=2, lateral_pairs=[[1, 2]])
    assert timing.workers == 2 and timing.seconds > 0 and timing.loader_seconds > 0
    assert 0 <= timing.data_wait_share <= 1
    assert multiprocessing.active_children() == []


def test_cpu_time_model_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, covnet.planning.cpu_time, covnet.planning.rules; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("device_flags, whose", [(["--device", "cuda"], "--device"), ([], "the default")])
def test_a_time_budget_for_a_gpu_plan_is_refused(tiny_workspace, tmp_path, capsys, device_flags, whose):
    code = run_command("covnet_plan_and_preprocess", plan_and_preprocess.main,
                       ["--workspace", str(tmp_path), *device_flags, "--seconds-per-iteration", "5", "--plan-only",
                        "-np", "1"])
    error = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and error == ["covnet_plan_and_preprocess: error: --seconds-per-iteration 5: only a CPU plan "
                                   f"has a time budget, and this one is for cuda ({whose}); add --device cpu"]
    assert not Workspace(tmp_path).plans_json.exists()


def test_measuring_the_cpu_time_of_a_gpu_plan_is_a_warning(tiny_workspace, tmp_path, capsys):
    assert plan_and_preprocess.main(["--workspace", str(tmp_path), "--device", "cuda", "--measure-cpu-time",
                                     "--plan-only", "-np", "1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: --measure-cpu-time is ignored: only a CPU plan is timed, and this one is for cuda "
                        "(sized by memory)"]
    assert Plan.load(Workspace(tmp_path).plans_json).device == "cuda"


def test_zero_worker_processes_are_refused(tiny_workspace, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_and_preprocess.main(["--workspace", str(tmp_path), "-np", "0"])
    assert exit_info.value.code == 2 and "-np/--num-processes: must be ≥ 1, not 0" in capsys.readouterr().err
    assert not Workspace(tmp_path).plans_json.exists()


# ------------------------------------------------------------------------------------------------ bfloat16 on a CPU
BFLOAT16_MACHINE = cpu_time.CpuMachine(cores=cpu_time.CALIBRATION_THREADS, workers=1, bfloat16=True)


def test_the_time_model_applies_the_bfloat16_factor_to_the_network_only(monkeypatch):
    monkeypatch.setattr(cpu_time, "BFLOAT16_NETWORK_FACTOR", 0.5)
    patch, network = [48, 64, 64], rules.network_topology([1.0] * 3, [48, 64, 64], 1, 4, rules.CPU_NETWORK_SIZES[4])
    float32 = cpu_time.estimate_iteration(patch, 2, network, cpu_time.CpuMachine(cores=2, workers=0))
    bfloat16 = cpu_time.estimate_iteration(patch, 2, network, cpu_time.CpuMachine(cores=2, workers=0, bfloat16=True))
    assert bfloat16.network == pytest.approx(0.5 * float32.network)
    assert bfloat16.loader == float32.loader
    assert bfloat16.seconds == pytest.approx(0.5 * float32.network + float32.loader)


def test_the_calibrated_bfloat16_factor_makes_the_network_cheaper():
    assert 0 < cpu_time.BFLOAT16_NETWORK_FACTOR < 1


def test_a_bfloat16_cpu_plan_records_its_precision_and_grows_within_the_same_budget():
    float32 = make_plan(CLINICAL, DESCRIPTION, device="cpu", seconds_per_iteration=1.0)
    bfloat16 = make_plan(CLINICAL, DESCRIPTION, device="cpu", seconds_per_iteration=1.0, machine=BFLOAT16_MACHINE)
    assert not float32.mixed_precision and bfloat16.mixed_precision
    assert "float32" in float32.reasons["device"] and "bfloat16" in bfloat16.reasons["device"]
    assert "bfloat16 network" in bfloat16.reasons["time_per_iteration"]
    assert "cpu, bfloat16" in bfloat16.table() and "bfloat16 activations" in bfloat16.table()
    assert bfloat16.estimated_seconds_per_iteration <= 1.0
    assert (size_rank(bfloat16.network) < size_rank(float32.network)
            or math.prod(bfloat16.patch_size) > math.prod(float32.patch_size))
    # the memory estimate is the mixed-precision model's
    assert bfloat16.estimated_memory_gb == pytest.approx(estimate_training_memory_bytes(
        bfloat16.patch_size, 2, bfloat16.network, amp=True) / GIB, abs=1e-3)
    assert Plan.from_json(json.loads(json.dumps(bfloat16.to_json()))).mixed_precision


def test_the_planning_machine_trains_in_bfloat16_where_its_cpu_computes_it():
    assert planner.this_machine().bfloat16 == cpu_has_native_bfloat16()


@pytest.mark.parametrize("bfloat16", [False, True])
def test_the_planner_times_the_precision_it_plans_for(monkeypatch, bfloat16):
    from covnet.planning import cpu_measure

    asked = []

    def measure(topology, patch_size, batch_size, **options):
        asked.append(options["bfloat16"])
        return cpu_measure.IterationTiming(seconds=0.5, loader_seconds=0.01, data_wait_share=0.0, workers=1)

    monkeypatch.setattr(cpu_measure, "measure_training_iteration", measure)
    machine = BFLOAT16_MACHINE if bfloat16 else cpu_time.CALIBRATION_MACHINE
    plan = planner.measured_cpu_plan(CLINICAL, DESCRIPTION, planner.PlanRequest("cpu", 8.0, 1.0), machine)
    assert plan.mixed_precision == bfloat16 and asked and set(asked) == {bfloat16}
    assert f"({'bfloat16' if bfloat16 else 'float32'}) with 1 worker" in plan.reasons["time_per_iteration"]


@pytest.mark.skipif(not cpu_has_native_bfloat16(), reason="this CPU has neither AMX nor AVX512-BF16")
def test_timing_an_iteration_runs_training_in_the_precision_asked_for(monkeypatch):
    from covnet.network.topology import Topology
    from covnet.planning.cpu_measure import measure_training_iteration
    from covnet.training import loop

    real, asked = loop.train_epoch, []

    def spy(*args, mixed_precision, **options):
        asked.append(mixed_precision)
        return real(*args, mixed_precision=mixed_precision, **options)

    monkeypatch.setattr(loop, "train_epoch", spy)
    topology = Topology(in_channels=1, num_classes=4, features_per_stage=(4, 8), kernel_sizes=((3, 3, 3),) * 2,
                        strides=((1, 1, 1), (2, 2, 2)), n_blocks_per_stage=(1, 1), n_conv_per_stage_decoder=(1,))
    for bfloat16 in (True, False):
        asked.clear()
        assert measure_training_iteration(topology, [16, 16, 16], 2, workers=0, bfloat16=bfloat16).seconds > 0
        assert asked and set(asked) == {bfloat16}
