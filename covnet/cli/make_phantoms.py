"""``covnet_make_phantoms``: write a synthetic chest-CT dataset (lungs + COVID-19 infection) into raw/."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from covnet.cli.common import add_workspace_argument, run_command, workspace_from, writing
from covnet.phantoms.generate import SIZES, SPACING_MODES, make_phantom_dataset


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
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in raw/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workspace = workspace_from(args)
    with writing(workspace, "raw", "covnet_make_phantoms", workspace.raw):
        make_phantom_dataset(workspace, num_labelled=args.num_labelled, num_unlabelled=args.num_unlabelled,
                             num_test=args.num_test, seed=args.seed, size=args.size, spacing_mode=args.spacing,
                             overwrite=args.overwrite, report=print)
    print(f"wrote {workspace.dataset_json}")
    return 0


def entry() -> None:
    sys.exit(run_command("covnet_make_phantoms", main))


if __name__ == "__main__":
    entry()
