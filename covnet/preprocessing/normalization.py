"""Intensity normalization as the plan prescribes it (training and inference call the same function)."""
from __future__ import annotations

import numpy as np

from covnet.planning.plans import CT_SCHEME, ZSCORE_SCHEME, NormalizationScheme


def normalize(image: np.ndarray, scheme: NormalizationScheme) -> np.ndarray:
    """``scheme`` is a plan's ``normalization[channel]``: "CT" clips to ``scheme.clip`` and z-scores with the
    dataset's ``scheme.mean`` and ``scheme.std``; "zscore" uses each image's own mean and std."""
    image = np.asarray(image, dtype=np.float32)
    if scheme.name == CT_SCHEME:
        low, high = scheme.clip
        clipped = np.clip(image, low, high)
        return ((clipped - np.float32(scheme.mean)) / np.float32(scheme.std)).astype(np.float32, copy=False)
    if scheme.name == ZSCORE_SCHEME:
        return ((image - image.mean()) / max(float(image.std()), 1e-8)).astype(np.float32, copy=False)
    raise ValueError(f"unknown normalization scheme {scheme.name!r}")
