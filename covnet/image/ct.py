"""What a CT in Hounsfield units looks like: air at about -1000 HU, so some values are below 0."""
from __future__ import annotations

import numpy as np


def not_hu_reason(values: np.ndarray) -> str | None:
    """Why ``values`` do not look like a CT in HU (e.g. a 0–255 windowed export), or None when they do.

    Such an image becomes nearly constant under CT normalization (every value lands above the clip range)."""
    low, high = float(values.min()), float(values.max())
    if low >= 0.0:
        return (f"intensities span [{low:g}, {high:g}]; this does not look like HU (a CT in Hounsfield units has "
                "air near -1000; a windowed export such as 0-255 has nothing below 0)")
    return None
