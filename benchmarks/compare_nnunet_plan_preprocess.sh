#!/usr/bin/env bash
# Whole-dataset plan + preprocess time: covnet vs nnU-Net v2 on the same phantom CTs.
#
# Usage: benchmarks/compare_nnunet_plan_preprocess.sh [NUM_CASES] [SIZE]
#   NNUNET_VENV   a separate venv with nnunetv2 installed (default /tmp/nnunet_venv); nnunetv2 is never a
#                 covnet dependency:  python3 -m venv /tmp/nnunet_venv && /tmp/nnunet_venv/bin/pip install
#                 torch==2.13.0 nnunetv2
#   COVNET_VENV   covnet's venv (default .venv)
# Both tools get the same 20 labelled phantoms (no unlabelled pool, so covnet does not do extra work) and
# 2 worker processes. Times are wall-clock seconds of the whole command, fingerprinting included.
set -euo pipefail
cases=${1:-20}
size=${2:-small}
nnunet_venv=${NNUNET_VENV:-/tmp/nnunet_venv}
covnet_venv=${COVNET_VENV:-.venv}
work=$(mktemp -d /tmp/covnet-vs-nnunet.XXXX)
trap 'rm -rf "$work"' EXIT

"$covnet_venv/bin/covnet_make_phantoms" --workspace "$work/covnet" --num-labelled "$cases" --num-unlabelled 0 \
    --num-test 0 --size "$size" --seed 0 > /dev/null

start=$(date +%s.%N)
"$covnet_venv/bin/covnet_plan_and_preprocess" --workspace "$work/covnet" -np 2 > "$work/covnet.runtime.log" 2>&1
covnet_seconds=$(echo "$(date +%s.%N) - $start" | bc)

export nnUNet_raw="$work/nnunet_raw" nnUNet_preprocessed="$work/nnunet_preprocessed" nnUNet_results="$work/nnunet_results"
mkdir -p "$nnUNet_raw/Dataset501_Phantoms"
for part in imagesTr labelsTr dataset.json; do
    cp -r "$work/covnet/raw/$part" "$nnUNet_raw/Dataset501_Phantoms/"
done
start=$(date +%s.%N)
"$nnunet_venv/bin/nnUNetv2_plan_and_preprocess" -d 501 -c 3d_fullres -np 2 > "$work/nnunet.log" 2>&1
nnunet_seconds=$(echo "$(date +%s.%N) - $start" | bc)

echo "cases=$cases size=$size"
printf "covnet_plan_and_preprocess -np 2                          %6.1f s\n" "$covnet_seconds"
printf "nnUNetv2_plan_and_preprocess -c 3d_fullres -np 2          %6.1f s\n" "$nnunet_seconds"
grep -E "patch size|target spacing|batch size" "$work/covnet.runtime.log" | sed 's/^/covnet  /'
python3 - "$nnUNet_preprocessed/Dataset501_Phantoms/nnUNetPlans.json" <<'PY'
import json, sys
plan = json.load(open(sys.argv[1]))["configurations"]["3d_fullres"]
print(f"nnU-Net spacing {plan['spacing']} patch {plan['patch_size']} batch {plan['batch_size']}")
PY
