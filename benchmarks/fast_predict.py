#!/usr/bin/env python3
"""covnet_predict's speed levers one by one: what each costs in Dice against the full prediction (8 mirrorings,
step 0.5, the whole body box) and how many windows it saves.

    python benchmarks/fast_predict.py phantoms --workspace W [--fold 0] --out R.json
    python benchmarks/fast_predict.py image --checkpoint M.pth --image CT.nii.gz --out R.json

``phantoms`` takes the fold's validation cases (``raw/imagesTr``) and the test cases (``raw/imagesTs``) with their
reference labels; ``image`` one CT without labels (e.g. the real chest CT; only agreement with the full
prediction). For every case:

* **Mirroring, which flips matter.** The 8 flip combinations of (z, y, x) are predicted as 8 separate sliding
  windows (the network wrapped to flip its input and un-flip its logits, lateral labels swapped after a
  left-right flip), so that any subset's average is exactly what ``predict_sliding_window`` gives for that
  subset; the full prediction is the mean of all 8.
* **Step size, window size, lung box** (``covnet.inference.lung_box``): each its own pass, without mirroring
  unless the configuration says otherwise.
* Each configuration is exported as covnet_predict does (back to the case's grid, postprocessing, lateral fix)
  and scored: Dice of the lungs (labels 1-3) and of infection against the full prediction and, for phantoms,
  against the truth. The lung box's region must hold every lung and infection voxel of the full prediction
  (``full foreground outside the box``, counted on the plan's grid, is 0 when it does).
* **Windows over no lung:** of the full prediction's windows (step 0.5), how many hold no voxel it labels lung or
  infection (each window costs the same network time, so this is that share of the network time).

Times are wall times of this process's passes; they are speed figures only when nothing else runs (the speed
figures in BENCHMARKS.md come from ``predict_real_ct.py predict``). Results go to ``--out`` (JSON) and stdout.
"""
from __future__ import annotations

import argparse
import itertools
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

from covnet.evaluation.metrics import dice  # noqa: E402
from covnet.image.io import read_image  # noqa: E402
from covnet.image.orientation import LEFT_RIGHT_AXIS, MIRROR_AXES  # noqa: E402
from covnet.image.boxed import BoxedProbabilities  # noqa: E402
from covnet.inference.lung_box import LungBoxSettings  # noqa: E402
from covnet.inference.postprocessing import postprocess_segmentation  # noqa: E402
from covnet.inference.predictor import InferenceSettings, Predictor  # noqa: E402
from covnet.inference.sliding_window import (  # noqa: E402
    lateral_channel_order,
    mirror_combinations,
    padding_to_patch,
    predict_sliding_window,
    window_starts,
)
from covnet.preprocessing.case import preprocess_case  # noqa: E402

FLIPS = mirror_combinations(MIRROR_AXES)
# Subsets of the 8 flips whose average is a test-time augmentation worth asking about.
MIRROR_SUBSETS = {
    "no mirroring": [()],
    "mirror x (left-right, labels swapped)": [(), (2,)],
    "mirror y": [(), (1,)],
    "mirror z": [(), (0,)],
    "mirror y, x (4 passes)": [(), (1,), (2,), (1, 2)],
    "full: mirror z, y, x (8 passes)": FLIPS,
}
REFERENCE = "full: mirror z, y, x (8 passes)"


class FlippedNetwork(torch.nn.Module):
    """The network on a flipped input, its logits flipped back (lateral channels swapped after a left-right
    flip): one term of test-time mirroring as a plain network."""

    def __init__(self, network: torch.nn.Module, flip: tuple[int, ...], swapped_order: list[int] | None):
        super().__init__()
        self.network, self.dims = network, [2 + axis for axis in flip]
        self.swap = swapped_order if LEFT_RIGHT_AXIS in flip else None

    def forward(self, x):
        output = self.network(torch.flip(x, self.dims) if self.dims else x)
        logits = output[0] if isinstance(output, (list, tuple)) else output
        if self.dims:
            logits = torch.flip(logits, self.dims)
        return logits[:, self.swap] if self.swap is not None else logits


def count_windows(shape, window, step_size, region=None) -> int:
    if region is not None:
        shape = [part.stop - part.start for part in region]
    padded = [size + sum(pad) for size, pad in zip(shape, padding_to_patch(shape, window))]
    return int(np.prod([len(starts) for starts in window_starts(padded, window, step_size)]))


