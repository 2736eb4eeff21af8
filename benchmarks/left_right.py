#!/usr/bin/env python3
"""Left and right lungs with and without covnet_predict's lateral fix (sides set by the body's midline).

    # a briefly trained CPU-plan model on phantoms (the demo's budget: it still mixes up left and right)
    covnet_make_phantoms --workspace W --num-labelled 10 --num-unlabelled 0 --num-test 8 --seed 0
    covnet_plan_and_preprocess --workspace W --device cpu -np 1
    covnet_train 0 --workspace W --epochs 8 --iters-per-epoch 25 --val-iters 5 --num-workers 1 \\
        --no-val-mirroring --checkpoint-every 1
    python benchmarks/left_right.py --workspace W [--checkpoint final] [--tta] \\
        [--real-ct ../shared/data/real_ct/chest_ct_512x512x141.nii.gz]

Each test phantom (``raw/imagesTs``, truth in ``raw/labelsTs``) is predicted once, exactly as covnet_predict does
with its default postprocessing, and the label map is scored before and after ``lungs_by_midline`` (the fix
covnet_predict applies by default): Dice of the left lung, the right lung and both lungs, and the share of lung
voxels the fix relabelled; and the fix applied to the reference itself (its left/right Dice against the
unchanged reference: what the rule costs a segmentation whose sides are right). The real CT has no reference: for it the script reports the lung voxels (and mL)
labelled left and right with and without the fix, and where each side's voxels lie: the share of the voxels
labelled left that lie on the patient's left of the body's midline (anatomy says 100%), likewise right, in the
canonical LPS frame. It also prints where the midline falls (body box) against the middle of the lungs' joint
extent, and the fix's own time. One Markdown block goes to stdout.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from covnet.dataset import LEFT_LUNG, RIGHT_LUNG
from covnet.evaluation.metrics import dice
from covnet.image.grid import bounding_box
from covnet.image.io import read_image
from covnet.image.orientation import LEFT_RIGHT_AXIS
from covnet.inference.predictor import InferenceSettings, Predictor, lungs_by_midline
from covnet.preprocessing.case import preprocess_case
from covnet.runtime.cpus import usable_cpu_count


def predict_unfixed(predictor: Predictor, image: np.ndarray, geometry, case: str):
    preprocessed, _, properties = preprocess_case(case, [image], geometry, predictor.plan)
    segmentation, _ = predictor.predict_preprocessed(preprocessed, properties)
    return segmentation, properties


def timed_fix(segmentation, properties, labels) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    fixed = lungs_by_midline(segmentation, properties, labels)
    return fixed, time.perf_counter() - started


def side_scores(segmentation: np.ndarray, reference: np.ndarray, left: int, right: int) -> dict:
    lungs = (left, right)
    return {"left": dice(segmentation == left, reference == left),
            "right": dice(segmentation == right, reference == right),
            "lungs": dice(np.isin(segmentation, lungs), np.isin(reference, lungs))}


def relabelled_share(before: np.ndarray, after: np.ndarray, lungs: tuple[int, int]) -> float:
    mask = np.isin(before, lungs)
    return float(np.count_nonzero(before[mask] != after[mask]) / max(1, np.count_nonzero(mask)))


def phantom_table(predictor: Predictor, workspace: Path, left: int, right: int) -> list[str]:
    rows, totals = [], {"raw": [], "fixed": [], "truth": []}
    for image_file in sorted((workspace / "raw" / "imagesTs").glob("*_0000.nii.gz")):
        case = image_file.name[: -len("_0000.nii.gz")]
        image, geometry = read_image(image_file)
        reference, _ = read_image(workspace / "raw" / "labelsTs" / f"{case}.nii.gz")
        raw, properties = predict_unfixed(predictor, image, geometry, case)
        fixed, _ = timed_fix(raw, properties, predictor.plan.labels)
        # The fix applied to the truth itself: what the rule costs a segmentation whose sides are already right.
        truth_fixed, _ = timed_fix(reference, properties, predictor.plan.labels)
        scores = {name: side_scores(segmentation, reference, left, right)
                  for name, segmentation in (("raw", raw), ("fixed", fixed), ("truth", truth_fixed))}
        for name in totals:
            totals[name].append(scores[name])
        rows.append(f"| {case} | {scores['raw']['left']:.3f} / {scores['raw']['right']:.3f} | "
                    f"{scores['fixed']['left']:.3f} / {scores['fixed']['right']:.3f} | "
                    f"{scores['raw']['lungs']:.3f} → {scores['fixed']['lungs']:.3f} | "
                    f"{100 * relabelled_share(raw, fixed, (left, right)):.1f}% | "
                    f"{scores['truth']['left']:.4f} / {scores['truth']['right']:.4f} |")
    mean = {name: {key: float(np.mean([s[key] for s in values])) for key in ("left", "right", "lungs")}
            for name, values in totals.items()}
    rows.append(f"| **mean** | **{mean['raw']['left']:.3f} / {mean['raw']['right']:.3f}** | "
                f"**{mean['fixed']['left']:.3f} / {mean['fixed']['right']:.3f}** | "
                f"{mean['raw']['lungs']:.3f} → {mean['fixed']['lungs']:.3f} | | "
                f"{mean['truth']['left']:.4f} / {mean['truth']['right']:.4f} |")
    return ["| case | Dice left / right, without fix | with fix | lungs Dice | lung voxels relabelled | "
            "fix applied to the truth: Dice left / right |",
            "| --- | --- | --- | --- | --- | --- |", *rows]


def side_placement(segmentation: np.ndarray, properties, label: int, midline: float) -> float | None:
    """Share of the voxels labelled ``label`` that lie on the patient's left of the midline (canonical frame)."""
    canonical = properties.reorientation.to_canonical(segmentation) == label
    total = np.count_nonzero(canonical)
    if not total:
        return None
    positions = np.arange(canonical.shape[LEFT_RIGHT_AXIS])
    per_position = np.moveaxis(canonical, LEFT_RIGHT_AXIS, 0).reshape(len(positions), -1).sum(axis=1)
    return float(per_position[positions > midline].sum() / total)


