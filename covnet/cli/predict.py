"""``covnet_predict -i IN -o OUT``: segment every CT of a folder with the trained model(s), and report.

The model is loaded once with the Python API (``covnet.load_model``) and every case is segmented with its
``Model.segment`` (:mod:`covnet.inference.cohort`): there is no second inference path.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import torch

from covnet.api import PREDICT_SETTINGS, load_model
from covnet.cli.common import add_workspace_argument, run_command, workspace_from
from covnet.inference.cohort import CohortSettings, predict_cohort, prepare_output_folder
from covnet.inference.cpu_runtime import AUTO, RUNTIMES, resolve_runtime
from covnet.inference.inputs import BOTH, DICOM_SEG, NIFTI, OUTPUT_TYPES, SEG_SUFFIX, check_output_folder, find_cohort
from covnet.inference.lung_box import LungBoxSettings
from covnet.inference.model_choice import CHECKPOINT_CHOICES
from covnet.inference.predictor import (
    ACCURATE,
    FAST,
    InferenceSettings,
    default_speed_mode,
    speed_mode_settings,
    valid_window_scale,
)
from covnet.runtime.devices import resolve_device
from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger
from covnet.runtime.sharding import part_id_for, shard

PROGRAM = "covnet_predict"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Segment lungs and COVID-19 infection in every CT under a folder (NIfTI/MHA/NRRD files, "
                    "with or without the _0000 suffix, and DICOM series folders, at any depth). Each label map "
                    "has its CT's grid and format; a DICOM series gets a DICOM-SEG of itself (<folder>"
                    f"{SEG_SUFFIX}) unless --output-type says otherwise; OUT/report.csv and "
                    "report.json hold each case's lung and infection volumes. Label maps among the inputs are "
                    "skipped with a warning; images that are not CTs in HU, or whose grid is degenerate or "
                    "implausible, fail with one line each (exit 2 at the end).")
    parser.add_argument("-i", "--input", required=True, type=Path,
                        help="folder of CTs, one CT file, or one file of a DICOM series (to pick that series in a "
                             "folder holding several)")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="folder for the label maps and report (inside -i is allowed: its contents are never "
                             "read as inputs)")
    add_workspace_argument(parser)
    parser.add_argument("--model", type=Path, default=None,
                        help="a model zip (covnet_export_model: checked and installed once into the model cache), "
                             "a results folder copied from another machine (holding fold_*/checkpoint_*.pth or "
                             "selftrain/final/), one model's folder, or a checkpoint file (default: the "
                             "workspace's results/)")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="predict with these folds (0-4, all); default: a model zip's own folds, else the "
                             "self-trained model if there is one, else every trained fold, else fold_all")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default=None,
                        help="checkpoint_final.pth or checkpoint_best.pth of each model (default: a model zip's "
                             "own, else final)")
    parser.add_argument("--output-type", choices=OUTPUT_TYPES, default=None,
                        help=f"{NIFTI}: a label map in the input's format (a DICOM series: <case>.nii.gz); "
                             f"{DICOM_SEG}: a DICOM-SEG of the DICOM series (<case>{SEG_SUFFIX}; DICOM input "
                             f"only); {BOTH}: a label map for every case and a DICOM-SEG for each DICOM series. "
                             "Default: the input's own kind, a DICOM-SEG for a DICOM series and a label map for a "
                             "file. Files of another output type already in OUT are kept")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--fast", dest="speed_mode", action="store_const", const=FAST,
                       help="fast mode (the default on a CPU): the sliding window covers only the box of the "
                            "air-filled lungs (plus 20 mm), with windows twice the patch in-plane, without test-time "
                            "mirroring")
    speed.add_argument("--accurate", dest="speed_mode", action="store_const", const=ACCURATE,
                       help="accurate mode (the default on a GPU): every window of the body box, mirrored along "
                            "z, y and x (8 passes)")
    parser.add_argument("--lung-box", action=argparse.BooleanOptionalAction, default=None,
                        help="restrict the sliding window to the box of the air-filled lungs plus 20 mm (default: "
                             "on in fast mode, off in accurate mode)")
    parser.add_argument("--mirror-axes", default=None, metavar="AXES",
                        help="test-time mirroring along these axes, e.g. zyx (8 passes) or x (the left-right "
                             "mirror, 2 passes) (default: none in fast mode, zyx in accurate mode)")
    parser.add_argument("--step-size", type=float, default=None,
                        help="sliding-window step: neighbouring windows overlap by 1 - this of the patch (default "
                             "0.5; larger is faster)")
    parser.add_argument("--window-scale", default=None, metavar="ZxYxX",
                        help="inference windows this many times the training patch along z, y and x (e.g. 1x2x2), "
                             "neighbours overlapping by half a patch, never larger than the image (default: "
                             f"{window_scale_text(FAST)} in fast mode, {window_scale_text(ACCURATE)} in accurate mode)")
    parser.add_argument("--disable-tta", action="store_true", help="no test-time mirroring (in either mode)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--runtime", choices=RUNTIMES, default=AUTO,
                        help="what runs the network: torch, or openvino (CPU only, 1.5x faster there; pip install "
                             "'covnet[openvino]'); auto: openvino on a CPU when it is installed, else torch")
    parser.add_argument("--fp32", action="store_true",
                        help="run the network in float32 (default: float16 autocast on CUDA, bfloat16 on CPUs "
                             "with AMX or AVX512-BF16, measured 2x faster there at the same Dice; others "
                             "always use float32)")
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="keep the raw argmax (default: keep the largest lung components and drop infection "
                             "outside the lungs)")
    parser.add_argument("--no-lateral-fix", action="store_true",
                        help="keep the network's left/right labels (default: each lung component gets the side of "
                             "the body's midline its centre lies on, lungs touching at the midline are split there, "
                             "and a warning says when the network had most lung voxels on the other side; on a CT "
                             "cropped to one lung, where the midline is unknown, the network's labels are kept)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write OUT/<case>.npz: float16 class probabilities on the CT's grid")
    parser.add_argument("--preview", action="store_true",
                        help="also write OUT/<case>.png: axial, coronal and sagittal slices with the labels")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="skip the cases already complete in OUT (after a kill, or to add new CTs)")
    parser.add_argument("--num-parts", type=int, default=1,
                        help="split the cases into this many parts, e.g. one per GPU (default 1)")
    parser.add_argument("--part-id", type=int, default=None,
                        help="which part this run does (0 .. num-parts - 1); required with --num-parts above 1")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.step_size is not None and not 0 < args.step_size <= 1:
        raise CovnetError(None, f"--step-size {args.step_size}: must be in (0, 1]")
    if args.mirror_axes is not None and args.disable_tta:
        raise CovnetError(None, "--mirror-axes and --disable-tta contradict each other: give one")
    mirror_axes(args.mirror_axes)
    window_scale(args.window_scale)
    if args.model is not None and args.workspace is not None:
        logger(__name__).warning(f"--workspace {args.workspace} is ignored: --model {args.model} is the model")
    check_output_folder(args.output)
    created = not args.output.exists()
    try:
        return _predict(args)
    finally:
        if created and args.output.is_dir() and not any(args.output.iterdir()):
            args.output.rmdir()             # a run that wrote nothing (it failed) leaves no empty folder


def mirror_axes(text: str | None) -> tuple[int, ...] | None:
    """``--mirror-axes``' letters (some of z, y, x, or ``none``) as axes of (z, y, x); None when not given."""
    if text is None:
        return None
    letters = "" if text.lower() == "none" else text.lower()
    if set(letters) - set("zyx") or len(set(letters)) != len(letters):
        raise CovnetError(None, f"--mirror-axes {text}: give some of the letters z, y, x (e.g. zyx or x), or none")
    return tuple(sorted("zyx".index(letter) for letter in letters))


