#!/usr/bin/env bash
# Fills .wheels/ (git-ignored) with the wheels that benchmarks/gpu.sh installs on an accelerator
# machine whose image has jax, flax, optax, orbax, transformers and torch but neither
# ml-collections nor tensorflow-datasets: those two (pure Python) and what importing them needs
# beyond that image (tensorflow-metadata, googleapis-common-protos, immutabledict, promise,
# toml, six: pure Python; wrapt: binary, for CPython 3.10-3.13). About 6 MB. Run it here (it
# needs the package index), then carry .wheels to the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .wheels
pure=(ml-collections==1.1.0 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0
      googleapis-common-protos immutabledict==4.3.1 toml==0.10.2 six)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .wheels "${pure[@]}"
"$PY" -m pip wheel -q --no-deps -w .wheels promise==2.3  # An sdist only: built here.
for v in 3.10 3.11 3.12 3.13; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .wheels "wrapt>=1.14"
done
ls .wheels
