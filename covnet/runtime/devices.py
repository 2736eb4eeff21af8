"""``--device``: the one place that turns the flag of every command into a ``torch.device``, or into a one-line
error saying what to choose."""
from __future__ import annotations

import re

import torch

from covnet.runtime.errors import CovnetError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` with N below the number of
    CUDA devices; anything else, or CUDA where there is none, is a ``CovnetError``."""
    text = str(name).strip().lower()
    match = _DEVICE.fullmatch(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise CovnetError(None, f"--device {name}: choose {DEVICE_CHOICES}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CovnetError(None, f"--device {name}: no CUDA device is available here; use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise CovnetError(None, f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                                f"cuda:{count - 1}")
    return torch.device(text)
