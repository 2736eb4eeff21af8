"""Prediction on a real CT on the CPU: covnet_predict vs nnU-Net v2's nnUNetv2_predict, same image, same network.

Both tools get the identical NIfTI file (the chest CT, or a sub-volume cut by ``--crop Z0 Z1 Y0 Y1 X0 X1`` with
predict_real_ct.py's crop, geometry kept), a network of the same architecture and size with random weights
(speed and memory do not depend on them) and test-time mirroring on all 3 axes (``--tta``) or none:

* covnet: a checkpoint from ``predict_real_ct.py make-model`` (``--model``), run by predict_real_ct.py's
  ``predict`` (covnet_predict under ``/usr/bin/time -v``; network stage = its predict_sliding_window timer).
* nnU-Net v2 (only in its own venv, never imported here): from the plan inside that checkpoint this writes
  ``nnUNet_results/Dataset990_CovnetPlan/nnUNetTrainer__covnetPlans__3d_fullres/``: dataset.json, plans.json
  (3d_fullres with the plan's patch size, spacing, batch size, resampling orders and CT normalisation, clip
  bounds as percentile_00_5/99_5; a ResidualEncoderUNet with the plan's stages, features, kernels, strides,
  blocks and decoder convs, conv bias, InstanceNorm3d(eps 1e-5, affine), LeakyReLU, as nnU-Net's ResEnc
  planners write it) and fold_0/checkpoint_final.pth (random network_weights of the network that
  nnUNetTrainer.build_network_architecture builds in the nnU-Net venv, init_args, trainer_name, mirroring axes
  (0, 1, 2)). It runs ``nnUNetv2_predict ... -device cpu -npp 1 -nps 1 --verbose --disable_progress_bar
  [--disable_tta]`` under ``/usr/bin/time -v``, nnUNet_* variables set only in its environment, and stamps
  each line of its unbuffered output with its arrival time: network stage = "Input shape:" to "Prediction
  done" (its sliding window); window count and network input shape are read from the same log.

The output label maps' size, spacing, origin and direction are checked against the input. Precision differs:
covnet_predict autocasts the network to bfloat16 on CPUs with native bfloat16 (AMX / AVX512-BF16) unless
``--fp32`` is given here (passed on as covnet_predict --fp32); nnU-Net autocasts only on CUDA, so it always runs
float32 on the CPU.

Memory: ``/usr/bin/time -v`` gives the peak RSS of the largest single process, but nnUNetv2_predict runs a
forked Manager, a spawned preprocessing worker, a spawned export pool and a resource tracker beside its main
process. So the peak of the summed anonymous PSS (Pss_Anon + Pss_Shmem: heap, arrays, tensors, fork-shared
pages split between sharers) of all processes below this script is reported too, from /proc/PID/smaps_rollup
every ``--pss-interval`` s (a few ms per poll and GiB mapped; shorter peaks are missed); the JSON also has the
total PSS, whose file-backed part depends on what other processes map the same libraries. (Summed RSS would
count shared pages once per process, and a forked child before its exec as a full copy of its parent.)
/proc/loadavg is recorded before and after every run: other jobs distort the timings.

Usage:
    .venv/bin/python benchmarks/compare_nnunet_predict.py --work /tmp/cmp_predict \\
        [--model /tmp/prb/model_cpu/checkpoint_final.pth] [--crop 60 72 128 384 128 384] [--tta] [--fp32] \\
        [--tools covnet nnunet] [--json /tmp/cmp_predict/result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import predict_real_ct  # noqa: E402  (benchmarks/ is not a package)

DATASET = "Dataset990_CovnetPlan"
TRAINER, PLANS, CONFIGURATION = "nnUNetTrainer", "covnetPlans", "3d_fullres"
CASE = "ct"
# nnU-Net's --verbose lines that open and close its sliding window (predict_sliding_window_return_logits).
NETWORK_STAGE_MARKS = ("Input shape:", "Prediction done")

# Run by the nnU-Net venv's python: builds the network as nnU-Net's predictor will and saves random weights.
NNUNET_MAKE_MODEL = r'''
import json, sys
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json, maybe_mkdir_p
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

folder = sys.argv[1]
plans, dataset = load_json(join(folder, "plans.json")), load_json(join(folder, "dataset.json"))
manager = PlansManager(plans)
heads = manager.get_label_manager(dataset).num_segmentation_heads
torch.manual_seed(0)
network = nnUNetTrainer.build_network_architecture(manager, manager.get_configuration("3d_fullres"),
                                                   len(dataset["channel_names"]), heads, enable_deep_supervision=True)
maybe_mkdir_p(join(folder, "fold_0"))
torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 0,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                          "device": "cpu"}},
           join(folder, "fold_0", "checkpoint_final.pth"))
print("RESULT " + json.dumps({"parameters": sum(p.numel() for p in network.parameters()),
                              "network_class": type(network).__module__ + "." + type(network).__name__,
                              "torch": torch.__version__}))
'''


def nnunet_plans(plan: dict) -> dict:
    """nnU-Net v2 plans.json with one 3d_fullres configuration equivalent to a covnet plan."""
    network, resampling = plan["network"], plan["resampling"]
    intensity = {}
    for channel, norm in plan["normalization"].items():
        if norm["scheme"] != "CT":
            sys.exit(f"channel {channel}: only CT normalisation is converted, not {norm['scheme']}")
        intensity[channel] = {"mean": norm["mean"], "std": norm["std"],
                              "percentile_00_5": norm["clip"][0], "percentile_99_5": norm["clip"][1]}

    def resample(order: int, is_seg: bool) -> dict:
        return {"is_seg": is_seg, "order": order, "order_z": resampling["order_z"], "force_separate_z": None,
                "separate_z_anisotropy_threshold": resampling["anisotropy_threshold"]}

    configuration = {
        "data_identifier": f"{PLANS}_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": plan["batch_size"], "patch_size": plan["patch_size"],
        "median_image_size_in_voxels": plan["median_shape"], "spacing": plan["target_spacing"],
        "normalization_schemes": ["CTNormalization"] * len(intensity), "use_mask_for_norm": [False] * len(intensity),
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resample(resampling["image_order"], False),
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": resample(resampling["segmentation_order"], True),
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": resample(resampling["segmentation_order"], False),
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "arch_kwargs": {
                "n_stages": len(network["features_per_stage"]), "features_per_stage": network["features_per_stage"],
                "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": network["kernel_sizes"],
                "strides": network["strides"], "n_blocks_per_stage": network["n_blocks_per_stage"],
                "n_conv_per_stage_decoder": network["n_conv_per_stage_decoder"], "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }
    return {"dataset_name": DATASET, "plans_name": PLANS,
            "original_median_spacing_after_transp": plan["target_spacing"],
            "original_median_shape_after_transp": plan["median_shape"], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {CONFIGURATION: configuration}, "experiment_planner_used": "nnUNetPlannerResEncM",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": intensity}


def make_nnunet_model(plan: dict, work: Path, nnunet_python: Path, env: dict) -> dict:
    folder = Path(env["nnUNet_results"]) / DATASET / f"{TRAINER}__{PLANS}__{CONFIGURATION}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(nnunet_plans(plan), indent=1))
    dataset = {"channel_names": plan["channel_names"], "labels": plan["labels"], "numTraining": 0,
               "file_ending": ".nii.gz", "name": "CovnetPlan"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    driver = work / "nnunet_make_model.py"
    driver.write_text(NNUNET_MAKE_MODEL)
    completed = subprocess.run([str(nnunet_python), str(driver), str(folder)], env=env, capture_output=True, text=True, encoding="utf-8")
    if completed.returncode != 0:
        sys.exit(f"building the nnU-Net model failed:\n{completed.stderr[-3000:]}")
    line = [x for x in completed.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


class TreePeakPss:
    """Peaks over time of the summed PSS and anonymous PSS (MiB) of all descendants of this process."""

    def __init__(self, interval_s: float):
        self.interval_s, self.peak_mib = interval_s, {"pss": None, "anon_pss": None}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        if self.interval_s > 0:
            self.peak_mib = {"pss": 0.0, "anon_pss": 0.0}
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def peaks(self) -> dict:
        return {f"tree_peak_{key}_mib": mib for key, mib in self.peak_mib.items()}

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            for key, mib in descendants_pss_mib(os.getpid()).items():
                self.peak_mib[key] = max(self.peak_mib[key], mib)


def descendants_pss_mib(root: int) -> dict:
    """{"pss": Pss, "anon_pss": Pss_Anon + Pss_Shmem} summed over the process tree below ``root``, in MiB."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    kib, stack = {"Pss": 0, "Pss_Anon": 0, "Pss_Shmem": 0}, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            name, value = line.split(":", 1)[0], line.split()[1]
            if name in kib:
                kib[name] += int(value)
    return {"pss": kib["Pss"] / 1024, "anon_pss": (kib["Pss_Anon"] + kib["Pss_Shmem"]) / 1024}


