"""CT intensities as every importer stores them: int16 Hounsfield units."""
from __future__ import annotations

import os

import numpy as np

from covnet.image.ct import not_hu_reason
from covnet.importers import warn


def to_hu_int16(values: np.ndarray, source: str | os.PathLike, check_range: bool = True) -> np.ndarray:
    """Round and clip ``values`` (HU) to int16.

    Unless ``check_range`` is off, warn (naming ``source``) when no value is below 0: a CT in HU holds air
    at about -1000, so such an image was most likely stored in another unit (it is still written as is).
    """
    reason = not_hu_reason(values) if check_range else None
    if reason:
        warn(f"{source}: {reason}")
    info = np.iinfo(np.int16)
    rounded = values if values.dtype.kind in "iub" else np.rint(values)
    return np.clip(rounded, info.min, info.max).astype(np.int16)
