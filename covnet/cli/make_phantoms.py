"""``covnet_make_phantoms``: write a synthetic chest-CT dataset (lungs + COVID-19 infection) into raw/."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from covnet.cli.common import add_workspace_argument, run_command, workspace_from, writing
from covnet.phantoms.acquisition import PROFILES, profile_named
from covnet.phantoms.generate import SIZES, SPACING_MODES, make_phantom_dataset
from covnet.runtime.log import logger
from covnet.workspace import RAW_SCOPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covnet_make_phantoms", description=__doc__)
    add_workspace_argument(parser)
    parser.add_argument("--num-labelled", type=int, default=20, help="labelled training cases (imagesTr/labelsTr)")
    parser.add_argument("--num-unlabelled", type=int, default=20, help="unlabelled cases (imagesUnlabelled)")
    parser.add_argument("--num-test", type=int, default=4, help="labelled test cases (imagesTs/labelsTs)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same dataset (byte for byte)")
    parser.add_argument("--size", choices=SIZES, default="small",
                        help="small: ~70x70 in-plane at ~5 mm, for CPU demos and tests; clinical: 512x512 at ~0.75 mm")
    parser.add_argument("--spacing", choices=SPACING_MODES, default="mixed",
                        help="mixed: fine and coarse slices as in COVID-19-CT-Seg; isotropic; anisotropic (z >= 4x)")
    parser.add_argument("--profile", choices=tuple(PROFILES), default="standard",
                        help="acquisition profile (scanner, protocol, cohort) of every split: standard; "
                             "low_dose_soft (thick slices, soft kernel, grainy noise, +50 HU, faint lesions); "
                             "varied_lesions (each patient at one disease stage, faint ground glass to "
                             "consolidation); cohort (a multi-site COVID-19 cohort: lesion patterns by disease "
                             "stage, severity <5%% to >75%%, confounders, kernels, 1-10 mm slices, raw HU or "
                             "0-255 pre-windowed sites, partial fields of view; see docs/phantoms_cohort.md)")
    parser.add_argument("--unlabelled-profile", choices=tuple(PROFILES), default=None,
                        help="scan the unlabelled pool with another profile (domain shift; default: --profile)")
    parser.add_argument("--test-profile", choices=tuple(PROFILES), default=None,
                        help="scan the test cases with another profile (default: --profile)")
    parser.add_argument("--pool-truth", action="store_true",
                        help="also write the pool's true labels to raw/labelsUnlabelled (for measuring "
                             "pseudo-labels; training never reads them)")
    parser.add_argument("--labelled-strata", type=int, default=None,
                        help="cohort profile: draw the labelled cases from only this many of the cohort's sites "
                             "(a small expert set from one hospital); pool and test cases come from all")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in raw/")
    return parser


def ignored_flags(args: argparse.Namespace) -> list[str]:
    """A warning for each flag given about a split that this run makes no cases of."""
    asked = (("--unlabelled-profile", args.unlabelled_profile is not None, "--num-unlabelled", args.num_unlabelled),
             ("--pool-truth", args.pool_truth, "--num-unlabelled", args.num_unlabelled),
             ("--test-profile", args.test_profile is not None, "--num-test", args.num_test))
    return [f"{flag} is ignored: {count_flag} 0 makes no such cases" for flag, given, count_flag, count in asked
            if given and count == 0]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workspace = workspace_from(args)
    for warning in ignored_flags(args):
        logger(__name__).warning(warning)
    with writing(workspace, RAW_SCOPE, "covnet_make_phantoms", workspace.raw):
        make_phantom_dataset(workspace, num_labelled=args.num_labelled, num_unlabelled=args.num_unlabelled,
                             num_test=args.num_test, seed=args.seed, size=args.size, spacing_mode=args.spacing,
                             overwrite=args.overwrite, report=print, profile=profile_named(args.profile),
                             unlabelled_profile=args.unlabelled_profile and profile_named(args.unlabelled_profile),
                             test_profile=args.test_profile and profile_named(args.test_profile),
                             pool_truth=args.pool_truth, labelled_strata=args.labelled_strata)
    print(f"wrote {workspace.dataset_json}")
    return 0


def entry() -> None:
    sys.exit(run_command("covnet_make_phantoms", main))


if __name__ == "__main__":
    entry()