def geometry(path: Path) -> dict:
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {"size_xyz": list(reader.GetSize()), "spacing": [round(v, 4) for v in reader.GetSpacing()],
            "origin": [round(v, 3) for v in reader.GetOrigin()],
            "direction": [round(v, 5) for v in reader.GetDirection()]}


def run_nnunet(input_file: Path, work: Path, nnunet_bin: Path, env: dict, tta: bool,
               pss_interval_s: float) -> dict:
    source, output = work / "nnunet_in", work / "nnunet_out"
    for folder in (source, output):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    (source / f"{CASE}_0000.nii.gz").symlink_to(input_file.resolve())
    time_file, log = work / "nnunet_time.txt", work / "nnunet_predict.log"
    command = ["/usr/bin/time", "-v", "-o", str(time_file), str(nnunet_bin / "nnUNetv2_predict"),
               "-i", str(source), "-o", str(output), "-d", DATASET, "-c", CONFIGURATION, "-f", "0", "-tr", TRAINER,
               "-p", PLANS, "-device", "cpu", "-npp", "1", "-nps", "1", "--verbose", "--disable_progress_bar"]
    if not tta:
        command.append("--disable_tta")
    load_before, started, marks = predict_real_ct.load_average(), time.perf_counter(), {}
    with TreePeakPss(pss_interval_s) as tree, open(log, "w") as out:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                                   env=dict(env, PYTHONUNBUFFERED="1"))
        for line in process.stdout:        # unbuffered, so a line's arrival time is when it was printed
            now = time.perf_counter() - started
            out.write(f"{now:9.3f} {line}")
            for mark in NETWORK_STAGE_MARKS:
                if line.startswith(mark):
                    marks.setdefault(mark, now)
    load_after = predict_real_ct.load_average()
    if process.wait() != 0:
        sys.exit(f"nnUNetv2_predict failed ({process.returncode}); see {log}")
    text = log.read_text()
    shape = re.search(r"Input shape: torch\.Size\(\[\d+, (\d+), (\d+), (\d+)\]\)", text)
    steps = re.search(r"n_steps (\d+)", text)
    time_v = predict_real_ct._parse_time_v(time_file.read_text())
    stage = [marks.get(mark) for mark in NETWORK_STAGE_MARKS]
    return {"wall_s": time_v["elapsed_s"], "peak_rss_mib": time_v["peak_rss_mib"], "user_s": time_v["user_s"],
            "system_s": time_v["system_s"], **tree.peaks(),
            "network_input_shape": [int(v) for v in shape.groups()] if shape else None,
            "windows": int(steps.group(1)) if steps else None,
            "network_stage_s": stage[1] - stage[0] if None not in stage else None,
            "load_average_before": load_before, "load_average_after": load_after,
            "output_file": str(output / f"{CASE}.nii.gz"), "log": str(log), "precision": "fp32"}


