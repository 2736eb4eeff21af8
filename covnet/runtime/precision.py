"""Where mixed precision pays: the one rule that training, prediction and CPU planning share.

Under ``torch.autocast`` a CUDA device computes in float16 and a CPU in bfloat16 (torch's default autocast
dtypes). A CPU computes bfloat16 natively only with AMX or AVX512-BF16; elsewhere oneDNN emulates it, which is
slower than float32, so autocast stays off on such CPUs. Torch-free: the planner asks too.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16, read from /proc/cpuinfo)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", cpuinfo) is not None


def autocast_available(device) -> bool:
    """Mixed precision on ``device`` (a ``torch.device`` or its name): float16 on CUDA, bfloat16 on CPUs that
    compute it natively."""
    kind = getattr(device, "type", str(device).split(":")[0])
    return kind == "cuda" or (kind == "cpu" and cpu_has_native_bfloat16())


def autocast_dtype_name(device) -> str:
    """What autocast computes in on ``device``: "float16" (CUDA) or "bfloat16" (CPU)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    return "float16" if kind == "cuda" else "bfloat16"