def soft_tissue_offsets(image: np.ndarray, properties, midline: float, spacing_x: float, band: int = 15) -> str:
    """An anatomical check of the frame the sides come from: the mean left-right position (mm from the midline,
    + = patient's left) of soft tissue (40-80 HU: liver, heart, muscle) in bands of ``band`` slices from the
    bottom. The liver under the right lung pulls the lowest bands to the right, the heart the next ones left."""
    canonical = properties.reorientation.to_canonical(image)
    offsets = []
    for start in range(0, min(3 * band, canonical.shape[0]), band):
        soft = (canonical[start:start + band] > 40) & (canonical[start:start + band] < 80)
        if soft.any():
            x = np.nonzero(soft)[LEFT_RIGHT_AXIS]
            offsets.append(f"slices {start}-{start + band - 1}: {(x.mean() - midline) * spacing_x:+.0f} mm")
    return "; ".join(offsets)


def real_ct_table(predictor: Predictor, path: Path, left: int, right: int) -> list[str]:
    image, geometry = read_image(path)
    started = time.perf_counter()
    raw, properties = predict_unfixed(predictor, image, geometry, path.name)
    predict_seconds = time.perf_counter() - started
    fixed, fix_seconds = timed_fix(raw, properties, predictor.plan.labels)
    start, stop = properties.bounding_box[LEFT_RIGHT_AXIS]
    midline = (start + stop - 1) / 2
    lungs = np.isin(properties.reorientation.to_canonical(raw), (left, right))
    lung_box = bounding_box(lungs)[LEFT_RIGHT_AXIS] if lungs.any() else (0, 0)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000
    spacing_x = properties.reorientation.spacing(geometry.spacing)[LEFT_RIGHT_AXIS]
    lines = [f"Real CT `{path.name}` ({image.shape[0]}×{image.shape[1]}×{image.shape[2]}, spacing "
             f"{', '.join(f'{s:g}' for s in geometry.spacing)} mm): prediction {predict_seconds:.1f} s, fix "
             f"{fix_seconds:.2f} s. Midline from the body box: x = {midline:.1f} voxels (body x {start}–{stop - 1}); "
             f"middle of the predicted lungs' joint extent: x = {(lung_box[0] + lung_box[1] - 1) / 2:.1f} "
             f"(x spacing {spacing_x:g} mm). Soft tissue (40-80 HU) from the bottom, mean position from the "
             f"midline (+ = patient's left): {soft_tissue_offsets(image, properties, midline, spacing_x)}.", "",
             "| | voxels labelled left (mL) | voxels labelled right (mL) | left-labelled voxels on the patient's "
             "left | right-labelled voxels on the patient's right | lung voxels relabelled |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, segmentation in (("without fix", raw), ("with fix", fixed)):
        counts = [int(np.count_nonzero(segmentation == label)) for label in (left, right)]
        on_left = [side_placement(segmentation, properties, label, midline) for label in (left, right)]
        shares = [f"{100 * on_left[0]:.1f}%" if on_left[0] is not None else "n/a",
                  f"{100 * (1 - on_left[1]):.1f}%" if on_left[1] is not None else "n/a"]
        relabelled = f"{100 * relabelled_share(raw, fixed, (left, right)):.1f}%" if name == "with fix" else ""
        lines.append(f"| {name} | {counts[0]} ({counts[0] * voxel_ml:.0f}) | {counts[1]} ({counts[1] * voxel_ml:.0f}) "
                     f"| {shares[0]} | {shares[1]} | {relabelled} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--fold", default="0")
    parser.add_argument("--checkpoint", default="final", help="final, best or latest")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring (covnet_predict's default)")
    parser.add_argument("--real-ct", type=Path, default=None)
    args = parser.parse_args()

    model = args.workspace / "results" / f"fold_{args.fold}" / f"checkpoint_{args.checkpoint}.pth"
    settings = InferenceSettings(use_mirroring=args.tta, postprocess=True, lateral_fix=False)
    predictor = Predictor.from_files([model], settings=settings)
    labels = predictor.plan.labels
    left, right = labels[LEFT_LUNG], labels[RIGHT_LUNG]
    started = datetime.now(timezone.utc)
    print(f"### Left/right with and without the lateral fix: {model} (epoch {_epoch(model)}), "
          f"TTA {'on' if args.tta else 'off'}\n")
    print(f"Machine: {platform.machine()}, {usable_cpu_count()} usable CPUs, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the start; {started:%Y-%m-%d %H:%M} UTC\n")
    print("\n".join(phantom_table(predictor, args.workspace, left, right)))
    if args.real_ct is not None:
        print()
        print("\n".join(real_ct_table(predictor, args.real_ct, left, right)))
    print(f"\nLoad average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def _epoch(path: Path) -> int:
    import torch
    return int(torch.load(path, weights_only=True, map_location="cpu").get("epoch", 0))


if __name__ == "__main__":
    main()
