#!/usr/bin/env bash
# The accelerator run of the side-by-side benchmark (benchmarks/side_by_side.py) on one GPU:
# instruct (JAX, bfloat16 compute) against Hugging Face transformers + PyTorch and TRL on the
# same device, for GPT-2 124M and Pythia-1B (`MODELS=...` to change): SFT step time and its
# fraction of the measured bf16 matmul peak (MFU), sampler tokens/s against the HBM-bandwidth
# bound, one PPO iteration with its rollout / scoring / update split, peak device memory.
#
#   bash benchmarks/gpu_wheels.sh            # here, once: .wheels/ for a machine without
#                                            # ml-collections / tensorflow-datasets
#   OUT=/path bash benchmarks/gpu.sh         # there; writes $OUT/side_by_side_gpu.{json,txt}
#
# It needs only python3 with jax (CUDA), flax, optax, orbax-checkpoint, transformers, torch
# (and trl, accelerate, datasets for the PPO peer; without them the peer skips PPO); the
# repository runs from its checkout (PYTHONPATH), nothing is installed from it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
if ! "$PY" -c "import ml_collections, tensorflow_datasets" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --find-links .wheels --no-deps ml-collections \
    tensorflow-datasets tensorflow-metadata googleapis-common-protos immutabledict promise toml \
    six wrapt
fi
PEER_PHASES=peak,sft,rollout,ppo
if ! "$PY" -c "import trl, datasets, accelerate" 2>/dev/null; then
  echo "TRL (or datasets, accelerate) is not installed: the peer's PPO phase is skipped"
  PEER_PHASES=peak,sft,rollout
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import jax; print(jax.devices())"
"$PY" benchmarks/side_by_side.py --models="${MODELS:-gpt2,pythia_1b}" --dtype=bfloat16 \
  --peer_device="${PEER_DEVICE:-cuda}" --peak_size="${PEAK_SIZE:-8192}" --rounds=1 \
  --sft_batch="${SFT_BATCH:-8}" --sft_length="${SFT_LENGTH:-1024}" --batch="${BATCH:-64}" \
  --prompt_length=128 --new_tokens=128 --ppo_iterations=3 --peer_phases="$PEER_PHASES" ${EXTRA:-} \
  --json_out="$OUT/side_by_side_gpu.json" | tee "$OUT/side_by_side_gpu.txt"
