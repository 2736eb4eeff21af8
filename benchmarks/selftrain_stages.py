"""Where do pseudo-labels help? The continuation benchmark's held-out cases grouped by their disease stage.

    python benchmarks/selftrain_stages.py --root /tmp/st800 --regime varied --arms "-strong noise" \\
        "oracle -strong noise" --output benchmarks/results/selftrain/continuation

In the ``varied`` regime each phantom's lesions share one stage (``varied_lesions``), so 4 expert cases cover
a few stages and a held-out case may lie outside them. A case's stage is the median HU of its true infection
voxels in the raw image (the expert cases' measured the same way). Per seed, each held-out case is *fainter*
than the faintest expert case, *denser* than the densest, or *within* their range; per group and arm the table
has the mean infection Dice and the paired difference to the control over (seed, case) pairs (bootstrap 95%
interval, Wilcoxon p). The grouping is chosen after the fact, to explain the pooled result, not to test it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selftrain_continuation import per_case_scores  # noqa: E402
from selftrain_experiment import Schedule, data_workspace  # noqa: E402
from selftrain_headroom import network_name  # noqa: E402

from covnet.dataset import image_path, label_path  # noqa: E402
from covnet.evaluation.paired import paired_difference  # noqa: E402
from covnet.image.io import read_image  # noqa: E402
from covnet.phantoms.generate import INFECTION  # noqa: E402

GROUPS = ("fainter", "within", "denser")


def lesion_stage(images: Path, labels: Path, case: str) -> float | None:
    """Median HU of the case's true infection voxels (None when it has none)."""
    image, _ = read_image(image_path(images, case))
    label, _ = read_image(label_path(labels, case))
    lesion = label == INFECTION
    return float(np.median(image[lesion])) if lesion.any() else None


def case_groups(root: Path, regime: str, seed: int) -> dict[str, tuple[float, str]]:
    """held-out case -> (its stage, its group relative to the seed's expert cases)."""
    data = data_workspace(root, regime, seed)
    experts = [lesion_stage(data.images_tr, data.labels_tr, path.name[:-len(".nii.gz")])
               for path in sorted(data.labels_tr.glob("*.nii.gz"))]
    experts = [stage for stage in experts if stage is not None]
    groups = {}
    for path in sorted(data.labels_ts.glob("*.nii.gz")):
        case = path.name[:-len(".nii.gz")]
        stage = lesion_stage(data.images_ts, data.labels_ts, case)
        if stage is not None:
            group = "fainter" if stage < min(experts) else "denser" if stage > max(experts) else "within"
            groups[case] = (stage, group)
    return groups


def stage_table(scores: dict, groups: dict[tuple[int, str], tuple[float, str]]) -> tuple[str, dict]:
    lines = ["| group | pairs | arm | infection Dice | vs control (95% CI, Wilcoxon p) |", "| --- | --- | --- | --- | --- |"]
    results = {}
    for group in GROUPS:
        keys = sorted(key for key, (_, name) in groups.items() if name == group and key in scores["control"])
        if not keys:
            continue
        for arm, rows in scores.items():
            pairs = [key for key in keys if key in rows]
            if not pairs:
                continue
            mean = float(np.mean([rows[key]["infection"]["dice"] for key in pairs]))
            difference = None if arm == "control" else paired_difference(
                [rows[key]["infection"]["dice"] for key in pairs],
                [scores["control"][key]["infection"]["dice"] for key in pairs])
            lines.append(f"| {group} | {len(pairs)} | {arm} | {mean:.3f} | "
                         f"{'—' if difference is None else difference.describe()} |")
            results[f"{group} / {arm}"] = {"pairs": len(pairs), "infection dice": mean,
                                           "difference": None if difference is None else dataclasses.asdict(difference)}
    return "\n".join(lines), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a selftrain_continuation.py folder")
    parser.add_argument("--regime", default="varied")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--base", type=int, default=3000)
    parser.add_argument("--extra", type=int, default=1500)
    parser.add_argument("--features", type=int, nargs="+", default=list(Schedule().features))
    parser.add_argument("--patch", type=int, nargs=3, default=list(Schedule().patch))
    parser.add_argument("--arms", nargs="+", default=["-strong noise", "oracle -strong noise"])
    parser.add_argument("--output", type=Path, help="write the table (.md) and every number (.json) here")
    args = parser.parse_args()
    network = network_name(tuple(args.features), tuple(args.patch))
    scores = per_case_scores(args.root, args.regime, args.seeds, network, (args.base, args.extra), args.arms)
    groups = {(seed, case): value for seed in args.seeds
              for case, value in case_groups(args.root, args.regime, seed).items()}
    text, results = stage_table(scores, groups)
    print(text)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        stem = args.output / f"stages_{args.regime}_{network}_{args.base}+{args.extra}"
        stem.with_suffix(".md").write_text(text + "\n")
        stem.with_suffix(".json").write_text(json.dumps(
            {"seeds": args.seeds, "groups": results,
             "cases": {f"{seed}/{case}": {"stage_hu": stage, "group": group}
                       for (seed, case), (stage, group) in sorted(groups.items())}}, indent=1))


if __name__ == "__main__":
    main()
