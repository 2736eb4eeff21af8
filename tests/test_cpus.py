"""The CPUs covnet may use: the affinity mask and the cgroup CPU quota (v1 and v2, read from fake cgroup trees),
and every worker count and CPU plan following them (a real run under ``taskset``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from kit.faults import SCRIPTS, TIMEOUT

from covnet.planning import planner
from covnet.runtime import cpus
from covnet.runtime.cpus import cgroup_cpu_quota, limit_torch_threads, scheduler_cpu_count, usable_cpu_count
from covnet.training.settings import MAX_DEFAULT_WORKERS, TrainingSettings
from covnet.workspace import Workspace


def fake_cgroups(tmp_path, proc_lines: list[str], files: dict[str, str]) -> dict:
    """A cgroup tree under tmp_path/cgroup with ``files`` (relative path: content), and a /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(content)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    return {"cgroup_root": root, "proc_cgroup": proc}


V2 = ["0::/user.slice/job.scope"]


@pytest.mark.parametrize("cpu_max, expected", [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1),
                                               ("max 100000", None), ("", None), ("garbage", None)])
def test_cgroup_v2_quota_is_rounded_up_and_max_means_none(tmp_path, cpu_max, expected):
    paths = fake_cgroups(tmp_path, V2, {"user.slice/job.scope/cpu.max": cpu_max})
    assert cgroup_cpu_quota(**paths) == expected


def test_cgroup_v2_the_tightest_quota_on_the_way_up_counts(tmp_path):
    paths = fake_cgroups(tmp_path, V2, {"cpu.max": "max 100000", "user.slice/cpu.max": "300000 100000",
                                        "user.slice/job.scope/cpu.max": "max 100000"})
    assert cgroup_cpu_quota(**paths) == 3


def test_cgroup_v2_in_a_container_whose_path_is_not_mounted_reads_the_root(tmp_path):
    paths = fake_cgroups(tmp_path, ["0::/docker/0123abcd"], {"cpu.max": "400000 100000"})
    assert cgroup_cpu_quota(**paths) == 4


@pytest.mark.parametrize("quota, period, expected", [("50000", "100000", 1), ("250000", "100000", 3),
                                                     ("-1", "100000", None), ("100000", "0", None)])
def test_cgroup_v1_quota_over_period(tmp_path, quota, period, expected):
    paths = fake_cgroups(tmp_path, ["4:memory:/job", "3:cpu,cpuacct:/job", "0::/"],
                         {"cpu,cpuacct/job/cpu.cfs_quota_us": quota, "cpu,cpuacct/job/cpu.cfs_period_us": period})
    assert cgroup_cpu_quota(**paths) == expected


def test_cgroup_v1_through_the_cpu_link(tmp_path):
    paths = fake_cgroups(tmp_path, ["2:cpuacct,cpu:/"], {"cpu/cpu.cfs_quota_us": "200000",
                                                         "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_quota(**paths) == 2


def test_missing_cgroup_files_mean_no_quota(tmp_path):
    assert cgroup_cpu_quota(**fake_cgroups(tmp_path, V2 + ["3:cpu,cpuacct:/job"], {})) is None
    assert cgroup_cpu_quota(cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "no_proc_file") is None
    assert usable_cpu_count(cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "no_proc_file") \
        == scheduler_cpu_count()


def test_the_usable_count_is_the_smaller_of_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "scheduler_cpu_count", lambda: 64)
    assert usable_cpu_count(**fake_cgroups(tmp_path, V2, {"cpu.max": "200000 100000"})) == 2
    monkeypatch.setattr(cpus, "scheduler_cpu_count", lambda: 3)
    assert usable_cpu_count(**fake_cgroups(tmp_path / "b", V2, {"cpu.max": "800000 100000"})) == 3


def test_the_scheduler_count_is_the_affinity_mask():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity here")
    assert scheduler_cpu_count() == len(os.sched_getaffinity(0))


def test_worker_counts_and_the_cpu_plan_ask_for_the_usable_cpus(monkeypatch):
    for module in ("covnet.training.settings", "covnet.planning.planner"):
        monkeypatch.setattr(f"{module}.usable_cpu_count", lambda: 5)
    assert TrainingSettings().data_workers == 4
    assert planner.this_machine().cores == 5 and planner.this_machine().workers == 4
    monkeypatch.setattr("covnet.training.settings.usable_cpu_count", lambda: 64)
    assert TrainingSettings().data_workers == MAX_DEFAULT_WORKERS
    monkeypatch.setattr("covnet.training.settings.usable_cpu_count", lambda: 1)
    assert TrainingSettings().data_workers == 1


def test_torch_threads_are_capped_at_the_usable_cpus(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(cpus, "usable_cpu_count", lambda: 2)
        assert limit_torch_threads() == 2 and torch.get_num_threads() == 2
        torch.set_num_threads(1)      # a lower setting (OMP_NUM_THREADS, torchrun) is kept
        assert limit_torch_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def one_cpu_prefix() -> list[str]:
    taskset = shutil.which("taskset")
    if taskset is None or not hasattr(os, "sched_getaffinity"):
        pytest.skip("taskset is not installed here")
    return [taskset, "-c", str(min(os.sched_getaffinity(0)))]


def test_on_one_cpu_the_plan_and_the_workers_say_one_cpu(tiny_workspace, tmp_path):
    """Under ``taskset`` (one CPU of however many the host has) the CPU plan is timed for 1 core and training
    starts 1 augmentation worker; before, both counted the host's cores."""
    prefix = one_cpu_prefix()
    result = subprocess.run([*prefix, str(SCRIPTS / "covnet_plan_and_preprocess"), "--workspace", str(tmp_path),
                             "--device", "cpu", "--plan-only", "-np", "1", "--no-measure-cpu-time"],
                            capture_output=True, text=True, encoding="utf-8", timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    reasons = json.loads(Workspace(tmp_path).plans_json.read_text())["reasons"]
    assert "1 core, 1 augmentation worker" in reasons["time_per_iteration"], reasons["time_per_iteration"]
    probe = ("import torch\nfrom covnet.cli.common import run_command\n"
             "from covnet.training.settings import TrainingSettings\n"
             "run_command('probe', lambda argv: print(TrainingSettings().data_workers, torch.get_num_threads()))")
    counts = subprocess.run([*prefix, sys.executable, "-c", probe], capture_output=True, text=True,
                            encoding="utf-8", timeout=TIMEOUT)
    assert counts.returncode == 0, counts.stderr[-3000:]
    assert counts.stdout.split() == ["1", "1"]