def windows_without_foreground(foreground: np.ndarray, window, step_size: float) -> tuple[int, int]:
    """(windows of the full layout, those holding no foreground voxel); the image is padded as the sliding window
    pads it."""
    padding = padding_to_patch(foreground.shape, window)
    padded = np.pad(foreground, padding)
    starts = window_starts(padded.shape, window, step_size)
    empty = sum(not padded[tuple(slice(s, s + w) for s, w in zip(corner, window))].any()
                for corner in itertools.product(*starts))
    return int(np.prod([len(s) for s in starts])), int(empty)


def scores(labels: np.ndarray, reference: np.ndarray) -> dict:
    return {"lungs": dice(labels > 0, reference > 0), "infection": dice(labels == 3, reference == 3),
            "left_lung": dice(labels == 1, reference == 1), "right_lung": dice(labels == 2, reference == 2)}


class Case:
    def __init__(self, name: str, image_file: Path, label_file: Path | None):
        self.name, self.image_file, self.label_file = name, image_file, label_file


def evaluate_case(predictor: Predictor, case: Case, *, with_combinations: bool) -> dict:
    plan, network = predictor.plan, predictor.network
    image, geometry = read_image(case.image_file)
    truth = read_image(case.label_file)[0] if case.label_file else None
    preprocessed, _, properties = preprocess_case(case.name, [image], geometry, plan)
    tensor = torch.from_numpy(np.array(preprocessed, dtype=np.float32))
    shape = tuple(tensor.shape[1:])
    swapped = lateral_channel_order(plan.num_classes, plan.lateral_pairs) if plan.lateral_pairs else None
    base = predictor.settings
    rows, timings = {}, {}

    def sliding(settings: InferenceSettings, flip=(), region=None) -> torch.Tensor:
        started = time.perf_counter()
        inside = tensor if region is None else tensor[(slice(None), *region)]
        wrapped = FlippedNetwork(network, flip, swapped)
        window, steps = replace_settings(predictor, settings).window_layout(inside.shape[1:])
        probabilities = predict_sliding_window(wrapped, inside, window, plan.num_classes,
                                               step_size=steps, batch_windows=settings.batch_windows,
                                               use_amp=settings.use_amp)
        if region is not None:
            probabilities = torch.from_numpy(BoxedProbabilities(probabilities.numpy(), region, shape).full())
        timings.setdefault("passes", []).append(time.perf_counter() - started)
        return probabilities

    def export(name: str, probabilities: torch.Tensor, windows: int, seconds: float, extra=None):
        labels, _ = predictor.to_original(BoxedProbabilities.everywhere(probabilities.numpy()), properties)
        rows[name] = {"windows": windows, "seconds": seconds, "labels": labels, **(extra or {})}

    started = time.perf_counter()
    per_flip = {}
    for flip in FLIPS:
        per_flip[flip] = sliding(base, flip)
    full_seconds = time.perf_counter() - started
    full_windows = count_windows(shape, *predictor.window_layout(shape))
    for name, subset in MIRROR_SUBSETS.items():
        mean = sum(per_flip[flip] for flip in subset) / len(subset)
        export(name, mean, full_windows * len(subset), full_seconds * len(subset) / len(FLIPS))
    reference_plan_grid = postprocess_segmentation(
        (sum(per_flip.values()) / len(FLIPS)).argmax(dim=0).numpy().astype(np.uint8), plan)
    del per_flip
    total_windows, empty_windows = windows_without_foreground(reference_plan_grid > 0,
                                                              *predictor.window_layout(shape))

    def configuration(name: str, settings: InferenceSettings):
        configured = replace_settings(predictor, settings)
        started = time.perf_counter()
        region = configured.lung_region(tensor) if settings.lung_box else None
        box_seconds = time.perf_counter() - started
        flips = mirror_combinations(settings.flipped_axes)
        probabilities = sum(sliding(settings, flip, region) for flip in flips) / len(flips)
        outside = None
        if settings.lung_box:
            inside = np.zeros(shape, dtype=bool)
            inside[region if region is not None else ...] = True
            outside = int(np.count_nonzero((reference_plan_grid > 0) & ~inside))
        export(name, probabilities, count_windows(shape, *configured.window_layout(
            shape if region is None else [part.stop - part.start for part in region]), region) * len(flips),
               time.perf_counter() - started,
               {"box_seconds": box_seconds, "full_foreground_outside_box": outside,
                "region": None if region is None else [[part.start, part.stop] for part in region],
                "region_fraction": 1.0 if region is None else
                float(np.prod([p.stop - p.start for p in region]) / np.prod(shape))})

    no_tta = replace(base, use_mirroring=False)
    box = replace(no_tta, lung_box=LungBoxSettings())
    configurations = {
        "step 0.75": replace(no_tta, step_size=0.75),
        "step 1.0": replace(no_tta, step_size=1.0),
        "window 1×2×2 the patch (overlap half a patch)": replace(no_tta, window_scale=(1.0, 2.0, 2.0)),
        "lung box": box,
        "lung box, 10 mm margin": replace(box, lung_box=LungBoxSettings(margin_mm=10.0)),
        "lung box, 40 mm margin": replace(box, lung_box=LungBoxSettings(margin_mm=40.0)),
        "lung box, mirror x": replace(box, use_mirroring=True, mirror_axes=(LEFT_RIGHT_AXIS,)),
    }
    if with_combinations:
        configurations.update({
            "lung box, step 0.75": replace(box, step_size=0.75),
            "lung box, window 1×2×2": replace(box, window_scale=(1.0, 2.0, 2.0)),
            "lung box, 20 mm margin only": replace(box, lung_box=LungBoxSettings(half_patch=False)),
            "lung box, 20 mm margin only, window 1×2×2": replace(box, lung_box=LungBoxSettings(half_patch=False),
                                                                 window_scale=(1.0, 2.0, 2.0)),
        })
    for name, settings in configurations.items():
        configuration(name, settings)

    reference = rows[REFERENCE]["labels"]
    result = {"case": case.name, "shape": list(image.shape), "preprocessed_shape": list(shape),
              "windows_full_layout": total_windows, "windows_without_lung": empty_windows,
              "share_without_lung": empty_windows / total_windows, "configurations": {}}
    for name, row in rows.items():
        labels = row.pop("labels")
        row["vs_full"] = scores(labels, reference)
        if truth is not None:
            row["vs_truth"] = scores(labels, truth)
        result["configurations"][name] = row
    return result


