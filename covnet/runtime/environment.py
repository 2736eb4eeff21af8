"""The software that produced a result, recorded beside it (plans.json, checkpoints, a prediction folder's
``.run.json``) so that the result can be reproduced: covnet's version and the versions of the libraries whose
numerics it depends on."""
from __future__ import annotations

import importlib.metadata
import platform

from covnet import __version__

# Distribution names whose releases change covnet's numbers: the network's arithmetic, image I/O and resampling,
# and the array maths around them.
RECORDED = ("torch", "SimpleITK", "numpy")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_record(*, openvino: bool = False) -> dict[str, str | None]:
    """covnet's, Python's and each recorded library's version (None where one is not installed); OpenVINO's too
    where the result used it. Read from the installed packages' metadata: nothing is imported."""
    record: dict[str, str | None] = {"covnet": __version__, "python": platform.python_version()}
    record.update({name: _version(name) for name in RECORDED})
    if openvino:
        record["openvino"] = _version("openvino")
    return record
