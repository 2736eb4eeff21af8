"""The plan: what covnet decided for this dataset, and why. ``preprocessed/plans.json`` at rest.

It is the one contract between the stages: preprocessing, training and inference read their settings
from it and from nothing else, and checkpoints carry a copy of it.

In memory the entries are typed (``Topology``, ``NormalizationScheme``, ``ResamplingSettings``, each frozen and
validated); on disk they are plain JSON, converted by ``to_json`` / ``from_json``.
"""
from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import NoReturn, Sequence

from covnet import dataset
from covnet.network.topology import Topology
from covnet.runtime.atomic import read_json, write_json
from covnet.runtime.errors import CovnetError

# 2: the plan names the training device (device, mixed_precision, limited_by, time per iteration).
# (A CPU plan's mixed_precision true, bfloat16, is no format change: older CPU plans say false and train in float32.)
PLANS_VERSION = 2
# The one staleness number of preprocessed cases, the "version" inside preprocessing_key(): bumped whenever
# preprocessing changes what it writes (not for a plan format change alone), so cases made before are redone.
# 2: cases are reoriented to LPS before cropping.
PREPROCESSING_VERSION = 2
DEVICES = ("cuda", "cpu")

CT_SCHEME = "CT"
ZSCORE_SCHEME = "zscore"
# The interpolation orders covnet.image.resampling implements (not imported from there: it needs torch).
INTERPOLATION_ORDERS = (0, 1, 3)


# What to do about a plans.json that does not load (most likely a hand edit gone wrong).
REPAIR_HINT = "fix the entry, or plan afresh with covnet_plan_and_preprocess --replan (discards hand edits)"


def _fail(entry: str, problem: str) -> NoReturn:
    raise CovnetError(None, f"{entry}: {problem}")


