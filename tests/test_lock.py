"""The lock that `make test` and `make demo` install from agrees with what covnet declares: every requirement of
pyproject.toml (and of the extras the Makefile installs) is pinned in requirements.lock at a version it admits,
every pin is hash-checked, and this venv holds exactly the locked versions (a stale venv tests the wrong thing)."""
from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the lock is for Python 3.11
    tomllib = pytest.importorskip("tomli")

REPOSITORY = Path(__file__).resolve().parents[1]
LOCK = REPOSITORY / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+) \\$")


def locked() -> dict[str, tuple[Version, list[str]]]:
    """Name -> (pinned version, its hashes), from the lock's `name==version \\` lines and the `--hash` lines after."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    name = None
    for line in LOCK.read_text().splitlines():
        if match := PIN.match(line):
            name = canonicalize_name(match.group(1))
            pins[name] = (Version(match.group(2)), [])
        elif name and line.strip().startswith("--hash=sha256:"):
            pins[name][1].append(line.strip().removeprefix("--hash=sha256:").rstrip(" \\"))
        elif not line.startswith(" "):
            name = None
    return pins


def installed_extras() -> list[str]:
    """The extras the Makefile's venv installs: those named in `make lock`'s --extra options."""
    makefile = (REPOSITORY / "Makefile").read_text()
    return re.findall(r"--extra (\w+)", makefile)


def declared() -> list[Requirement]:
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    extras = installed_extras()
    assert set(extras) <= set(project["optional-dependencies"]), extras
    return [Requirement(text) for text in
            [*project["dependencies"], *(r for extra in extras for r in project["optional-dependencies"][extra])]]


def test_the_makefile_installs_the_lock_with_hashes():
    makefile = (REPOSITORY / "Makefile").read_text()
    assert "--require-hashes" in makefile and "-r $(LOCK)" in makefile
    assert set(installed_extras()) == {"test", "openvino"}


def test_every_declared_requirement_is_satisfied_by_the_lock():
    pins = locked()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {LOCK.name}: run make lock"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), \
            f"{LOCK.name} pins {name}=={version}, which pyproject.toml's {requirement} excludes: run make lock"


def test_every_pin_is_hash_checked_and_torch_is_the_cpu_build():
    pins = locked()
    assert len(pins) > 20
    for name, (_, hashes) in pins.items():
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in hashes), name
    assert pins["torch"][0].local == "cpu"
    for line in (REPOSITORY / "requirements" / "lock.in").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)][0]), line


def test_this_venv_holds_the_locked_versions():
    if not Path(sys.prefix, ".installed").is_file():
        pytest.skip("not the venv that the Makefile builds from the lock (make test-latest, or another venv)")
    for name, (version, _) in locked().items():
        try:
            assert Version(importlib.metadata.version(name)) == version, name
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name}=={version} is locked but not installed: rebuild the venv (rm -r .venv; make venv)")