def run_covnet(input_file: Path, model: Path, work: Path, tta: bool, fp32: bool, pss_interval_s: float) -> dict:
    from covnet.runtime.precision import cpu_has_native_bfloat16
    out = work / "covnet"
    shutil.rmtree(out / "in", ignore_errors=True)
    with TreePeakPss(pss_interval_s) as tree:
        code = predict_real_ct.predict(argparse.Namespace(image=input_file, model=model, out=out, crop=None, tta=tta,
                                                          fp32=fp32))
    if code != 0:
        sys.exit(f"covnet predict failed ({code}); see {out}/child_stderr.txt")
    result = json.loads((out / "result.json").read_text())
    outputs = sorted((out / "out").glob("*.nii.gz"))
    return {"wall_s": result["wall_s"], "peak_rss_mib": result["peak_rss_mib"], "user_s": result["user_s"],
            "system_s": result["system_s"], **tree.peaks(),
            "network_input_shape": result["windows"]["image_shape"], "windows": result["windows"]["windows"],
            "network_stage_s": result["network_stage_s"], "load_average_before": result["load_average_before"],
            "load_average_after": result["load_average_after"], "output_file": str(outputs[0]),
            "details": str(out / "result.json"),
            "precision": "bf16 autocast" if cpu_has_native_bfloat16() and not fp32 else "fp32"}


