"""What the fault-injection tests share: running a command (plainly, crashing, without write permission),
finding its processes, and comparing the outputs of a killed-and-rerun job with an uninterrupted one."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(sys.executable).parent
CRASH_DRIVER = Path(__file__).with_name("crash_driver.py")
# A guard against a hung command, not a speed target: a short training took over 120 s on a 2-core machine
# whose cores were busy with other jobs.
TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command: str, *args, prefix: tuple = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, str(SCRIPTS / command), *map(str, args)], capture_output=True, text=True, encoding="utf-8",
                          timeout=TIMEOUT)


def run_ok(command: str, *args) -> subprocess.CompletedProcess:
    result = run(command, *args)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def run_crashing(rule: str, command: str, *args) -> tuple[subprocess.CompletedProcess, int]:
    """Run under the crash driver in a new process group; return the result and the group id."""
    process = subprocess.Popen([sys.executable, str(CRASH_DRIVER), rule, command, *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", start_new_session=True)
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == -signal.SIGKILL, f"expected a SIGKILL, got {result.returncode}:\n{stderr}"
    return result, process.pid


def _running_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every running process (zombies, which nobody may reap, left out)."""
    processes = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            processes.append((int(entry.name), int(fields[1]), int(fields[2])))
    return processes


def live_processes_in_group(group: int) -> list[int]:
    return [pid for pid, _, process_group in _running_processes() if process_group == group]


def children_of(parent: int) -> list[int]:
    return [pid for pid, parent_pid, _ in _running_processes() if parent_pid == parent]


def assert_no_orphans(group: int, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while live_processes_in_group(group):
        if time.monotonic() > deadline:
            leftovers = live_processes_in_group(group)
            for pid in leftovers:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"worker processes {leftovers} outlived their killed parent")
        time.sleep(0.05)


def temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob(".tmp-*"))


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stderr}"
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path, ignore_json_keys: tuple = ()) -> dict[str, str]:
    """Relative path → content digest of every file under ``root`` but locks; JSON compared without
    ``ignore_json_keys``."""
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts):
        content = path.read_bytes()
        if path.suffix == ".json" and ignore_json_keys:
            data = json.loads(content)
            if isinstance(data, dict):
                content = json.dumps({k: v for k, v in data.items() if k not in ignore_json_keys},
                                     sort_keys=True).encode()
        digests[str(path.relative_to(root))] = hashlib.sha256(content).hexdigest()
    return digests


def copy_tree(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination, symlinks=True)  # copy2 keeps sizes and times: raw stamps match
    return destination


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def without_write_permission() -> tuple:
    """A command prefix under which even root obeys file permissions (root ignores them otherwise)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot take away write permission")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search")


def make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)


def make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)


def run_without_write_permission(root: Path, command: str, *args) -> subprocess.CompletedProcess:
    """Run ``command`` while no folder under ``root`` is writable (restored afterwards)."""
    prefix = without_write_permission()
    make_read_only(root)
    try:
        return run(command, *args, prefix=prefix)
    finally:
        make_writable(root)


def wait_for_lock_holder(lock: Path, process: subprocess.Popen, seconds: float = 30.0) -> None:
    """Until ``process`` has written its pid into ``lock`` (it holds the lock from then on)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == process.pid:
                return
        except (OSError, json.JSONDecodeError):
            pass
        assert process.poll() is None, "the first run ended before it took the lock"
        time.sleep(0.01)
    pytest.fail("the first run never took the lock")


def assert_second_run_refused(command: str, lock: Path, first_args: list, second_args: list) -> None:
    """Start ``command`` and freeze it (SIGSTOP) once it holds the workspace lock; a second run must say the
    workspace is busy and by which process; the first then finishes normally."""
    first = subprocess.Popen([str(SCRIPTS / command), *map(str, first_args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, encoding="utf-8")
    try:
        wait_for_lock_holder(lock, first)
        first.send_signal(signal.SIGSTOP)
        second = run(command, *second_args)
        assert_one_line_error(second, "is busy", command, f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, stderr
