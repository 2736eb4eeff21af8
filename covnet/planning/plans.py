"""The plan: what covnet decided for this dataset, and why. ``preprocessed/plans.json`` at rest.

It is the one contract between the stages: preprocessing, training and inference read their settings
from it and from nothing else, and checkpoints carry a copy of it.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from covnet.atomic import read_json, write_json
from covnet.errors import CovnetError

PLANS_VERSION = 1


@dataclass
class Plan:
    dataset_name: str
    labels: dict[str, int]                 # name -> value, background 0 included
    regions: dict[str, list[int]]
    channel_names: dict[str, str]
    target_spacing: list[float]            # (z, y, x) mm
    median_shape: list[float]              # median case shape after cropping and resampling, (z, y, x)
    patch_size: list[int]                  # (z, y, x) voxels
    batch_size: int
    network: dict                          # topology, see covnet.planning.rules.network_topology
    normalization: dict[str, dict]         # channel index -> scheme and its parameters
    resampling: dict                       # interpolation orders and the separate-z rule
    gpu_memory_gb: float
    estimated_memory_gb: float
    reasons: dict[str, str] = field(default_factory=dict)
    version: int = PLANS_VERSION

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str | os.PathLike = "plans.json") -> "Plan":
        if data.get("version") != PLANS_VERSION:
            raise CovnetError(source, f"plans version {data.get('version')} is not {PLANS_VERSION}; "
                                      "re-run covnet_plan_and_preprocess")
        try:
            return cls(**data)
        except TypeError as error:
            raise CovnetError(source, f"is not a covnet plan ({error})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        return cls.from_json(read_json(path, "run covnet_plan_and_preprocess first"), path)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())

    def preprocessing_key(self) -> dict:
        """The plan fields that determine preprocessed arrays; a case made under another key is stale."""
        return {"target_spacing": self.target_spacing, "normalization": self.normalization,
                "resampling": self.resampling, "labels": self.labels, "version": self.version}

    def table(self) -> str:
        """A compact human-readable view of the decisions and their reasons."""
        def fmt(values):
            return " × ".join(f"{v:g}" for v in values)
        rows = [("target spacing (z,y,x) mm", fmt(self.target_spacing), self.reasons.get("target_spacing", "")),
                ("median shape (z,y,x)", fmt(self.median_shape), "after crop and resampling"),
                ("patch size (z,y,x)", fmt(self.patch_size), self.reasons.get("patch_size", "")),
                ("batch size", str(self.batch_size), self.reasons.get("batch_size", "")),
                ("stages / features", f"{len(self.network['strides'])} / "
                                      f"{'-'.join(str(f) for f in self.network['features_per_stage'])}",
                 self.reasons.get("network", "")),
                ("strides", " ".join("".join(str(v) for v in s) for s in self.network["strides"]), ""),
                ("memory estimate", f"{self.estimated_memory_gb:.2f} GB of {self.gpu_memory_gb:g}",
                 "float32 activations, see covnet.planning.memory")]
        for channel, scheme in self.normalization.items():
            rows.append((f"normalization ch{channel}", scheme["scheme"], self.reasons.get(f"normalization_{channel}", "")))
        rows.append(("resampling", f"image order {self.resampling['image_order']}, seg order "
                                   f"{self.resampling['segmentation_order']}",
                     f"order {self.resampling['order_z']} along z where anisotropy > "
                     f"{self.resampling['anisotropy_threshold']:g}"))
        width = max(len(name) for name, _, _ in rows)
        value_width = max(len(value) for _, value, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:<{value_width}}  {why}".rstrip() for name, value, why in rows)