def cell(value, spec: str = "") -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(runs: list[dict]) -> str:
    header = ["tool", "TTA", "precision", "input z×y×x", "network input z×y×x", "windows", "wall s",
              "network stage s", "peak RSS MiB (largest process)", "peak anon. PSS MiB (process tree)",
              "load before → after", "parameters"]
    rows = [[r["tool"], "on" if r["tta"] else "off", r["precision"], "×".join(map(str, r["input_shape"])),
             "×".join(map(str, r["network_input_shape"] or ["?"])), cell(r["windows"]), f"{r['wall_s']:.1f}",
             cell(r["network_stage_s"], ".1f"), f"{r['peak_rss_mib']:.0f}", cell(r["tree_peak_anon_pss_mib"], ".0f"),
             f"{r['load_average_before']} → {r['load_average_after']}", f"{r['parameters']:,}"] for r in runs]
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cmp_predict"))
    parser.add_argument("--model", type=Path, default=Path("/tmp/prb/model_cpu/checkpoint_final.pth"),
                        help="covnet checkpoint (predict_real_ct.py make-model); its plan defines both networks")
    parser.add_argument("--image", type=Path, default=predict_real_ct.DEFAULT_IMAGE)
    parser.add_argument("--crop", type=int, nargs=6, metavar=("Z0", "Z1", "Y0", "Y1", "X0", "X1"),
                        help="predict this sub-volume (voxel index ranges, geometry kept) instead of the whole CT")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring on (default off)")
    parser.add_argument("--fp32", action="store_true",
                        help="covnet in float32 too (default: its bfloat16 autocast where the CPU has it)")
    parser.add_argument("--tools", nargs="+", choices=("covnet", "nnunet"), default=["covnet", "nnunet"])
    parser.add_argument("--nnunet-venv", type=Path, default=Path("/tmp/nnunet_venv"))
    parser.add_argument("--pss-interval", type=float, default=0.5,
                        help="seconds between polls of the process tree's PSS (0: off, no polling overhead)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.image.exists():
        sys.exit(f"{args.image}: not found (../shared/data/real_ct is not part of the repository)")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    from covnet.checkpoint import Checkpoint
    checkpoint = Checkpoint.load(args.model)
    covnet_parameters = sum(v.numel() for v in checkpoint.network_state.values() if v.is_floating_point())
    shutil.rmtree(work / "input", ignore_errors=True)
    input_file = predict_real_ct._prepare_input(args.image, work / "input", args.crop)
    input_geometry = geometry(input_file)
    env = dict(os.environ, **{name: str(work / name) for name in ("nnUNet_raw", "nnUNet_preprocessed",
                                                                   "nnUNet_results")})

    runs = []
    for tool in args.tools:
        started = time.strftime("%H:%M:%S")
        if tool == "nnunet":
            facts = make_nnunet_model(checkpoint.plan, work, args.nnunet_venv / "bin" / "python", env)
            result = {**run_nnunet(input_file, work, args.nnunet_venv / "bin", env, args.tta, args.pss_interval),
                      **facts}
        else:
            result = {**run_covnet(input_file, args.model, work, args.tta, args.fp32, args.pss_interval),
                      "parameters": covnet_parameters}
        output_geometry = geometry(Path(result["output_file"]))
        result.update(tool=tool, tta=args.tta, started=started, input_file=str(input_file), crop=args.crop,
                      input_shape=input_geometry["size_xyz"][::-1], input_geometry=input_geometry,
                      output_geometry=output_geometry, output_geometry_matches_input=output_geometry == input_geometry)
        runs.append(result)
        print(f"{tool}: wall {result['wall_s']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB (largest process), "
              f"peak anonymous PSS {cell(result['tree_peak_anon_pss_mib'], '.0f')} MiB (process tree), "
              f"output geometry matches input: {result['output_geometry_matches_input']}", flush=True)
    print()
    print(markdown_table(runs))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