def window_scale_text(mode: str) -> str:
    return "x".join(f"{scale:g}" for scale in speed_mode_settings(mode).window_scale)


def window_scale(text: str | None) -> tuple[float, float, float] | None:
    """``--window-scale ZxYxX`` as three factors of at least 1; None when not given."""
    if text is None:
        return None
    try:
        scale = tuple(float(part) for part in text.lower().split("x"))
    except ValueError:
        scale = ()
    if not valid_window_scale(scale):
        raise CovnetError(None, f"--window-scale {text}: give three factors of at least 1 for z, y and x, e.g. 1x2x2")
    return scale


def inference_settings(args: argparse.Namespace, mode: str, device: torch.device) -> InferenceSettings:
    """covnet_predict's settings: the speed mode's, then the flags that change them."""
    settings = speed_mode_settings(mode, dataclasses.replace(
        PREDICT_SETTINGS, postprocess=not args.no_postprocessing, lateral_fix=not args.no_lateral_fix,
        use_amp=not args.fp32))
    changes = {"runtime": resolve_runtime(args.runtime, device)}
    if args.step_size is not None:
        changes["step_size"] = args.step_size
    if args.window_scale is not None:
        changes["window_scale"] = window_scale(args.window_scale)
    if args.lung_box is not None:
        changes["lung_box"] = (settings.lung_box or LungBoxSettings()) if args.lung_box else None
    axes = mirror_axes(args.mirror_axes)
    if axes is not None:
        changes.update(use_mirroring=bool(axes), mirror_axes=axes or settings.mirror_axes)
    if args.disable_tta:
        changes["use_mirroring"] = False
    return dataclasses.replace(settings, **changes)