def replace_settings(predictor: Predictor, settings: InferenceSettings) -> Predictor:
    """The same network and weights under other settings (no reload)."""
    other = object.__new__(Predictor)
    other.__dict__.update(predictor.__dict__)
    other.settings = settings
    return other


def phantom_cases(workspace: Path, fold: str) -> list[Case]:
    from covnet.training.splits import cases_for_fold
    splits = json.loads((workspace / "preprocessed" / "splits.json").read_text())
    _, validation = cases_for_fold(splits, fold)
    raw = workspace / "raw"
    cases = [Case(name, raw / "imagesTr" / f"{name}_0000.nii.gz", raw / "labelsTr" / f"{name}.nii.gz")
             for name in sorted(validation)]
    cases += [Case(path.name[:-len("_0000.nii.gz")], path, raw / "labelsTs" / path.name.replace("_0000", ""))
              for path in sorted((raw / "imagesTs").glob("*_0000.nii.gz"))]
    return cases


def summary_table(results: list[dict], with_truth: bool) -> str:
    names = list(results[0]["configurations"])
    lines = ["| configuration | windows (all cases) | lungs Dice vs full (min) | infection Dice vs full (min) |"
             + (" lungs Dice vs truth, Δ to full | infection Dice vs truth, Δ to full |" if with_truth else ""),
             "| --- | --- | --- | --- |" + (" --- | --- |" if with_truth else "")]
    for name in names:
        rows = [result["configurations"][name] for result in results]
        windows = sum(row["windows"] for row in rows)

        def mean_min(key, source="vs_full"):
            values = [row[source][key] for row in rows if not np.isnan(row[source][key])]
            return (np.mean(values), np.min(values)) if values else (float("nan"), float("nan"))

        line = (f"| {name} | {windows} | {mean_min('lungs')[0]:.4f} ({mean_min('lungs')[1]:.4f}) | "
                f"{mean_min('infection')[0]:.4f} ({mean_min('infection')[1]:.4f}) |")
        if with_truth:
            full_rows = [result["configurations"][REFERENCE] for result in results]
            for key in ("lungs", "infection"):
                pairs = [(row["vs_truth"][key], ref["vs_truth"][key]) for row, ref in zip(rows, full_rows)
                         if not np.isnan(row["vs_truth"][key])]
                mean = np.mean([value for value, _ in pairs])
                delta = np.mean([value - ref for value, ref in pairs])
                line += f" {mean:.4f}, {delta:+.4f} |"
        lines.append(line)
    return "\n".join(lines)


