"""``raw/dataset.json`` as a typed object, case discovery and raw-data validation.

The format is nnU-Net v2's: images ``imagesTr/CASE_0000<ending>``, labels ``labelsTr/CASE<ending>``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from covnet.image.io import Geometry, is_image_file, read_geometry, read_image
from covnet.runtime.atomic import read_json, write_json
from covnet.runtime.errors import CovnetError

CHANNEL_SUFFIX = "_0000"
BACKGROUND = "background"
# nnU-Net's ignore label: voxels of unknown class, left out of the loss and of the scores. Its value must be the
# highest; the network predicts every other label.
IGNORE_LABEL_NAME = "ignore"
# The names of COVID-19-CT-Seg's labels and regions, which the report, the preview and postprocessing look for.
LEFT_LUNG, RIGHT_LUNG, INFECTION = "left_lung", "right_lung", "infection"
LUNGS = "lungs"
COVID_LABELS = {BACKGROUND: 0, LEFT_LUNG: 1, RIGHT_LUNG: 2, INFECTION: 3}
COVID_REGIONS = {LUNGS: [1, 2, 3], INFECTION: [3]}
COVID_LATERAL_PAIRS = ((LEFT_LUNG, RIGHT_LUNG),)
# Label names of one side of a left/right pair: the side as a word before or after the rest of the name ("left_X",
# "X_left") or as a letter after it ("X_L"), separated by "_", "-" or a space; any case.
_SIDE_PATTERNS = (re.compile(r"^(?P<side>left|right)(?P<rest>[_\- ].+)$", re.IGNORECASE),
                  re.compile(r"^(?P<rest>.+[_\- ])(?P<side>left|right)$", re.IGNORECASE),
                  re.compile(r"^(?P<rest>.+[_\- ])(?P<side>l|r)$", re.IGNORECASE))
_OTHER_SIDE = {"left": "right", "l": "r"}


def ignore_label(labels: Mapping[str, int]) -> int | None:
    """The value of the label named "ignore", if declared."""
    return labels.get(IGNORE_LABEL_NAME)


def foreground_labels(labels: Mapping[str, int]) -> dict[str, int]:
    """The labels that are structures, by value: every declared label but background (0) and the ignore label.
    These are the classes the network predicts besides background, and the ones that are scored."""
    return {name: value for name, value in sorted(labels.items(), key=lambda item: item[1])
            if value != 0 and name != IGNORE_LABEL_NAME}


def num_classes(labels: Mapping[str, int]) -> int:
    """The network's output channels: background and the foreground labels (the ignore label is no class)."""
    return max(value for name, value in labels.items() if name != IGNORE_LABEL_NAME) + 1


def left_right_pairs(names: list[str]) -> list[list[str]]:
    """The pairs [left, right] among ``names`` that differ only in their side: ``left_X``/``right_X``,
    ``X_left``/``X_right`` or ``X_L``/``X_R`` (separator ``_``, ``-`` or a space; any case). A name that
    could pair with more than one other is left out: no guess."""
    by_key: dict[str, list[str]] = {}
    for name in names:
        by_key.setdefault(name.casefold(), []).append(name)
    candidates = []
    for name in names:
        for pattern in _SIDE_PATTERNS:
            match = pattern.match(name)
            other_side = _OTHER_SIDE.get(match.group("side").lower()) if match else None
            if other_side is None:
                continue
            start, end = match.span("side")
            partners = by_key.get((name[:start] + other_side + name[end:]).casefold(), [])
            candidates += [[name, partner] for partner in partners]
    paired = [name for pair in candidates for name in pair]
    return [pair for pair in candidates if paired.count(pair[0]) == 1 and paired.count(pair[1]) == 1]


def check_labels(labels: Mapping[str, int], source: str | os.PathLike) -> None:
    """Background 0, the other classes numbered on from 1 without gaps, the ignore label (if any) above them all."""
    if labels.get(BACKGROUND) != 0:
        raise CovnetError(source, "labels must declare background as 0")
    classes = sorted(value for name, value in labels.items() if name != IGNORE_LABEL_NAME)
    if classes != list(range(len(classes))):
        raise CovnetError(source, f"label values {classes} must be 0, 1, 2, ... without gaps or repeats "
                                  "(the network predicts one class per value)")
    ignore = ignore_label(labels)
    if ignore is not None and ignore <= classes[-1]:
        raise CovnetError(source, f"the ignore label's value {ignore} must be above every other label "
                                  f"(the highest is {classes[-1]})")


