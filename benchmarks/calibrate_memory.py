"""Calibrate covnet.planning.memory.CALIBRATED_BYTES_PER_ACTIVATION by measuring real training steps.

Each configuration (topology, patch size, batch size) runs in a fresh subprocess that builds the real
network, does a tiny warm-up step (so parameter gradients, momentum buffers and library caches already
exist), creates the input batch, records the baseline memory, then runs one forward + Dice/CE loss with
deep supervision + backward + SGD step and records the peak. The growth over the baseline is the
activation memory the estimate models; the parameter part of the estimate is exact arithmetic.

  CPU  (default): baseline = resident set from /proc/self/statm; peak = VmHWM after resetting it through
        /proc/self/clear_refs (falls back to getrusage ru_maxrss where that is not possible); glibc's
        mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the resident set.
  CUDA (--device cuda): torch.cuda.max_memory_allocated growth.

Precision: float32 by default; ``--amp`` runs the step under autocast instead (bfloat16 on CPU, float16 with a
GradScaler on CUDA), which calibrates ``CALIBRATED_BYTES_PER_ACTIVATION_AMP``. Under autocast the half-precision
copies of the weights are cached for the step; the model counts them in its parameter part
(``covnet.planning.memory.HALF_WEIGHT_BYTES`` per parameter), so they are subtracted before fitting.

Then fits bytes-per-element by least squares through the origin and prints a markdown table.

    .venv/bin/python benchmarks/calibrate_memory.py [--device cpu|cuda] [--amp] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from covnet.network.topology import Topology
from covnet.planning.memory import HALF_WEIGHT_BYTES, estimate_activation_elements, estimate_training_memory
from covnet.runtime.cpus import usable_cpu_count

IN_CHANNELS, NUM_CLASSES = 1, 4


def _topology(features, kernels, strides, blocks, decoder, deep_supervision=True) -> Topology:
    return Topology(in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, features_per_stage=features,
                    kernel_sizes=kernels, strides=strides, n_blocks_per_stage=blocks,
                    n_conv_per_stage_decoder=decoder, deep_supervision=deep_supervision)


K3, K133 = [3, 3, 3], [1, 3, 3]
ISOTROPIC_4 = _topology([16, 32, 64, 128], [K3] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3, [1, 2, 2, 2], [1, 1, 1])
ANISOTROPIC_5 = _topology([16, 32, 64, 128, 128], [K133, K133, K3, K3, K3],
                          [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], [1, 2, 3, 3, 3], [1, 1, 1, 1])
WIDE_NO_DS = _topology([32, 64, 128, 128], [K3] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3, [1, 1, 2, 2], [2, 2, 2],
                       deep_supervision=False)
NNUNET_6 = _topology([32, 64, 128, 256, 320, 320], [K3] * 6, [[1, 1, 1]] + [[2, 2, 2]] * 5,
                     [1, 3, 4, 6, 6, 6], [1, 1, 1, 1, 1])

CONFIGS = [  # (name, topology, patch_size (z, y, x), batch_size)
    ("iso4", ISOTROPIC_4, [32, 64, 64], 2),
    ("iso4", ISOTROPIC_4, [64, 96, 96], 2),
    ("iso4", ISOTROPIC_4, [64, 128, 128], 2),
    ("aniso5", ANISOTROPIC_5, [16, 96, 96], 2),
    ("aniso5", ANISOTROPIC_5, [32, 128, 128], 2),
    ("aniso5", ANISOTROPIC_5, [32, 192, 192], 1),
    ("wide_no_ds", WIDE_NO_DS, [48, 64, 64], 2),
    ("wide_no_ds", WIDE_NO_DS, [64, 96, 96], 2),
    ("nnunet6", NNUNET_6, [64, 64, 64], 1),
    ("nnunet6", NNUNET_6, [64, 96, 96], 2),
]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_resident() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_resident_bytes(peak_was_reset: bool) -> int:
    if peak_was_reset:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _deep_supervision_loss(outputs, targets):
    """Sum over resolutions of cross-entropy + (1 - soft Dice of the foreground classes), nnU-Net weights."""
    import torch
    import torch.nn.functional as F

    outputs = outputs if isinstance(outputs, list) else [outputs]
    weights = [0.5 ** i for i in range(len(outputs))]
    total = 0.0
    for weight, logits, target in zip(weights, outputs, targets):
        probabilities = torch.softmax(logits, 1)
        one_hot = F.one_hot(target, NUM_CLASSES).permute(0, 4, 1, 2, 3).float()
        axes = (2, 3, 4)
        intersection = (probabilities * one_hot).sum(axes)
        dice = (2 * intersection + 1e-5) / (probabilities.sum(axes) + one_hot.sum(axes) + 1e-5)
        total = total + weight * (F.cross_entropy(logits, target) + 1 - dice[:, 1:].mean())
    return total


def _saved_tensor_elements(network, x, targets) -> int:
    """Float elements of the distinct tensors autograd keeps (excluding parameters), plus the logits."""
    import torch

    parameter_storages = {p.untyped_storage().data_ptr() for p in network.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages and tensor.is_floating_point():
            saved[storage.data_ptr()] = storage.nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = network(x)
        loss = _deep_supervision_loss(outputs, targets)
    for logits in outputs if isinstance(outputs, list) else [outputs]:
        saved[logits.untyped_storage().data_ptr()] = logits.numel()
    del loss, outputs
    return sum(saved.values()) // x.shape[0]


def _targets_for(x, topology: Topology):
    """One target per training-mode output of the network, at that output's resolution."""
    import torch
    import torch.nn.functional as F

    target = torch.randint(0, NUM_CLASSES, (x.shape[0], *x.shape[2:]))
    targets = [target]
    for _, *shape in topology.logit_shapes(x.shape[2:])[1:]:
        targets.append(F.interpolate(target[:, None].float(), size=shape, mode="nearest")[:, 0].long())
    return targets


