#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check needs on the GPU machine, which has no internet: the wheels of the Python
# packages its image lacks, and the real chest CT, both into the ignored folder .gpu/ (carried by the run).
#
#   benchmarks/gpu_wheels.sh [CT]      # CT: default ../shared/data/real_ct/chest_ct_512x512x141.nii.gz
#
# The GPU machine's Python (3.12, x86_64) already has torch, numpy, scipy, scikit-image, matplotlib, tqdm,
# pandas, pillow, httpx, msgpack and threadpoolctl. covnet imports, beyond those: SimpleITK, batchgenerators,
# batchgeneratorsv2 and acvl_utils, whose imports pull in connected-components-3d (cc3d) and blosc2, which
# imports ndindex (and numexpr before blosc2 4.16): those are carried where this venv has them, skipped where
# it does not (the check reports them, and fails only on what covnet imports itself). The other requirements in their metadata (future, unittest2, pydantic, ...)
# are never imported by covnet and are not carried; nor are highdicom and pydicom (only covnet/export needs them).
# Pins are this checkout's .venv versions. Everything must fit the 64 MiB that one run may carry, repository
# included: wheels are recompressed with LZMA and the CT packed losslessly (benchmarks/gpu_check/packing.py),
# and the script ends with the sizes and fails when they do not fit.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
CARRY=.gpu
WHEELS=$CARRY/wheels
CT=${1:-../shared/data/real_ct/chest_ct_512x512x141.nii.gz}
LIMIT_MIB=64
DISTRIBUTIONS="simpleitk batchgenerators batchgeneratorsv2 acvl-utils"
TRANSITIVE="connected-components-3d blosc2 ndindex numexpr"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

normalized() { tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/-/g'; }
mkdir -p "$WHEELS" "$CARRY/data"
freeze=$("$PYTHON" -m pip freeze 2>/dev/null)

for name in $DISTRIBUTIONS $TRANSITIVE; do
    version=$(echo "$freeze" | awk -F'==' -v want="$name" '
        { n = tolower($1); gsub(/[-_.]+/, "-", n); if (n == want) print $2 }')
    if [ -z "$version" ] && [[ " $TRANSITIVE " == *" $name "* ]]; then
        echo "$name: not installed in $PYTHON's environment, so not needed there: not carried"
        continue
    elif [ -z "$version" ]; then
        echo "gpu_wheels.sh: $name is not installed in $PYTHON's environment: run make venv first" >&2
        exit 1
    fi
    stem=$(echo "$name" | sed 's/-/_/g')
    for old in "$WHEELS"/"$stem"-*.whl; do      # one version of each: two would stop the install there
        if [ -e "$old" ] && [[ "$(basename "$old")" != "$stem-$version-"* ]]; then rm -v "$old"; fi
    done
    if compgen -G "$WHEELS/$stem-$version-*.whl" >/dev/null; then
        echo "$name==$version: already in $WHEELS"
        continue
    fi
    # shellcheck disable=SC2086
    if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            $PLATFORMS -d "$WHEELS" "$name==$version"; then
        # acvl-utils publishes only a source archive: build its (pure-Python) wheel here.
        echo "$name==$version: no binary wheel; building one"
        "$PYTHON" -m pip wheel --quiet --no-deps -w "$WHEELS" "$name==$version"
        if ! compgen -G "$WHEELS/$stem-$version-py3-none-any.whl" >/dev/null; then
            echo "gpu_wheels.sh: $name==$version did not build a pure-Python wheel; it cannot travel" >&2
            exit 1
        fi
    fi
done

echo "recompressing the wheels with LZMA (a few minutes for SimpleITK, once)"
"$PYTHON" -m benchmarks.gpu_check.packing recompress-wheels "$WHEELS"

packed="$CARRY/data/$(basename "$CT").pack"
if [ ! -f "$packed" ] || [ "$CT" -nt "$packed" ]; then
    echo "packing $CT (about a minute)"
    "$PYTHON" -m benchmarks.gpu_check.packing pack "$CT" "$packed"
fi

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo
echo "what the run carries:"
for file in "$WHEELS"/*.whl "$packed"; do
    printf "  %8s MiB  %s\n" "$(mib "$(stat -c %s "$file")")" "$file"
done
wheels=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
ct=$(stat -c %s "$packed")
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + ct + tree))
echo "  wheels $(mib "$wheels") MiB + CT $(mib "$ct") MiB + working tree $(mib "$tree") MiB = $(mib "$total") MiB" \
     "of the $LIMIT_MIB MiB a run may carry"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu_wheels.sh: over the $LIMIT_MIB MiB limit" >&2
    exit 1
fi
