"""``covnet_evaluate``: Dice and normalized surface Dice of a prediction folder against a reference folder."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from covnet.cli.common import positive_int, run_command
from covnet.dataset import DatasetDescription, covid_description
from covnet.evaluation.folders import evaluate_folders, format_mean_table
from covnet.runtime.atomic import sweep_dead_temporaries
from covnet.runtime.errors import CovnetError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covnet_evaluate",
        description="Per-case and mean Dice and normalized surface Dice (NSD tolerance 3 mm for infection, "
                    "1 mm otherwise) of predicted label maps against reference label maps, per label and region. "
                    "Where the reference holds the ignore label (if dataset.json declares one), no structure is "
                    "scored.")
    parser.add_argument("--ref", required=True, type=Path, help="folder of reference label files CASE<ending>")
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted label files of the same names")
    parser.add_argument("--labels", type=Path, default=None,
                        help="dataset.json naming labels and regions (default: <ref>/../dataset.json if it "
                             "exists, else the COVID-19-CT-Seg labels)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="summary JSON to write; a CSV with the same stem goes beside it "
                             "(default: <pred>/summary.json; never inside --ref)")
    parser.add_argument("-np", "--num-processes", type=positive_int, default=1, help="cases evaluated in parallel")
    return parser


def description_for(labels_file: Path | None, reference_dir: Path) -> DatasetDescription:
    if labels_file is not None:
        return DatasetDescription.load(labels_file)
    beside_reference = reference_dir.resolve().parent / "dataset.json"
    return DatasetDescription.load(beside_reference) if beside_reference.is_file() else covid_description()


def summary_path(output: Path | None, prediction_dir: Path, reference_dir: Path) -> Path:
    """``-o`` or ``<pred>/summary.json``; refused when it would land in the reference folder."""
    chosen = output if output is not None else prediction_dir / "summary.json"
    if chosen.resolve().parent == reference_dir.resolve():
        raise CovnetError(chosen, "would be written into the reference folder (--ref); choose another place with -o")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    description = description_for(args.labels, args.ref)
    output = summary_path(args.output, args.pred, args.ref)
    sweep_dead_temporaries(output.parent, recursive=False)
    summary = evaluate_folders(args.ref, args.pred, description, output_json=output,
                               num_processes=args.num_processes)
    print(format_mean_table(summary))
    print(f"written: {output} and {output.with_suffix('.csv')}")
    return 0


def entry() -> None:
    sys.exit(run_command("covnet_evaluate", main))


if __name__ == "__main__":
    entry()
