#!/usr/bin/env python3
"""Inference in bfloat16 on a CPU with native support (AMX / AVX512-BF16): same segmentation, how much faster?

    python benchmarks/cpu_bfloat16.py --fold-dir W/results/fold_0 [--repeats 10] [--json out.json]

``--fold-dir`` is a trained fold (its ``checkpoint_final.pth``, its workspace's preprocessed cases and labels).
Each of its validation cases (``settings.json``) is predicted whole through covnet's ``Predictor`` (the
``covnet_predict`` path: sliding window, test-time mirroring off, export to the original grid) twice, float32
(``use_amp=False``) and autocast (``use_amp=True``: bfloat16 here), and scored against its label map with
covnet's Dice. Reported per case: both Dice values per structure, the share of voxels whose label differs, the
largest probability difference, and the two prediction times. ``--forward-model`` (default: the fold's own
checkpoint) also times ``--repeats`` batch forwards of random windows of the plan's patch (median) both ways.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from covnet.checkpoint import Checkpoint
from covnet.dataset import DatasetDescription, label_path
from covnet.evaluation.folders import structures_of
from covnet.evaluation.metrics import dice
from covnet.image.io import read_image
from covnet.inference.predictor import InferenceSettings, Predictor
from covnet.runtime.precision import cpu_has_native_bfloat16
from covnet.network.unet import ResidualEncoderUNet
from covnet.preprocessing.storage import load_case
from covnet.workspace import Workspace


def compare_cases(fold_dir: Path) -> list[dict]:
    workspace = Workspace(fold_dir.parents[1])
    description = DatasetDescription.load(workspace.dataset_json)
    checkpoint = Checkpoint.load(fold_dir / "checkpoint_final.pth")
    cases = json.loads((fold_dir / "settings.json").read_text())["validation"]
    predictors = {amp: Predictor([checkpoint], settings=InferenceSettings(use_mirroring=False, use_amp=amp))
                  for amp in (False, True)}
    rows = []
    for case in cases:
        image, _, properties = load_case(workspace.preprocessed_cases, case)
        reference = read_image(label_path(workspace.labels_tr, case, description.file_ending))[0]
        labels, probabilities, seconds = {}, {}, {}
        for amp, predictor in predictors.items():
            started = time.perf_counter()
            labels[amp], probabilities[amp] = predictor.predict_preprocessed(np.asarray(image), properties)
            seconds[amp] = time.perf_counter() - started
        row = {"case": case, "seconds_float32": seconds[False], "seconds_autocast": seconds[True],
               "labels_differ_share": float(np.mean(labels[False] != labels[True])),
               "max_probability_difference": float(np.abs(probabilities[False].full()
                                                          - probabilities[True].full()).max())}
        for name, values in structures_of(description).items():
            truth = np.isin(reference, values)
            row[f"{name}_dice_float32"] = dice(np.isin(labels[False], values), truth)
            row[f"{name}_dice_autocast"] = dice(np.isin(labels[True], values), truth)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def time_forwards(model: Path, repeats: int) -> dict:
    checkpoint = Checkpoint.load(model)
    plan = checkpoint.typed_plan
    network = ResidualEncoderUNet(plan.network).eval()
    network.load_state_dict(checkpoint.network_state)
    batch = torch.randn(InferenceSettings().batch_windows, plan.in_channels, *plan.patch_size,
                        generator=torch.Generator().manual_seed(0))
    result = {"model": str(model), "patch_size": plan.patch_size, "batch": batch.shape[0],
              "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for name, enabled in (("float32", False), ("autocast", True)):
            times = []
            with torch.autocast("cpu", enabled=enabled):
                network(batch)                               # warm-up
                for _ in range(repeats):
                    started = time.perf_counter()
                    network(batch)
                    times.append(time.perf_counter() - started)
            result[f"{name}_median_s"], result[f"{name}_min_s"] = statistics.median(times), min(times)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold-dir", type=Path, required=True)
    parser.add_argument("--forward-model", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"native bfloat16 on this CPU: {cpu_has_native_bfloat16()}; autocast runs "
          f"{'bfloat16' if cpu_has_native_bfloat16() else 'float32 (no native bfloat16)'}")
    result = {"native_bfloat16": cpu_has_native_bfloat16(), "cases": compare_cases(args.fold_dir),
              "forward": time_forwards(args.forward_model or args.fold_dir / "checkpoint_final.pth", args.repeats),
              "load_average": Path("/proc/loadavg").read_text().split()[:3]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
