"""The CPUs this process may use: the one count that sizes every worker pool, thread count and CPU plan.

``os.cpu_count()`` counts the host's cores. In a container, under Slurm or under ``taskset``, a process may use
fewer: the CPUs its affinity mask allows, and, where a cgroup sets a CPU quota (``docker --cpus 2``, Kubernetes
CPU limits), as many CPUs as the quota buys per period. The usable count is the smaller of the two, at least 1.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpu_count(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs this process may use: its scheduler affinity, capped by its cgroup's CPU quota (if any)."""
    quota = cgroup_cpu_quota(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)
    return max(1, min(scheduler_cpu_count(), quota if quota is not None else math.inf))


def scheduler_cpu_count() -> int:
    """The CPUs the scheduler lets this process run on (its affinity mask), else the host's."""
    if hasattr(os, "process_cpu_count"):            # Python 3.13+
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def cgroup_cpu_quota(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The CPUs the cgroup quota of this process (and of the cgroups above it) allows, rounded up; None where
    no quota is set or the cgroup files cannot be read (no cgroups: not Linux, or not mounted)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":                       # cgroup v2 (unified)
            limits += [_v2_quota(folder) for folder in _folders(cgroup_root, path)]
        elif "cpu" in controllers.split(","):       # cgroup v1: the hierarchy holding the cpu controller
            mount = _v1_mount(cgroup_root, controllers)
            limits += [_v1_quota(folder) for folder in _folders(mount, path)] if mount else []
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _v1_mount(cgroup_root: Path, controllers: str) -> Path | None:
    """Where the v1 hierarchy of ``controllers`` (e.g. ``cpu,cpuacct``) is mounted, or its ``cpu`` link."""
    return next((cgroup_root / name for name in (controllers, "cpu") if (cgroup_root / name).is_dir()), None)


def _folders(mount: Path, path: str) -> list[Path]:
    """This process's cgroup folder under ``mount`` and those above it, up to ``mount``. Inside a container
    (its own cgroup namespace, or the host's path not mounted) the path may not exist: then only ``mount``."""
    folder = mount / path.strip("/")
    if ".." in Path(path).parts or not folder.is_dir():
        return [mount]
    folders = [folder]
    while folder != mount and mount in folder.parents:
        folder = folder.parent
        folders.append(folder)
    return folders


def _ceil_ratio(quota: int, period: int) -> int | None:
    return math.ceil(quota / period) if quota > 0 and period > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _v2_quota(folder: Path) -> int | None:
    """``cpu.max`` holds "<quota> <period>" in microseconds, or "max <period>" for no quota."""
    text = _read(folder / "cpu.max")
    parts = text.split() if text else []
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        return _ceil_ratio(int(parts[0]), int(parts[1]))
    except ValueError:
        return None


def _v1_quota(folder: Path) -> int | None:
    """``cpu.cfs_quota_us`` (-1: no quota) over ``cpu.cfs_period_us``."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        return _ceil_ratio(int(quota), int(period)) if quota and period else None
    except ValueError:
        return None


def limit_torch_threads() -> int | None:
    """Cap torch's intra-op threads at the usable CPUs: torch counts the host's cores or the affinity mask but
    never a cgroup quota, and more threads than CPUs make every OpenMP product wait for descheduled threads. A
    lower setting (``OMP_NUM_THREADS``, torchrun's one per rank) is kept. A process that has not loaded torch
    is left alone (and not made to load it). Returns torch's thread count, or None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    threads = min(torch.get_num_threads(), usable_cpu_count())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
