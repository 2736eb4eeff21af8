#!/usr/bin/env python3
"""covnet_predict on a real chest CT on the CPU: sliding-window efficiency, wall time against the network stage,
peak RSS, and where the rest of the time and memory goes.

Accuracy is irrelevant here, so the model is a plan's network with random weights (no training):

    covnet_make_phantoms --workspace W --size clinical --num-labelled 4 --num-unlabelled 0 --num-test 0
    covnet_plan_and_preprocess --workspace W --device cpu --plan-only
    python benchmarks/predict_real_ct.py make-model --plans W/preprocessed/plans.json --out M
    python benchmarks/predict_real_ct.py forward --model M/checkpoint_final.pth [--repeats 5]
    python benchmarks/predict_real_ct.py predict --model M/checkpoint_final.pth --out R [--mode accurate|fast|default]
        [--tta] [--fp32] [--crop ...] [--predict-args '--step-size 0.75 ...']

``forward`` preprocesses the CT as covnet_predict does, counts the sliding windows and times one network forward
of ``batch_windows`` real windows of it (1 untimed warm-up, then ``--repeats``), in this process.

``predict`` runs ``covnet_predict -i IN -o R/out --model M --device cpu --accurate [--disable-tta] [--fp32]`` (or
``--fast``, or the device's default mode, plus ``--predict-args``) under
``/usr/bin/time -v`` (peak RSS = its "Maximum resident set size", wall = its elapsed time, interpreter start and
imports included) in a child process that is covnet_predict's own ``main`` with timers wrapped around its stages
(read, preprocess, model load, sliding window, every network forward, export to the original grid, argmax,
postprocessing, report, write) and the process's VmRSS/VmHWM read from /proc before and after each. The
network stage is ``predict_sliding_window`` (windows, flips, Gaussian accumulation, normalisation, crop).
Sliding-window efficiency = windows × flips × single-window forward time ÷ network-stage time, where the
single-window forward time is the median time of the run's own full-batch forwards divided by batch_windows;
the fraction of the stage spent inside forwards (their sum ÷ stage) is printed too. ``--crop Z0 Z1 Y0 Y1 X0 X1``
predicts a sub-volume of the CT instead (voxel index ranges, geometry kept), for runs that are too long on the
whole CT (test-time mirroring is 8 forwards per window).

Results go to R/result.json (and stdout).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPOSITORY.parent / "shared" / "data" / "real_ct" / "chest_ct_512x512x141.nii.gz"


def proc_memory_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------------------------------------- make-model
def make_model(args) -> int:
    import torch

    from covnet.checkpoint import Checkpoint
    from covnet.network.unet import ResidualEncoderUNet
    from covnet.planning.plans import Plan
    plan = Plan.load(args.plans)
    torch.manual_seed(args.seed)
    network = ResidualEncoderUNet(plan.network)
    parameters = sum(p.numel() for p in network.parameters())
    path = Path(args.out) / "checkpoint_final.pth"
    Checkpoint(plan=plan.to_json(), fold="bench", settings={"random_weights": True, "seed": args.seed},
               network_state=network.state_dict()).save(path)
    print(f"{path}: random weights, {parameters / 1e6:.2f} M parameters, patch {plan.patch_size}, "
          f"features {list(plan.network.features_per_stage)}")
    return 0


# ---------------------------------------------------------------------------------------------- windows
def window_count(shape, patch_size, step_size):
    from covnet.inference.sliding_window import padding_to_patch, window_starts
    padded = [size + before + after for size, (before, after) in zip(shape, padding_to_patch(shape, patch_size))]
    per_axis = [len(starts) for starts in window_starts(padded, patch_size, step_size)]
    return math.prod(per_axis), per_axis, padded


def forward(args) -> int:
    import numpy as np
    import torch

    from covnet.checkpoint import Checkpoint
    from covnet.image.io import read_image
    from covnet.inference.predictor import InferenceSettings
    from covnet.network.unet import ResidualEncoderUNet
    from covnet.preprocessing.case import preprocess_case
    checkpoint = Checkpoint.load(args.model)
    plan = checkpoint.typed_plan
    settings = InferenceSettings()
    image, geometry = read_image(args.image)
    started = time.perf_counter()
    preprocessed, _, properties = preprocess_case("case", [image], geometry, plan)
    preprocess_s = time.perf_counter() - started
    windows, per_axis, padded = window_count(preprocessed.shape[1:], plan.patch_size, settings.step_size)
    network = ResidualEncoderUNet(plan.network).eval()
    network.load_state_dict(checkpoint.network_state)
    # batch_windows real windows from the middle of the image (values do not change float32 conv speed).
    patch = plan.patch_size
    rng = np.random.default_rng(0)
    windows_input = []
    for _ in range(settings.batch_windows):
        corner = [int(rng.integers(0, max(size - p, 0) + 1)) for size, p in zip(preprocessed.shape[1:], patch)]
        region = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        window = preprocessed[(slice(None), *region)]
        pad = [(0, 0)] + [(0, p - s) for s, p in zip(window.shape[1:], patch)]
        windows_input.append(np.pad(window, pad))
    batch = torch.from_numpy(np.stack(windows_input).astype(np.float32))
    times = []
    with torch.inference_mode():
        network(batch)                                  # warm-up
        for _ in range(args.repeats):
            started = time.perf_counter()
            network(batch)
            times.append(time.perf_counter() - started)
    result = {"model": str(args.model), "image": str(args.image), "patch_size": patch,
              "features": list(plan.network.features_per_stage), "threads": torch.get_num_threads(),
              "parameters": sum(p.numel() for p in network.parameters()),
              "input_shape": list(geometry.shape), "preprocessed_shape": list(preprocessed.shape[1:]),
              "padded_shape": padded, "windows_per_axis": per_axis, "windows": windows,
              "batch_windows": settings.batch_windows, "batches": math.ceil(windows / settings.batch_windows),
              "preprocess_s": preprocess_s, "batch_forward_s": times,
              "batch_forward_median_s": statistics.median(times), "batch_forward_min_s": min(times),
              "single_window_forward_s": statistics.median(times) / settings.batch_windows,
              "load_average": load_average()}
    result["network_stage_estimate_s_tta_off"] = result["batches"] * result["batch_forward_median_s"]
    result["network_stage_estimate_s_tta_on"] = 8 * result["network_stage_estimate_s_tta_off"]
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- predict
def _child(timings_file: Path, predict_args: list[str]) -> int:
    """covnet_predict's main with timers around its stages (this runs in the measured process)."""
    process_start = time.perf_counter()
    import threading

    import covnet.api as api
    import covnet.inference.cohort as cohort
    import covnet.inference.predictor as predictor
    import covnet.network.unet as unet
    from covnet.cli import predict as cli

    records: list[dict] = []
    forwards: list[tuple[int, float]] = []
    windows_info: list[dict] = []
    lock = threading.Lock()

    def timed(name, function):
        def wrapper(*args, **kwargs):
            rss_before, hwm_before = proc_memory_mib()
            started = time.perf_counter()
            result = function(*args, **kwargs)
            elapsed = time.perf_counter() - started
            rss_after, hwm_after = proc_memory_mib()
            with lock:
                records.append({"stage": name, "thread": threading.current_thread().name,
                                "start_s": started - process_start, "seconds": elapsed,
                                "rss_before_mib": rss_before, "rss_after_mib": rss_after,
                                "hwm_before_mib": hwm_before, "hwm_after_mib": hwm_after})
            return result
        return wrapper

    original_forward = unet.ResidualEncoderUNet.forward

    def forward(self, x):
        started = time.perf_counter()
        output = original_forward(self, x)
        forwards.append((int(x.shape[0]), time.perf_counter() - started))
        return output

    unet.ResidualEncoderUNet.forward = forward

    def with_info(sliding_window, kind):
        def sliding_window_with_info(network, image, patch_size, num_classes, **kwargs):
            shape = tuple(image.shape[1:])
            windows, per_axis, padded = window_count(shape, patch_size, kwargs.get("step_size", 0.5))
            windows_info.append({"pass": kind, "image_shape": list(shape), "padded_shape": padded,
                                 "patch_size": list(patch_size), "windows_per_axis": per_axis, "windows": windows,
                                 "flips": 2 ** len(tuple(kwargs.get("mirror_axes", ()))),
                                 "batch_windows": kwargs.get("batch_windows", 1)})
            return sliding_window(network, image, patch_size, num_classes, **kwargs)
        return sliding_window_with_info

    predictor.predict_sliding_window = timed("network stage (predict_sliding_window)",
                                             with_info(predictor.predict_sliding_window, "full"))
    predictor.Predictor.lung_region = timed("lung box (the lungs' air, region)", predictor.Predictor.lung_region)
    predictor.Predictor.predict_boxed = timed("predict_boxed (lung box, network stage, fold average)",
                                              predictor.Predictor.predict_boxed)
    predictor.Predictor.from_files = classmethod(timed("load model", predictor.Predictor.from_files.__func__))
    predictor.probabilities_to_original = timed("probabilities_to_original (resample back, uncrop, reorient)",
                                                predictor.probabilities_to_original)
    predictor.postprocess_segmentation = timed("postprocessing", predictor.postprocess_segmentation)
    predictor.Predictor.labels = timed("labels (argmax, postprocessing, lateral fix)", predictor.Predictor.labels)
    api.read_image = timed("read image", api.read_image)
    api.preprocess_case = timed("preprocess (reorient, crop, normalize, resample)", api.preprocess_case)
    api.case_report = timed("report row", api.case_report)
    cohort.write_image = timed("write label map", cohort.write_image)
    cohort.write_json = timed("write report row", cohort.write_json)
    cohort.rebuild_report = timed("rebuild report", cohort.rebuild_report)
    cli.predict_cohort = timed("predict_cohort", cli.predict_cohort)
    imports_s = time.perf_counter() - process_start
    code = timed("main", cli.main)(predict_args)
    timings_file.write_text(json.dumps({"imports_s": imports_s, "records": records, "forwards": forwards,
                                        "windows": windows_info}))
    return code


