#!/usr/bin/env bash
# The parts of RESULTS.md that need a GPU to finish, ready to run on one (H100 or H200), most decisive
# first. Each sweep resumes where it stopped, so a 15-minute lease can run a slice and the next one
# goes on. Needs jax (CUDA), flax, optax, orbax-checkpoint, numpy, Pillow, matplotlib; no TFDS.
#
#   mkdir -p .bench && cp ../shared/data/cifar10/cifar10_jpeg.npz .bench/    # once, here (carry .bench)
#   bash results/gpu_science.sh [SECTION...]                                  # there; OUT=$OUT to keep runs
#
# SEEDS=N overrides the seed counts and EXTRA="flags" is appended to every train.py command (the tests run
# it with EXTRA="--model tiny --epochs 1 ..." on CPU, so the script is known to work before a lease).
#
# Estimated times on one H100 are NOT measured (no GPU has run this project yet): they assume the step
# is launch-bound at about 4 ms for batch 32 and 6 ms (ResNet-20) to 25 ms (ResNet-110) for batch 128
# in bf16, plus about a minute of compilation per run. Replace them with the first measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
runs=${OUT:-runs/gpu-science}
data=${CIFAR10_NPZ:-.bench/cifar10_jpeg.npz}
conv="$py benchmarks/convergence.py"
extra=(${EXTRA:-})
four="identity=--skip identity;learned=--skip learned;learned-w1=--skip learned --skip-init 1;rezero=--skip rezero"

paper_full() {  # (a) the seed's experiment as the seed ran it, full data: est. 2 min a run, 15 runs = 30 min
  # float32, as the seed ran it
  $conv --preset paper --skips identity,learned --seeds ${SEEDS:-5} --out $runs/paper-full --title "seed setup, full data" \
      --dataset cifar10 --data-dir "$data" "${extra[@]}"
  $conv --preset paper --skips identity --seeds ${SEEDS:-5} --out $runs/paper-full-resnet50keras --title "seed baseline, full data" \
      --dataset cifar10 --data-dir "$data" --model resnet50_keras "${extra[@]}"
}

depth_full() {  # (c) depth at full width and data, preset cifar for 30 epochs: est. 2-8 min a run, 36 runs = 3 h
  for m in resnet20 resnet56 resnet110; do
    $conv --preset cifar --seeds ${SEEDS:-3} --out $runs/depth-full-$m --title "depth, CIFAR-10, $m" --model $m \
        --dataset cifar10 --data-dir "$data" --dtype bfloat16 --variants "$four" "${extra[@]}"
  done
}

sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(paper_full depth_full)
for s in "${sections[@]}"; do
  echo "=== $s ($(date -u +%FT%TZ))"
  "$s"
done