@dataclass
class DatasetDescription:
    channel_names: dict[str, str]
    labels: dict[str, int]
    num_training: int
    file_ending: str = ".nii.gz"
    regions: dict[str, list[int]] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    name: str = "covnet"
    # Label names that trade places under a left-right mirror, e.g. [["left_lung", "right_lung"]]; None when
    # dataset.json declares none (an nnU-Net dataset): then the label names that form left/right pairs.
    lateral_pairs: list[list[str]] | None = None

    @property
    def lateral_name_pairs(self) -> list[list[str]]:
        """The declared lateral pairs, or, when none are declared, those the label names form."""
        if self.lateral_pairs is not None:
            return self.lateral_pairs
        return left_right_pairs(list(self.foreground_labels))

    @property
    def lateral_label_pairs(self) -> list[list[int]]:
        return [[self.labels[left], self.labels[right]] for left, right in self.lateral_name_pairs]

    @property
    def lateral_pairs_reason(self) -> str:
        """Where the lateral pairs come from, for plans.json's reasons."""
        if self.lateral_pairs is not None:
            return "declared in dataset.json (lateral_pairs)"
        found = ", ".join(f"{left}/{right}" for left, right in self.lateral_name_pairs)
        if not found:
            return "dataset.json declares no lateral_pairs and no label names form a left/right pair"
        return (f"found in the label names ({found}): dataset.json declares no lateral_pairs; a left-right "
                "mirror of a training patch exchanges them (\"lateral_pairs\": [] in dataset.json turns this off)")

    @property
    def label_values(self) -> list[int]:
        return sorted(self.labels.values())

    @property
    def foreground_labels(self) -> dict[str, int]:
        return foreground_labels(self.labels)

    @property
    def ignore_label(self) -> int | None:
        return ignore_label(self.labels)

    @property
    def num_classes(self) -> int:
        return num_classes(self.labels)

    def group_of(self, case: str) -> str:
        """The patient a case belongs to; a case without a group is its own patient."""
        return self.groups.get(case, case)

    def to_json(self) -> dict:
        data = {"name": self.name, "channel_names": self.channel_names, "labels": self.labels,
                "numTraining": self.num_training, "file_ending": self.file_ending}
        if self.regions:
            data["regions"] = self.regions
        if self.groups:
            data["groups"] = self.groups
        if self.lateral_pairs is not None:
            data["lateral_pairs"] = self.lateral_pairs
        return data

    @classmethod
    def from_json(cls, data: dict, source: str | os.PathLike = "dataset.json") -> "DatasetDescription":
        for key in ("channel_names", "labels"):
            if key not in data:
                raise CovnetError(source, f"has no '{key}' entry")
        labels = {str(name): int(value) for name, value in data["labels"].items()}
        check_labels(labels, source)
        regions = {str(name): [int(v) for v in values] for name, values in data.get("regions", {}).items()}
        for name, values in regions.items():
            unknown = set(values) - set(foreground_labels(labels).values())
            if unknown:
                raise CovnetError(source, f"region '{name}' uses label values {sorted(unknown)}, which are not "
                                          "declared foreground labels")
        channel_names = {str(k): str(v) for k, v in data["channel_names"].items()}
        expected_keys = [str(index) for index in range(len(channel_names))]
        if sorted(channel_names, key=lambda key: (len(key), key)) != expected_keys:
            raise CovnetError(source, f"channel_names keys must be the channel indices {expected_keys} "
                                      f"(files CASE_0000…), not {sorted(channel_names)}")
        lateral_pairs = [[str(name) for name in pair] for pair in data["lateral_pairs"]] \
            if data.get("lateral_pairs") is not None else None
        for pair in lateral_pairs or []:
            if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(foreground_labels(labels)):
                raise CovnetError(source, f"lateral pair {pair} must name two different declared foreground labels")
        return cls(channel_names=channel_names, labels=labels, lateral_pairs=lateral_pairs,
                   num_training=int(data.get("numTraining", 0)), file_ending=str(data.get("file_ending", ".nii.gz")),
                   regions=regions, groups={str(k): str(v) for k, v in data.get("groups", {}).items()},
                   name=str(data.get("name", "covnet")))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DatasetDescription":
        data = read_json(path, "import a dataset or run covnet_make_phantoms first")
        return cls.from_json(data, path)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())


def covid_description(name: str = "COVID-19-CT-Seg", num_training: int = 0,
                      groups: dict[str, str] | None = None) -> DatasetDescription:
    """A CT dataset with COVID-19-CT-Seg's labels (left lung, right lung, infection) and regions."""
    return DatasetDescription(channel_names={"0": "CT"}, labels=dict(COVID_LABELS), num_training=num_training,
                              lateral_pairs=[list(pair) for pair in COVID_LATERAL_PAIRS],
                              regions={region: list(values) for region, values in COVID_REGIONS.items()},
                              groups=dict(groups or {}), name=name)


