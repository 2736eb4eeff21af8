"""``python -m benchmarks.gpu_check OUTDIR [--dry-run] [--budget-s 480] [--wheels DIR] [--ct FILE] [--work-dir DIR]
[--skip STEP ... | --only STEP ...]``

Writes OUTDIR/gpu_check.json (figures, rewritten after every step), OUTDIR/gpu_check.log (every command and
its output) and OUTDIR/cuda_tests.xml (the CUDA tests' JUnit report). Run from the repository root.
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

from benchmarks.gpu_check.runner import REPOSITORY, Budget, Report, utc_now
from benchmarks.gpu_check.scale import DRY_RUN, GPU
from benchmarks.gpu_check.steps import DRY_RUN_EXERCISES, Check, goals

CARRIED = REPOSITORY / ".gpu"
CT_NAME = "chest_ct_512x512x141.nii.gz"
STEPS = tuple(name for name in DRY_RUN_EXERCISES if name != "environment")
CT_CANDIDATES = (CARRIED / "data" / f"{CT_NAME}.pack", REPOSITORY.parent / "shared" / "data" / "real_ct" / CT_NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.log and cuda_tests.xml")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on the CPU at tiny sizes (what tests/test_gpu_check.py runs)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="stop starting steps, and cut commands short, when this many seconds are spent "
                             "(default 480: 8 minutes)")
    parser.add_argument("--wheels", type=Path, default=None,
                        help=f"install these wheels first, without network (default: {CARRIED / 'wheels'} when it "
                             "exists and this is no dry run)")
    parser.add_argument("--ct", type=Path, default=None,
                        help="the chest CT (.nii.gz, or packed by benchmarks/gpu_wheels.sh) (default: the first of "
                             f"{', '.join(str(path) for path in CT_CANDIDATES)} that exists; none: a clinical "
                             "phantom stands in)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--skip", nargs="+", default=(), choices=STEPS, metavar="STEP",
                        help=f"steps not to run (recorded as skipped), to give a later run's budget to the others: "
                             f"{', '.join(STEPS)}; the environment always runs")
    chosen.add_argument("--only", nargs="+", default=(), choices=STEPS, metavar="STEP",
                        help="run only these steps (and the environment); name the steps they need too, e.g. "
                             "--only clinical_data step_profile step_variants")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="phantoms, models and predictions (default: a new folder under the system's temp)")
    return parser


def skipped_steps(args: argparse.Namespace) -> list[str]:
    return [step for step in STEPS if step not in args.only] if args.only else list(args.skip)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    skip = skipped_steps(args)
    scale = DRY_RUN if args.dry_run else GPU
    wheels = args.wheels
    if wheels is None and not args.dry_run and (CARRIED / "wheels").is_dir():
        wheels = CARRIED / "wheels"
    ct = args.ct or next((path for path in CT_CANDIDATES if path.is_file()), None)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="covnet_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, Budget(args.budget_s), {
        "started": utc_now(), "dry_run": args.dry_run, "scale": scale.name, "device": scale.device,
        "command": " ".join(sys.argv), "work_dir": str(work), "wheels": str(wheels) if wheels else None,
        "ct": str(ct) if ct else None}, summarise=functools.partial(goals, dry_run=args.dry_run))
    report.log(f"covnet GPU check ({scale.name}): figures in {report.json_path}, work in {work}")
    try:
        Check(report, scale, work.resolve(), wheels=wheels, ct=ct, dry_run=args.dry_run, skip=skip).run()
    finally:
        report.data["finished"] = True
        report.write()
    statuses = {name: step["status"] for name, step in report.data["steps"].items()}
    report.log("done: " + ", ".join(f"{name} {status}" for name, status in statuses.items()))
    return 0 if all(status == "ok" for status in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