def _parse_time_v(text: str) -> dict:
    result = {}
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if match:
        result["peak_rss_mib"] = int(match.group(1)) / 1024
    match = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if match:
        seconds = 0.0
        for part in match.group(1).split(":"):
            seconds = seconds * 60 + float(part)
        result["elapsed_s"] = seconds
    for key, label in (("user_s", "User time (seconds)"), ("system_s", "System time (seconds)")):
        match = re.search(re.escape(label) + r": ([\d.]+)", text)
        if match:
            result[key] = float(match.group(1))
    return result


def _prepare_input(image: Path, folder: Path, crop) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if crop is None:
        target = folder / image.name
        if image.is_dir() and not target.exists():      # a DICOM series: copied (the input walk skips linked folders)
            import shutil
            shutil.copytree(image, target)
        elif not target.exists():
            target.symlink_to(image.resolve())
        return target
    import SimpleITK as sitk
    z0, z1, y0, y1, x0, x1 = crop
    target = folder / (image.name.split(".")[0] + f"_crop_z{z0}-{z1}_y{y0}-{y1}_x{x0}-{x1}.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(image))[x0:x1, y0:y1, z0:z1], str(target))   # SimpleITK slices x, y, z
    return target


def predict(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = _prepare_input(Path(args.image), out / "in", args.crop)
    timings_file, output = out / "timings.json", out / "out"
    if output.exists():
        import shutil
        shutil.rmtree(output)
    predict_args = ["-i", str(out / "in"), "-o", str(output), "--model", str(args.model), "--device", "cpu"]
    if args.mode == "accurate":
        predict_args += ["--accurate"] + ([] if args.tta else ["--disable-tta"])
    elif args.mode == "fast":
        predict_args.append("--fast")
    if args.fp32:
        predict_args.append("--fp32")
    predict_args += shlex.split(args.predict_args)
    command = ["/usr/bin/time", "-v", sys.executable, str(Path(__file__).resolve()), "_child",
               "--timings", str(timings_file), "--", *predict_args]
    load_before = load_average()
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, encoding="utf-8")
    wall = time.perf_counter() - started
    load_after = load_average()
    (out / "child_stdout.txt").write_text(completed.stdout)
    (out / "child_stderr.txt").write_text(completed.stderr)
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        return completed.returncode
    time_v = _parse_time_v(completed.stderr)
    timings = json.loads(timings_file.read_text())
    records = timings["records"]

    def seconds(name):
        return sum(r["seconds"] for r in records if r["stage"].startswith(name))

    passes = timings["windows"]
    batch_windows = passes[0]["batch_windows"]
    windows = sum(info["windows"] for info in passes)
    window_passes = sum(info["windows"] * info["flips"] for info in passes)
    full = [seconds for size, seconds in timings["forwards"] if size == batch_windows]
    batch_forward = statistics.median(full)
    single_window = batch_forward / batch_windows
    network_stage = seconds("network stage")
    forward_sum = sum(seconds for _, seconds in timings["forwards"])
    wall_time = time_v.get("elapsed_s", wall)
    result = {
        "image": str(args.image), "crop": args.crop, "input_file": str(source), "model": str(args.model),
        "covnet_predict_args": predict_args[8:], "first_line": completed.stdout.splitlines()[0],
        "tta": bool(args.tta), "fp32": bool(args.fp32), "load_average_before": load_before, "load_average_after": load_after,
        "passes": passes, "windows": windows, "window_passes": window_passes,
        "batches": sum(math.ceil(info["windows"] / batch_windows) for info in passes),
        "forwards": len(timings["forwards"]), "forward_batch_sizes": sorted({size for size, _ in timings["forwards"]}),
        "batch_forward_median_s": batch_forward, "batch_forward_min_s": min(full),
        "batch_forward_p90_s": sorted(full)[int(0.9 * (len(full) - 1))],
        "single_window_forward_s": single_window, "forward_sum_s": forward_sum,
        "network_stage_s": network_stage, "lung_box_s": seconds("lung box"),
        "efficiency": window_passes * single_window / network_stage,
        "forward_fraction_of_stage": forward_sum / network_stage,
        "wall_s": wall_time, "wall_over_network_stage": wall_time / network_stage,
        "peak_rss_mib": time_v.get("peak_rss_mib"), "user_s": time_v.get("user_s"), "system_s": time_v.get("system_s"),
        "imports_s": timings["imports_s"],
        "stages": [{key: (round(value, 3) if isinstance(value, float) else value) for key, value in r.items()}
                   for r in sorted(records, key=lambda r: r["start_s"])],
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(result["first_line"])
    for info in passes:
        print(f"{info['pass']} pass: input {info['image_shape']} windows {info['windows_per_axis']} = "
              f"{info['windows']}, flips {info['flips']}")
    print(f"{window_passes} window passes, batch {batch_windows}: {result['forwards']} forwards")
    print(f"batch forward median {batch_forward:.3f} s (min {min(full):.3f}), single window {single_window:.3f} s")
    print(f"network stage {network_stage:.1f} s (lung box {result['lung_box_s']:.1f} s), forwards sum {forward_sum:.1f} s, "
          f"efficiency {result['efficiency']:.3f} (forward fraction {result['forward_fraction_of_stage']:.3f})")
    print(f"covnet_predict wall {wall_time:.1f} s = {result['wall_over_network_stage']:.3f} × network stage; "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB; load {load_before} -> {load_after}")
    print(f"{'stage':<62} {'s':>8} {'RSS before':>10} {'after':>8} {'HWM after':>10}")
    for r in result["stages"]:
        print(f"{r['stage']:<62} {r['seconds']:>8.2f} {r['rss_before_mib']:>10.0f} {r['rss_after_mib']:>8.0f} "
              f"{r['hwm_after_mib']:>10.0f}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_child":
        separator = argv.index("--")
        parser = argparse.ArgumentParser()
        parser.add_argument("--timings", type=Path, required=True)
        child_args = parser.parse_args(argv[1:separator])
        return _child(child_args.timings, argv[separator + 1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-model", help="a checkpoint with random weights for a plan")
    make.add_argument("--plans", type=Path, required=True)
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--seed", type=int, default=0)
    fwd = commands.add_parser("forward", help="window count and one batch forward on the real CT, in-process")
    fwd.add_argument("--model", type=Path, required=True)
    fwd.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    fwd.add_argument("--repeats", type=int, default=5)
    fwd.add_argument("--json", type=Path)
    run = commands.add_parser("predict", help="covnet_predict under /usr/bin/time -v, with stage timers")
    run.add_argument("--model", type=Path, required=True)
    run.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--mode", choices=("accurate", "fast", "default"), default="accurate",
                     help="covnet_predict --accurate (the earlier measurements; --disable-tta unless --tta), --fast, "
                          "or neither (the device's default)")
    run.add_argument("--tta", action="store_true", help="--mode accurate: test-time mirroring on (default: off)")
    run.add_argument("--predict-args", default="", help="more covnet_predict flags, e.g. '--step-size 0.75'")
    run.add_argument("--fp32", action="store_true",
                     help="covnet_predict --fp32 (default: its autocast, bfloat16 on CPUs with native support)")
    run.add_argument("--crop", type=int, nargs=6, metavar=("Z0", "Z1", "Y0", "Y1", "X0", "X1"),
                     help="predict this sub-volume of the CT (voxel index ranges) instead of the whole CT")
    args = parser.parse_args(argv)
    if not args.image.exists() if hasattr(args, "image") else False:
        print(f"{args.image}: not found (../shared/data/real_ct is not part of the repository)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(REPOSITORY))
    return {"make-model": make_model, "forward": forward, "predict": predict}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