def find_cases(images_dir: str | os.PathLike, file_ending: str = ".nii.gz") -> list[str]:
    """Case identifiers of ``CASE_0000<ending>`` files in ``images_dir`` (sorted)."""
    images_dir = Path(images_dir)
    suffix = CHANNEL_SUFFIX + file_ending
    return sorted(p.name[: -len(suffix)] for p in images_dir.iterdir() if p.name.endswith(suffix) and is_image_file(p)) \
        if images_dir.is_dir() else []


def find_label_cases(labels_dir: str | os.PathLike, file_ending: str = ".nii.gz") -> list[str]:
    """Case identifiers of ``CASE<ending>`` label files in ``labels_dir`` (sorted)."""
    labels_dir = Path(labels_dir)
    return sorted(p.name[: -len(file_ending)] for p in labels_dir.iterdir() if p.name.endswith(file_ending)
                  and is_image_file(p)) if labels_dir.is_dir() else []


def image_path(images_dir: str | os.PathLike, case: str, file_ending: str = ".nii.gz") -> Path:
    return Path(images_dir) / f"{case}{CHANNEL_SUFFIX}{file_ending}"


def label_path(labels_dir: str | os.PathLike, case: str, file_ending: str = ".nii.gz") -> Path:
    return Path(labels_dir) / f"{case}{file_ending}"


def check_label_values(label: np.ndarray, description: DatasetDescription, path: str | os.PathLike) -> None:
    # A histogram is much faster than np.unique's sort for the usual uint8 label maps.
    present = np.flatnonzero(np.bincount(label.ravel())) if label.dtype == np.uint8 else np.unique(label)
    if not np.all(np.equal(np.mod(present, 1), 0)):
        raise CovnetError(path, f"holds non-integer label values {[float(v) for v in present[np.mod(present, 1) != 0][:5]]}")
    undeclared = sorted(set(int(v) for v in present) - set(description.label_values))
    if undeclared:
        raise CovnetError(path, f"label values {undeclared} are not declared in dataset.json "
                                f"(declared: {description.label_values})")


def check_same_grid(image_geometry: Geometry, label_geometry: Geometry, label_file: str | os.PathLike) -> None:
    differences = label_geometry.differences(image_geometry)
    if differences:
        raise CovnetError(label_file, f"geometry does not match its image (label vs image: {'; '.join(differences)})")


def read_labelled_case(images_dir: Path, labels_dir: Path, case: str, description: DatasetDescription,
                       dtype=None) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Image, label and geometry of one labelled case; ``CovnetError`` for a missing label, a label on
    another grid or undeclared label values (and, from covnet.image.io, unreadable, 2D or non-finite files)."""
    image_file = image_path(images_dir, case, description.file_ending)
    label_file = label_path(labels_dir, case, description.file_ending)
    if not label_file.is_file():
        raise CovnetError(image_file, f"has no label (expected {label_file})")
    image, image_geometry = read_image(image_file, dtype=dtype)
    label, label_geometry = read_image(label_file)
    check_same_grid(image_geometry, label_geometry, label_file)
    check_label_values(label, description, label_file)
    return image, label, image_geometry


def validate_raw_dataset(raw_dir: str | os.PathLike) -> tuple[DatasetDescription, list[str]]:
    """Check ``raw/``'s description and file listing (every image has a label and vice versa) before
    anything is written from it; return the description and the labelled cases. The files' contents are
    checked as they are read (``read_labelled_case``)."""
    raw_dir = Path(raw_dir)
    description = DatasetDescription.load(raw_dir / "dataset.json")
    if len(description.channel_names) != 1:
        raise CovnetError(raw_dir / "dataset.json", f"declares {len(description.channel_names)} channels; covnet reads "
                                                   "one image (channel 0, CT) per case")
    images_dir, labels_dir = raw_dir / "imagesTr", raw_dir / "labelsTr"
    cases = find_cases(images_dir, description.file_ending)
    if not cases:
        raise CovnetError(images_dir, f"holds no images named CASE{CHANNEL_SUFFIX}{description.file_ending}")
    for case in find_label_cases(labels_dir, description.file_ending):
        if case not in cases:
            raise CovnetError(label_path(labels_dir, case, description.file_ending),
                              f"has no image (expected {image_path(images_dir, case, description.file_ending)})")
    for case in cases:
        if not label_path(labels_dir, case, description.file_ending).is_file():
            raise CovnetError(image_path(images_dir, case, description.file_ending),
                              f"has no label (expected {label_path(labels_dir, case, description.file_ending)})")
    return description, cases


__all__ = ["DatasetDescription", "find_cases", "image_path", "label_path", "validate_raw_dataset",
           "read_labelled_case", "check_label_values", "check_same_grid", "read_geometry", "foreground_labels",
           "ignore_label", "num_classes", "check_labels", "COVID_LABELS", "COVID_REGIONS", "CHANNEL_SUFFIX",
           "IGNORE_LABEL_NAME", "LEFT_LUNG", "RIGHT_LUNG", "INFECTION", "LUNGS"]
