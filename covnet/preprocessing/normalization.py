"""Intensity normalization as the plan prescribes it (training and inference call the same function)."""
from __future__ import annotations

import numpy as np


def normalize(image: np.ndarray, scheme: dict) -> np.ndarray:
    """``scheme`` is a plan's ``normalization[channel]``: ``{"scheme": "CT", "clip": [lo, hi], "mean", "std"}``
    (one mapping for the whole dataset) or ``{"scheme": "zscore"}`` (each image by its own statistics)."""
    image = np.asarray(image, dtype=np.float32)
    if scheme["scheme"] == "CT":
        low, high = scheme["clip"]
        clipped = np.clip(image, low, high)
        return ((clipped - np.float32(scheme["mean"])) / np.float32(scheme["std"])).astype(np.float32, copy=False)
    if scheme["scheme"] == "zscore":
        return ((image - image.mean()) / max(float(image.std()), 1e-8)).astype(np.float32, copy=False)
    raise ValueError(f"unknown normalization scheme {scheme['scheme']!r}")
