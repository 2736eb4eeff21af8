#!/bin/bash
# covnet_predict's speed modes end to end (the CLI, postprocessing and lateral fix included) on a workspace's test
# phantoms, scored against their truth: the CPU default (fast: lung box, windows 1x2x2, no mirroring; OpenVINO
# when installed), the same with torch, fast with windows of the patch, and the accurate mode (8 flips) as the
# reference. Usage: benchmarks/fast_predict_defaults.sh WORKSPACE CHECKPOINT OUT
set -euo pipefail
W=$1; M=$2; O=$3
mkdir -p "$O"
for run in "fast_default:" "fast_torch:--runtime torch" "fast_window_patch_torch:--runtime torch --window-scale 1x1x1" \
           "accurate_torch:--accurate --runtime torch"; do
  name=${run%%:*}; flags=${run#*:}
  rm -rf "${O:?}/$name"
  # shellcheck disable=SC2086
  /usr/bin/time -f "$name: wall %e s, peak RSS %M KB" covnet_predict -i "$W/raw/imagesTs" -o "$O/$name" --model "$M" \
      --device cpu $flags > "$O/$name.log" 2>&1
  head -1 "$O/$name.log"; tail -1 "$O/$name.log"
  covnet_evaluate --ref "$W/raw/labelsTs" --pred "$O/$name" -o "$O/$name.summary.json" > /dev/null
  rm -rf "${O:?}/$name"
done
python3 - "$O" <<'PY'
import json, statistics, sys
folder = sys.argv[1]
def cases(name):
    return {case["case"]: case for case in json.load(open(f"{folder}/{name}.summary.json"))["per_case"]}
reference = cases("accurate_torch")
for name in ("fast_default", "fast_torch", "fast_window_patch_torch", "accurate_torch"):
    run, parts = cases(name), []
    for key in ("lungs", "infection"):
        pairs = [(run[c][key]["dice"], reference[c][key]["dice"]) for c in run
                 if run[c][key]["dice"] is not None and reference[c][key]["dice"] is not None]
        deltas = [value - ref for value, ref in pairs]
        parts.append(f"{key} {statistics.mean(v for v, _ in pairs):.4f}, Δ {statistics.mean(deltas):+.4f} "
                     f"[{min(deltas):+.4f}, {max(deltas):+.4f}] (n={len(pairs)})")
    print(f"{name}: " + "; ".join(parts))
PY