def forward_sizes(args) -> int:
    """Network time per window voxel at larger inference windows (one forward of random input per size)."""
    from covnet.checkpoint import Checkpoint
    from covnet.runtime.precision import autocast_available
    from covnet.network.unet import ResidualEncoderUNet
    checkpoint = Checkpoint.load(args.checkpoint)
    plan = checkpoint.typed_plan
    network = ResidualEncoderUNet(plan.network).eval()
    network.load_state_dict(checkpoint.network_state)
    use_amp = not args.fp32 and autocast_available(torch.device("cpu"))
    rows = []
    for scale in args.scales:
        window = [int(size * factor) for size, factor in zip(plan.patch_size, scale)]
        batch = torch.randn(args.batch, plan.in_channels, *window)
        times = []
        with torch.inference_mode(), torch.autocast("cpu", enabled=use_amp):
            network(batch)
            for _ in range(args.repeats):
                started = time.perf_counter()
                network(batch)
                times.append(time.perf_counter() - started)
        median = float(np.median(times))
        rows.append({"window": window, "batch": args.batch, "median_s": median, "min_s": min(times),
                     "us_per_voxel": 1e6 * median / (args.batch * np.prod(window))})
        print(json.dumps(rows[-1]), flush=True)
    print(f"load {' '.join(f'{v:.2f}' for v in os.getloadavg())}, {torch.get_num_threads()} threads, "
          f"{'bfloat16' if use_amp else 'float32'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    phantoms = commands.add_parser("phantoms")
    phantoms.add_argument("--workspace", type=Path, required=True)
    phantoms.add_argument("--fold", default="0")
    phantoms.add_argument("--checkpoint", default="final")
    phantoms.add_argument("--out", type=Path, required=True)
    image = commands.add_parser("image")
    image.add_argument("--checkpoint", type=Path, required=True)
    image.add_argument("--image", type=Path, required=True)
    image.add_argument("--out", type=Path, required=True)
    for command in (phantoms, image):
        command.add_argument("--fp32", action="store_true")
        command.add_argument("--no-combinations", action="store_true")
    sizes = commands.add_parser("forward-sizes")
    sizes.add_argument("--checkpoint", type=Path, required=True)
    sizes.add_argument("--scales", type=lambda text: tuple(float(v) for v in text.split("x")), nargs="+",
                       default=[(1, 1, 1), (1, 2, 2), (2, 2, 2)], help="window = patch × ZxYxX, e.g. 1x2x2")
    sizes.add_argument("--batch", type=int, default=2)
    sizes.add_argument("--repeats", type=int, default=5)
    sizes.add_argument("--fp32", action="store_true")
    args = parser.parse_args()
    if args.command == "forward-sizes":
        return forward_sizes(args)
    settings = InferenceSettings(use_amp=not args.fp32, postprocess=True, lateral_fix=True)
    if args.command == "phantoms":
        checkpoint = args.workspace / "results" / f"fold_{args.fold}" / f"checkpoint_{args.checkpoint}.pth"
        cases = phantom_cases(args.workspace, args.fold)
    else:
        checkpoint, cases = args.checkpoint, [Case(args.image.name.split(".")[0], args.image, None)]
    predictor = Predictor.from_files([checkpoint], settings=settings)
    # The passes below call the network directly, not through predict_probabilities, which loads each model's
    # weights: load the one model's here.
    predictor.network.load_state_dict(predictor.states[0])
    print(f"{checkpoint}: {len(cases)} case(s), {torch.get_num_threads()} threads, load "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    results = []
    for case in cases:
        started = time.perf_counter()
        results.append(evaluate_case(predictor, case, with_combinations=not args.no_combinations))
        print(f"{case.name}: {time.perf_counter() - started:.0f} s, windows without lung "
              f"{results[-1]['windows_without_lung']}/{results[-1]['windows_full_layout']}, load "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        args.out.write_text(json.dumps({"checkpoint": str(checkpoint), "results": results}, indent=1))
    print(summary_table(results, with_truth=args.command == "phantoms"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
