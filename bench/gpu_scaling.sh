#!/usr/bin/env bash
# The training step's scaling over 1, 2, ..., N GPUs under MirroredStrategy, XLA off and on
# (bench/gpu_scaling.py; see bench/README.md for the figures to expect). Run from anywhere:
#
#   bench/gpu_scaling.sh                      # every GPU of this machine
#   bench/gpu_scaling.sh --counts 1,2,4,8     # extra arguments go to every run
#   bench/gpu_scaling.sh --cpu-devices 2      # no GPU: check it on 2 logical CPU devices
#
# Two runs, each its own JSON in bench/results/ (or $OUT; gpu_scaling_{gpu|cpu}_MODEL_kK.json): the paper's MNIST-SVHN step at K = 30
# (compute-bound) and at K = 1 (where per-step overhead and the all-reduce weigh most), per
# replica batch 128 (Shi et al.'s batch on each device: weak scaling). $PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${OUT:-bench/results}"
MODEL="${MODEL:-bmvae_m}"
TAG=gpu
for arg in "$@"; do [[ "$arg" == --cpu-devices* ]] && TAG=cpu; done
for K in 30 1; do
  echo "== ${MODEL}, MNIST-SVHN, K=${K}, per-replica batch 128 =="
  "$PYTHON" bench/gpu_scaling.py --dataset mnist-svhn --model "$MODEL" --K "$K" \
    --per-replica-batch 128 --xla off,on --output "${OUT}/gpu_scaling_${TAG}_${MODEL}_k${K}.json" "$@"
done