def _finite_float(entry: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(entry, f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class NormalizationScheme:
    """How one channel's intensities are normalized (``covnet.preprocessing.normalization.normalize``).

    ``"CT"``: clip to ``clip`` = (low, high), then (x - ``mean``) / ``std``, one mapping for the whole dataset.
    ``"zscore"``: each image by its own mean and std; no parameters.
    In plans.json: ``{"scheme": "CT", "clip": [low, high], "mean": m, "std": s}`` or ``{"scheme": "zscore"}``.
    """
    name: str
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self):
        entry = "normalization"
        if self.name == CT_SCHEME:
            if not isinstance(self.clip, (list, tuple)) or len(self.clip) != 2:
                _fail(entry, f"CT needs clip = [low, high], got {self.clip!r}")
            low, high = (_finite_float(entry, "clip", v) for v in self.clip)
            if low > high:
                _fail(entry, f"clip low {low:g} is above high {high:g}")
            std = _finite_float(entry, "std", self.std)
            if std <= 0:
                _fail(entry, f"std must be > 0, got {std:g}")
            object.__setattr__(self, "clip", (low, high))
            object.__setattr__(self, "mean", _finite_float(entry, "mean", self.mean))
            object.__setattr__(self, "std", std)
        elif self.name == ZSCORE_SCHEME:
            if (self.clip, self.mean, self.std) != (None, None, None):
                _fail(entry, "zscore takes no clip, mean or std (each image uses its own)")
        else:
            _fail(entry, f"unknown scheme {self.name!r} (known: {CT_SCHEME}, {ZSCORE_SCHEME})")

    def to_json(self) -> dict:
        if self.name == CT_SCHEME:
            return {"scheme": self.name, "clip": list(self.clip), "mean": self.mean, "std": self.std}
        return {"scheme": self.name}

    @classmethod
    def from_json(cls, data: dict) -> "NormalizationScheme":
        if not isinstance(data, dict) or "scheme" not in data:
            _fail("normalization", f"expected {{\"scheme\": ...}}, got {data!r}")
        unknown = sorted(set(data) - {"scheme", "clip", "mean", "std"})
        if unknown:
            _fail("normalization", f"unknown entries {', '.join(unknown)}")
        return cls(name=data["scheme"], clip=data.get("clip"), mean=data.get("mean"), std=data.get("std"))


@dataclass(frozen=True)
class ResamplingSettings:
    """Interpolation orders onto the plan's grid and nnU-Net's separate-z rule: where the spacing's
    anisotropy exceeds ``anisotropy_threshold``, the coarse axis is resampled with ``order_z``."""
    image_order: int
    segmentation_order: int
    order_z: int
    anisotropy_threshold: float

    def __post_init__(self):
        for name in ("image_order", "segmentation_order", "order_z"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in INTERPOLATION_ORDERS:
                _fail("resampling", f"{name} must be one of {list(INTERPOLATION_ORDERS)}, got {value!r}")
            object.__setattr__(self, name, int(value))
        threshold = _finite_float("resampling", "anisotropy_threshold", self.anisotropy_threshold)
        if threshold <= 0:
            _fail("resampling", f"anisotropy_threshold must be > 0, got {threshold:g}")
        object.__setattr__(self, "anisotropy_threshold", threshold)

    def to_json(self) -> dict:
        return {"image_order": self.image_order, "segmentation_order": self.segmentation_order,
                "order_z": self.order_z, "anisotropy_threshold": self.anisotropy_threshold}

    @classmethod
    def from_json(cls, data: dict) -> "ResamplingSettings":
        if not isinstance(data, dict):
            _fail("resampling", f"expected a JSON object, got {data!r}")
        names = [f.name for f in fields(cls)]
        if set(data) != set(names):
            _fail("resampling", f"expected exactly {', '.join(names)}, got {', '.join(sorted(data))}")
        return cls(**data)


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
    network: Topology                      # chosen by covnet.planning.rules.network_topology
    normalization: dict[str, NormalizationScheme]   # channel index -> scheme and its parameters
    resampling: ResamplingSettings
    gpu_memory_gb: float                   # the training device's memory budget (host RAM for a CPU plan)
    estimated_memory_gb: float
    device: str                            # "cuda" or "cpu": what the plan was sized for
    # Training under autocast where the training device computes it natively (covnet.runtime.precision): float16
    # with a GradScaler on CUDA, bfloat16 on a CPU with AMX or AVX512-BF16; false: float32. What the memory model
    # (and a CPU plan's time model) assumed: CUDA plans set it; CPU plans where the planning CPU has bfloat16.
    mixed_precision: bool
    limited_by: str                        # what bounded the patch: "memory", "time" or "median shape"
    seconds_per_iteration: float | None = None            # CPU plans: the time budget of one iteration
    estimated_seconds_per_iteration: float | None = None  # CPU plans: covnet.planning.cpu_time's estimate
    measured_seconds_per_iteration: float | None = None   # CPU plans: timed on the planning machine (if measured)
    reasons: dict[str, str] = field(default_factory=dict)
    # Label value pairs that swap under a left-right mirror (left lung 1 <-> right lung 2), from dataset.json.
    lateral_pairs: list[list[int]] = field(default_factory=list)
    # The software that made the plan (covnet.runtime.environment): a record, never a setting.
    environment: dict[str, str | None] = field(default_factory=dict)
    version: int = PLANS_VERSION

    def __post_init__(self):
        if not isinstance(self.network, Topology) or not isinstance(self.resampling, ResamplingSettings) or not all(
                isinstance(scheme, NormalizationScheme) for scheme in self.normalization.values()):
            raise TypeError("Plan needs a Topology, NormalizationScheme values and ResamplingSettings "
                            "(Plan.from_json converts plain JSON)")
        if (self.network.in_channels, self.network.num_classes) != (self.in_channels, self.num_classes):
            _fail("network", f"in_channels {self.network.in_channels} and num_classes {self.network.num_classes} "
                             f"disagree with the plan's {self.in_channels} channels and {self.num_classes} classes")
        if self.device not in DEVICES:
            _fail("device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not isinstance(self.mixed_precision, bool):
            _fail("mixed_precision", f"must be true or false, got {self.mixed_precision!r}")
        if self.device == "cpu":
            for name in ("seconds_per_iteration", "estimated_seconds_per_iteration"):
                if _finite_float(name, "a CPU plan's value", getattr(self, name)) <= 0:
                    _fail(name, f"must be > 0, got {getattr(self, name)!r}")
        if not self.network.patch_is_valid(self.patch_size):
            _fail("patch_size", f"must be 3 positive integers (z, y, x), each a multiple of the network's total "
                                f"pooling {list(self.network.total_stride)}, got {self.patch_size!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            _fail("batch_size", f"must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.target_spacing, (list, tuple)) or len(self.target_spacing) != 3 or any(
                _finite_float("target_spacing", "each spacing", value) <= 0 for value in self.target_spacing):
            _fail("target_spacing", f"must be 3 positive spacings in mm (z, y, x), got {self.target_spacing!r}")
        if set(self.normalization) != set(self.channel_names):
            _fail("normalization", f"channels {sorted(self.normalization)} are not the plan's channels "
                                   f"{sorted(self.channel_names)}")

    @property
    def ignore_label(self) -> int | None:
        """The value of the label named "ignore" (voxels with no known class), if declared."""
        return dataset.ignore_label(self.labels)

    @property
    def num_classes(self) -> int:
        """Output channels of the network: every declared label but the ignore label."""
        return dataset.num_classes(self.labels)

    @property
    def foreground_labels(self) -> dict[str, int]:
        """The predicted structures by value: every label but background and the ignore label."""
        return dataset.foreground_labels(self.labels)

    @property
    def precision(self) -> str:
        """What the plan trains in, for people: "AMP (float16)", "bfloat16" or "float32"."""
        if not self.mixed_precision:
            return "float32"
        return "AMP (float16)" if self.device == "cuda" else "bfloat16"

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["network"] = self.network.to_json()
        data["normalization"] = {channel: scheme.to_json() for channel, scheme in self.normalization.items()}
        data["resampling"] = self.resampling.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict, source: str | os.PathLike = "plans.json",
                  hint: str = "re-run covnet_plan_and_preprocess") -> "Plan":
        if not isinstance(data, dict):
            raise CovnetError(source, "is not a covnet plan (not a JSON object)")
        if data.get("version") != PLANS_VERSION:
            raise CovnetError(source, f"plans version {data.get('version')} is not {PLANS_VERSION}; "
                                      "re-run covnet_plan_and_preprocess")
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING
                   and f.default_factory is MISSING]
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if missing or unknown:
            problem = f"missing {', '.join(missing)}" if missing else f"unknown entries {', '.join(unknown)}"
            raise CovnetError(source, f"is not a valid covnet plan ({problem}); {hint}")
        try:
            typed = {"network": Topology.from_json(data["network"]),
                     "normalization": {channel: NormalizationScheme.from_json(scheme)
                                       for channel, scheme in data["normalization"].items()},
                     "resampling": ResamplingSettings.from_json(data["resampling"])}
            return cls(**{**data, **typed})
        except CovnetError as error:
            raise CovnetError(source, f"is not a valid covnet plan ({error.problem}); {hint}") from None
        except (KeyError, TypeError, AttributeError) as error:
            raise CovnetError(source, f"is not a valid covnet plan ({type(error).__name__}: {error}); {hint}"
                              ) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        return cls.from_json(read_json(path, "run covnet_plan_and_preprocess first"), path, REPAIR_HINT)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())

    def preprocessing_key(self) -> dict:
        """The plan fields that determine preprocessed arrays; a case made under another key is stale."""
        return {"target_spacing": self.target_spacing,
                "normalization": {channel: scheme.to_json() for channel, scheme in self.normalization.items()},
                "resampling": self.resampling.to_json(), "labels": self.labels, "version": PREPROCESSING_VERSION}

    def table(self, edited: Sequence[str] = ()) -> str:
        """A compact human-readable view of the decisions and their reasons; the top-level entries named in
        ``edited`` (see ``plan_differences``) say so instead of giving the planner's reason."""
        def fmt(values):
            return " × ".join(f"{v:g}" for v in values)
        precision = self.precision
        budget = self.reasons.get("device", "")
        limited = f"{'network and patch' if self.device == 'cpu' else 'patch'} limited by {self.limited_by}"
        rows = [("device", "device", f"{self.device}, {precision}", f"{budget}; {limited}" if budget else limited),
                ("target_spacing", "target spacing (z,y,x) mm", fmt(self.target_spacing),
                 self.reasons.get("target_spacing", "")),
                ("median_shape", "median shape (z,y,x)", fmt(self.median_shape), "after crop and resampling"),
                ("patch_size", "patch size (z,y,x)", fmt(self.patch_size), self.reasons.get("patch_size", "")),
                ("batch_size", "batch size", str(self.batch_size), self.reasons.get("batch_size", "")),
                ("network", "stages / features", f"{self.network.n_stages} / "
                                                 f"{'-'.join(str(f) for f in self.network.features_per_stage)}",
                 self.reasons.get("network", "")),
                ("network", "strides", " ".join("".join(str(v) for v in s) for s in self.network.strides), ""),
                ("estimated_memory_gb", "memory estimate",
                 f"{self.estimated_memory_gb:.2f} GB of {self.gpu_memory_gb:g}",
                 f"{precision} activations, see covnet.planning.memory")]
        if self.device == "cpu":
            measured = (f", measured {self.measured_seconds_per_iteration:.2f} s"
                        if self.measured_seconds_per_iteration is not None else "")
            rows.append(("estimated_seconds_per_iteration", "time per iteration",
                         f"estimated {self.estimated_seconds_per_iteration:.2f} s{measured} of "
                         f"{self.seconds_per_iteration:g}",
                         self.reasons.get("time_per_iteration", "see covnet.planning.cpu_time")))
        for channel, scheme in self.normalization.items():
            rows.append(("normalization", f"normalization ch{channel}", scheme.name,
                         self.reasons.get(f"normalization_{channel}", "")))
        rows.append(("resampling", "resampling", f"image order {self.resampling.image_order}, seg order "
                                                 f"{self.resampling.segmentation_order}",
                     f"order {self.resampling.order_z} along z where anisotropy > "
                     f"{self.resampling.anisotropy_threshold:g}"))
        network_edited = bool({"patch_size", "batch_size", "network"} & set(edited))
        rows = [(name, value, "edited in plans.json" if key in edited else
                 "for the planned network and patch, not the edited ones" if network_edited and key in
                 ("estimated_memory_gb", "estimated_seconds_per_iteration") else why)
                for key, name, value, why in rows]
        width = max(len(name) for name, _, _ in rows)
        value_width = max(len(value) for _, value, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:<{value_width}}  {why}".rstrip() for name, value, why in rows)


def plan_differences(planned: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(entry, planned value, current value)`` for every leaf where two plans' JSON differ, entries named by
    their path (``normalization.0.mean``); ``reasons`` are left out (they explain the planned values)."""
    differences = []
    for key in sorted(set(planned) | set(current), key=str):
        if not prefix and key == "reasons":
            continue
        name, old, new = f"{prefix}{key}", planned.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += plan_differences(old, new, f"{name}.")
        elif old != new:
            differences.append((name, old, new))
    return differences