def run_worker(spec: dict) -> dict:
    """One configuration, in this (fresh) process. Returns the measured growth and the saved-tensor count."""
    import torch

    from covnet.network.unet import ResidualEncoderUNet

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    use_amp = spec.get("amp", False)
    topology, patch_size, batch_size = Topology.from_json(spec["topology"]), spec["patch_size"], spec["batch_size"]
    network = ResidualEncoderUNet(topology).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    # CPU autocast runs in bfloat16 (no loss scaling needed); CUDA AMP in float16 with a GradScaler.
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    def train_step(x, targets):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            loss = _deep_supervision_loss(network(x), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=False)  # keep gradients allocated: the baseline then holds them

    smallest_patch = list(topology.total_stride)
    smallest_patch[-1] *= 2  # instance norm needs more than one voxel in the bottleneck
    warm_up = torch.randn(1, IN_CHANNELS, *smallest_patch, device=device)
    train_step(warm_up, [t.to(device) for t in _targets_for(warm_up, topology)])
    del warm_up

    x = torch.randn(batch_size, IN_CHANNELS, *patch_size, device=device)
    targets = [t.to(device) for t in _targets_for(x, topology)]
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        train_step(x, targets)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        baseline = _resident_bytes()
        peak_was_reset = _reset_peak_resident()
        train_step(x, targets)
        peak = _peak_resident_bytes(peak_was_reset)
    seconds = time.perf_counter() - started
    saved_elements = None if use_amp else _saved_tensor_elements(network, x, targets)
    return {"measured_bytes": peak - baseline, "seconds": seconds, "saved_elements_per_sample": saved_elements}


def measure(name, topology: Topology, patch_size, batch_size, device, amp, threads) -> dict:
    spec = {"topology": topology.to_json(), "patch_size": patch_size, "batch_size": batch_size, "device": device,
            "amp": amp}
    # A fixed mmap threshold stops glibc from keeping freed tensor memory in its heap (its default threshold
    # grows up to 32 MB), so resident-set growth tracks the live tensors instead of the allocator's history.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               MALLOC_MMAP_THRESHOLD_="131072")
    completed = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                               capture_output=True, text=True, encoding="utf-8", env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"{name} {patch_size} x{batch_size} failed:\n{completed.stderr}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    elements = estimate_activation_elements(patch_size, topology)
    estimate = estimate_training_memory(patch_size, batch_size, topology, amp=amp)
    if amp:  # the autocast weight cache is part of the parameter model, not of the activations
        result["measured_bytes"] -= HALF_WEIGHT_BYTES * topology.parameter_count()
    return {"name": name, "patch_size": patch_size, "batch_size": batch_size, "amp": amp,
            "elements": elements * batch_size, "elements_per_sample": elements,
            "parameter_bytes": estimate.parameter_bytes, **result}


def fit_bytes_per_element(rows: list[dict]) -> float:
    """Least squares through the origin: measured ≈ c × elements."""
    return sum(r["measured_bytes"] * r["elements"] for r in rows) / sum(r["elements"] ** 2 for r in rows)


def markdown_table(rows: list[dict], bytes_per_element: float) -> str:
    lines = ["| network | patch (z,y,x) | batch | counted elements/sample | saved by autograd/sample "
             "| measured activation MB | estimate MB | rel. error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        estimate = bytes_per_element * r["elements"]
        saved = "-" if r["saved_elements_per_sample"] is None else f"{r['saved_elements_per_sample']:,}"
        lines.append(
            f"| {r['name']}{' amp' if r['amp'] else ''} | {'×'.join(map(str, r['patch_size']))} "
            f"| {r['batch_size']} | {r['elements_per_sample']:,} | {saved} | {r['measured_bytes'] / 1e6:,.0f} "
            f"| {estimate / 1e6:,.0f} | {(estimate - r['measured_bytes']) / r['measured_bytes']:+.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", action="store_true",
                        help="measure under autocast (bfloat16 on CPU, float16 + GradScaler on CUDA)")
    parser.add_argument("--threads", type=int, default=usable_cpu_count())
    parser.add_argument("--json", help="also write the raw rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    amp = args.amp
    rows = []
    for name, topology, patch_size, batch_size in CONFIGS:
        rows.append(measure(name, topology, patch_size, batch_size, args.device, amp, args.threads))
        print(f"measured {name} {patch_size} x{batch_size}: {rows[-1]['measured_bytes'] / 1e6:.0f} MB "
              f"in {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    constant = fit_bytes_per_element(rows)
    ratios = sorted(r["measured_bytes"] / r["elements"] for r in rows)
    errors = [abs(constant * r["elements"] - r["measured_bytes"]) / r["measured_bytes"] for r in rows]
    precision = ("bf16 autocast" if args.device == "cpu" else "fp16 autocast") if amp else "float32"
    print(f"\n## device={args.device} {precision}  threads={args.threads}")
    print(f"fitted bytes per activation element (least squares through origin): {constant:.3f}")
    print(f"median ratio: {ratios[len(ratios) // 2]:.3f}; range {ratios[0]:.3f}–{ratios[-1]:.3f}; "
          f"max relative error {max(errors):.1%}\n")
    print(markdown_table(rows, constant))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"bytes_per_element": constant, "rows": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
