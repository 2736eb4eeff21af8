#!/usr/bin/env python3
"""CPU inference runtimes for covnet's network: torch (float32, bfloat16 autocast), ONNX Runtime and OpenVINO
(float32 and bfloat16 inference precision), on one batch of windows of a checkpoint's plan (issue 16: adopt a
runtime only if it is faster than torch with the same outputs).

    pip install --target /tmp/runtimes onnxruntime onnx openvino    # not covnet dependencies
    PYTHONPATH=/tmp/runtimes python benchmarks/cpu_runtimes.py --checkpoint M.pth [--batch 2] [--out R.json]

For each runtime: the median time of ``--repeats`` forwards (after one warm-up) of a random batch, and the share
of voxels whose argmax equals torch float32's (the same outputs); for ONNX Runtime and OpenVINO also the time to
convert the network (``torch.onnx.export``, ``openvino.convert_model``). A runtime whose package is missing is
left out. Speed figures are only meaningful on an otherwise idle machine (the load average is recorded).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covnet.checkpoint import Checkpoint  # noqa: E402
from covnet.inference.cpu_runtime import FullResolution  # noqa: E402
from covnet.inference.openvino_cache import openvino_without_telemetry  # noqa: E402
from covnet.network.unet import ResidualEncoderUNet  # noqa: E402


def median_seconds(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    checkpoint = Checkpoint.load(args.checkpoint)
    plan = checkpoint.typed_plan
    network = ResidualEncoderUNet(plan.network).eval()
    network.load_state_dict(checkpoint.network_state)
    model = FullResolution(network).eval()
    batch = torch.randn(args.batch, plan.in_channels, *plan.patch_size)
    threads = torch.get_num_threads()
    rows = {}

    def record(name, seconds, logits, **extra):
        rows[name] = {"seconds_per_batch": seconds,
                      "argmax_agreement_with_torch_float32": float((logits.argmax(1) == reference).float().mean()),
                      **extra}
        print(name, json.dumps(rows[name]), flush=True)

    with torch.inference_mode():
        reference_logits = model(batch).float()
        reference = reference_logits.argmax(1)
        record("torch float32", median_seconds(lambda: model(batch), args.repeats), reference_logits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            record("torch bfloat16 autocast", median_seconds(lambda: model(batch), args.repeats), model(batch).float())

    with tempfile.TemporaryDirectory() as folder:
        onnx_file = Path(folder) / "network.onnx"
        if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
            import onnxruntime
            started = time.perf_counter()
            torch.onnx.export(model, (batch,), onnx_file, input_names=["x"], output_names=["logits"], dynamo=False)
            export_seconds = time.perf_counter() - started
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
            inputs = {"x": batch.numpy()}
            record(f"onnxruntime {onnxruntime.__version__} float32",
                   median_seconds(lambda: session.run(None, inputs), args.repeats),
                   torch.from_numpy(session.run(None, inputs)[0]), convert_seconds=export_seconds)
        if importlib.util.find_spec("openvino"):
            openvino = openvino_without_telemetry()
            started = time.perf_counter()
            converted = openvino.convert_model(model, example_input=batch)
            convert_seconds = time.perf_counter() - started
            for precision in ("f32", "bf16"):
                compiled = openvino.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                                            "INFERENCE_NUM_THREADS": threads})
                request = compiled.create_infer_request()
                inputs = {0: batch.numpy()}
                record(f"openvino {openvino.__version__} {precision}",
                       median_seconds(lambda: request.infer(inputs), args.repeats),
                       torch.from_numpy(np.array(request.infer(inputs)[compiled.output(0)])),
                       convert_seconds=convert_seconds)

    result = {"checkpoint": str(args.checkpoint), "window": list(plan.patch_size), "batch": args.batch,
              "threads": threads, "torch": torch.__version__, "load_average": list(os.getloadavg()), "runtimes": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
