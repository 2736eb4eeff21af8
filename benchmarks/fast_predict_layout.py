#!/usr/bin/env python3
"""The sliding window's layout on clinical-size phantoms: what the lung box's context and larger windows cost in
Dice, where the patch is much smaller than the lungs (as on a real chest CT; the small phantoms of
``fast_predict.py phantoms`` fit in one or two windows and cannot tell).

    covnet_make_phantoms --workspace W --size clinical --num-labelled 8 --num-unlabelled 0 --num-test 12 --seed 7
    covnet_plan_and_preprocess --workspace W --device cpu
    covnet_train all --workspace W --epochs 24 --iters-per-epoch 100 --val-iters 0 --device cpu
    python benchmarks/fast_predict_layout.py --workspace W --out R.json [--cases 8]

Every configuration runs without mirroring (what a layout costs does not depend on it; ``fast_predict.py``
measures mirroring) and is exported as covnet_predict exports (original grid, postprocessing, lateral fix). The
reference is nnU-Net's layout: windows of the patch, step 0.5, over the whole body box. Each configuration is
scored against the reference and against the truth (Dice of the lungs, labels 1-3, and of infection); its
windows, network seconds and share of the body box are recorded, and whether its lung box left out any voxel
the reference labels lung or infection (``reference_outside_box``, on the plan's grid). The output is written
after each case and a rerun skips the cases it holds (resumable in the background).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

from fast_predict import count_windows, replace_settings, scores  # noqa: E402

from covnet.image.io import read_image  # noqa: E402
from covnet.inference.lung_box import LungBoxSettings  # noqa: E402
from covnet.inference.predictor import InferenceSettings, Predictor  # noqa: E402
from covnet.preprocessing.case import preprocess_case  # noqa: E402

REFERENCE = "reference: body box, window = patch, step 0.5"
BASE = InferenceSettings(use_mirroring=False, postprocess=True, lateral_fix=True)
BOX, BOX_MARGIN_ONLY = LungBoxSettings(), LungBoxSettings(half_patch=False)
CONFIGURATIONS = {
    REFERENCE: BASE,
    "lung box + half a window": replace(BASE, lung_box=BOX),
    "lung box, 20 mm margin only": replace(BASE, lung_box=BOX_MARGIN_ONLY),
    "step 0.75": replace(BASE, step_size=0.75),
    "window 1×2×2": replace(BASE, window_scale=(1.0, 2.0, 2.0)),
    "lung box + half a window, window 1×2×2": replace(BASE, lung_box=BOX, window_scale=(1.0, 2.0, 2.0)),
    "lung box, 20 mm margin only, window 1×2×2": replace(BASE, lung_box=BOX_MARGIN_ONLY,
                                                         window_scale=(1.0, 2.0, 2.0)),
}


def evaluate_case(predictor: Predictor, name: str, image_file: Path, label_file: Path) -> dict:
    image, geometry = read_image(image_file)
    truth = read_image(label_file)[0]
    preprocessed, _, properties = preprocess_case(name, [image], geometry, predictor.plan)
    shape = preprocessed.shape[1:]
    rows, reference_plan_grid = {}, None
    for configuration, settings in CONFIGURATIONS.items():
        configured = replace_settings(predictor, settings)
        started = time.perf_counter()
        boxed = configured.predict_boxed(preprocessed)
        seconds = time.perf_counter() - started
        labels, _ = configured.to_original(boxed, properties)
        inside = np.zeros(shape, dtype=bool)
        inside[boxed.box] = True
        if reference_plan_grid is None:
            reference_plan_grid = boxed.labels() > 0
        rows[configuration] = {
            "windows": count_windows(shape, *configured.window_layout(boxed.values.shape[1:]), boxed.box),
            "seconds": seconds, "box": [[part.start, part.stop] for part in boxed.box],
            "box_fraction": float(inside.mean()),
            "reference_outside_box": int(np.count_nonzero(reference_plan_grid & ~inside)), "labels": labels}
    reference = rows[REFERENCE]["labels"]
    for row in rows.values():
        labels = row.pop("labels")
        row["vs_reference"], row["vs_truth"] = scores(labels, reference), scores(labels, truth)
    return {"case": name, "shape": list(image.shape), "preprocessed_shape": list(shape), "configurations": rows}


def summary_table(results: list[dict], infected: set[str]) -> str:
    """Means over the cases (infection: over the ``infected`` cases only; a clean case's infection Dice is 0 or
    undefined whatever the configuration)."""
    lines = ["| configuration | windows (all cases) | network s (all cases) | lungs Dice vs reference (min) | "
             "infection Dice vs reference (min) | lungs vs truth, Δ | infection vs truth, Δ | reference outside box |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in CONFIGURATIONS:
        rows = [result["configurations"][name] for result in results]
        reference_rows = [result["configurations"][REFERENCE] for result in results]

        def agreement(key):
            values = [row["vs_reference"][key] for row, result in zip(rows, results)
                      if (key == "lungs" or result["case"] in infected) and not np.isnan(row["vs_reference"][key])]
            return f"{np.mean(values):.4f} ({min(values):.4f})"

        def truth(key):
            pairs = [(row["vs_truth"][key], ref["vs_truth"][key])
                     for row, ref, result in zip(rows, reference_rows, results)
                     if (key == "lungs" or result["case"] in infected)
                     and not np.isnan(row["vs_truth"][key]) and not np.isnan(ref["vs_truth"][key])]
            return f"{np.mean([value for value, _ in pairs]):.4f}, {np.mean([v - r for v, r in pairs]):+.4f}"

        lines.append(f"| {name} | {sum(row['windows'] for row in rows)} | {sum(row['seconds'] for row in rows):.0f} | "
                     f"{agreement('lungs')} | {agreement('infection')} | {truth('lungs')} | {truth('infection')} | "
                     f"{sum(row['reference_outside_box'] for row in rows)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--fold", default="all")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=None, help="the first N test cases (default: all)")
    args = parser.parse_args()
    checkpoint = args.workspace / "results" / f"fold_{args.fold}" / "checkpoint_final.pth"
    predictor = Predictor.from_files([checkpoint], settings=BASE)
    raw = args.workspace / "raw"
    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[:args.cases]
    done = json.loads(args.out.read_text())["results"] if args.out.exists() else []
    print(f"{checkpoint}: {len(images)} test cases ({len(done)} done), {torch.get_num_threads()} threads, load "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    for image_file in images:
        name = image_file.name[:-len("_0000.nii.gz")]
        if any(result["case"] == name for result in done):
            continue
        started = time.perf_counter()
        done.append(evaluate_case(predictor, name, image_file, raw / "labelsTs" / f"{name}.nii.gz"))
        print(f"{name}: {time.perf_counter() - started:.0f} s, load "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        partial = args.out.with_suffix(".partial")
        partial.write_text(json.dumps({"checkpoint": str(checkpoint), "results": done}, indent=1))
        partial.replace(args.out)
    infected = {result["case"] for result in done
                if (read_image(raw / "labelsTs" / f"{result['case']}.nii.gz")[0] == 3).any()}
    print(f"{len(done)} cases, {len(infected)} with infection")
    print(summary_table(done, infected))
    return 0


if __name__ == "__main__":
    sys.exit(main())
