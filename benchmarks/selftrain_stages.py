"""Where do pseudo-labels help? The continuation benchmark's held-out cases grouped by their disease stage.

    python benchmarks/selftrain_stages.py --root /tmp/st800 --regime varied --patch 24 32 32 \\
        --arms "-strong noise" "oracle -strong noise" --output benchmarks/results/selftrain/continuation

In the ``varied`` regime each phantom's lesions share one stage (``varied_lesions``), so 4 expert cases cover
a few stages and a held-out case may lie outside them. A case's stage is the median HU of its true infection
voxels in the raw image (the expert cases' measured the same way). Per seed, each held-out case is *fainter*
than the faintest expert case, *denser* than the densest, or *within* their range; per group, the arm table of
the other self-training benchmarks (mean Dice and NSD, the paired difference to the control over (seed, case)
pairs with a bootstrap 95% interval and a Wilcoxon p). The grouping is chosen after the fact, to explain the pooled result, not to test it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selftrain_analysis import arm_table  # noqa: E402
from selftrain_continuation import add_model_arguments, per_case_scores  # noqa: E402
from selftrain_experiment import data_workspace  # noqa: E402
from selftrain_headroom import network_name  # noqa: E402

from covnet.dataset import image_path, label_path  # noqa: E402
from covnet.image.io import read_image  # noqa: E402
from covnet.phantoms.generate import INFECTION  # noqa: E402

GROUPS = {"fainter": "fainter than every expert case", "within": "within the expert cases' stages",
          "denser": "denser than every expert case"}


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


def stage_tables(scores: dict, groups: dict[tuple[int, str], tuple[float, str]]) -> tuple[str, dict]:
    """``selftrain_analysis.arm_table`` (every arm against the control) over each group's (seed, case) pairs."""
    texts, results = [], {}
    for group, title in GROUPS.items():
        keys = {key for key, (_, name) in groups.items() if name == group}
        subset = {arm: {key: row for key, row in rows.items() if key in keys} for arm, rows in scores.items()}
        if subset["control"]:
            text, results[group] = arm_table(subset, list(subset))
            texts.append(f"Held-out cases {title}:\n\n{text}")
    return "\n\n".join(texts), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, regime="varied")
    parser.add_argument("--arms", nargs="+", default=["-strong noise", "oracle -strong noise"])
    parser.add_argument("--output", type=Path, help="write the table (.md) and every number (.json) here")
    args = parser.parse_args()
    network = network_name(tuple(args.features), tuple(args.patch))
    scores = per_case_scores(args.root, args.regime, args.seeds, network, (args.base, args.extra), args.arms)
    groups = {(seed, case): value for seed in args.seeds
              for case, value in case_groups(args.root, args.regime, seed).items()}
    text, results = stage_tables(scores, groups)
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