def mode_line(args: argparse.Namespace, mode: str, settings: InferenceSettings, device) -> str:
    """The first line: which mode, why, and what the network pass does."""
    if args.speed_mode:
        reason = f"--{mode}"
    else:
        where = "CPU" if device.type == "cpu" else "GPU"
        other = ACCURATE if mode == FAST else FAST
        reason = f"the default on a {where}; --{other} for the {'full prediction' if other == ACCURATE else 'fast one'}"
    return f"{PROGRAM}: {mode} mode ({reason}): {settings.describe()}"


def _predict(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    mode = args.speed_mode or default_speed_mode(device)
    inference = inference_settings(args, mode, device)
    print(mode_line(args, mode, inference, device), flush=True)
    settings = CohortSettings(save_probabilities=args.save_probabilities, preview=args.preview,
                              resume=args.resume, num_parts=args.num_parts,
                              part_id=part_id_for(args.num_parts, args.part_id))
    cases = find_cohort(args.input, args.output, args.output_type)
    shard(cases, settings.num_parts, settings.part_id)      # refused before the models load: a bad part,
    prepare_output_folder(args.output)                      # an output folder that cannot be written
    model = load_model(args.model if args.model is not None else workspace_from(args).results, folds=args.folds,
                       checkpoint=args.checkpoint, device=device, settings=inference)
    print(f"{len(cases)} case(s) in {args.input}; model: {model.description}; device: {model.device}")
    summary = predict_cohort(model, cases, args.output, settings)
    line = f"{len(summary.written)} case(s) written"
    if summary.skipped:
        line += f", {len(summary.skipped)} already done"
    if summary.label_maps:
        line += f", {len(summary.label_maps)} label map(s) skipped"
    if summary.failed:
        print(f"{PROGRAM}: {line}, {len(summary.failed)} failed: {', '.join(summary.failed)}", file=sys.stderr)
        return 2
    report = " and ".join(str(path) for path in summary.report_files) or "none (no case written)"
    print(f"{line}; report: {report}")
    return 0


def entry() -> None:
    sys.exit(run_command(PROGRAM, main))


if __name__ == "__main__":
    entry()
