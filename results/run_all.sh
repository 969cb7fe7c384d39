#!/usr/bin/env bash
# Every run behind RESULTS.md, in the order it was made (2 CPU cores; see RESULTS.md for times).
# Each command resumes where it stopped: rerun this script to finish an interrupted sweep.
#   bash results/run_all.sh            # needs data/cifar10.npz: python ../shared/data/cifar10/to_npz.py data/cifar10.npz
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
runs=${RUNS:-runs/results}      # checkpoints and full logs (not committed)
data=${CIFAR10_NPZ:-data/cifar10.npz}

# 3. What the skip weights learn on the embedded digits, from the seed's init (0) and the plain-ResNet point (1).
$py benchmarks/convergence.py --preset quick --skips learned,rezero --seeds 3 --out $runs/digits-init0 --skip-init 0
$py benchmarks/convergence.py --preset quick --skips learned,rezero --seeds 3 --out $runs/digits-init1 --skip-init 1

# 1. The seed's experiment (preset paper: Adam 1e-3, batch 32, 10 epochs, no augmentation) on a
#    5,000-image training subset (2 CPU cores), full 10,000-image test set: learned vs identity skip.
$py benchmarks/convergence.py --preset paper --skips identity,learned --seeds 3 --out $runs/paper-5k \
    --dataset cifar10 --data-dir $data --max-train 5000

# 2. Controlled comparison with a strong recipe (preset cifar: SGD Nesterov, cosine, weight decay,
#    label smoothing, crop + flip) on He et al.'s ResNet-20 at half width (8-16-32 filters: CPU budget),
#    5,000 training images, 1,000 held out for validation, 10 epochs.
$py benchmarks/convergence.py --preset cifar --skips identity,learned,rezero --seeds 3 --out $runs/cifar-r20-5k \
    --dataset cifar10 --data-dir $data --model resnet20 --width 8 --max-train 5000 --val-split 0.02 --epochs 10

# 1 (cont.). The seed's baseline, ResNet-50 at 32x32 (plain identity skips), same preset and subset.
$py benchmarks/convergence.py --preset paper --skips identity --seeds 3 --out $runs/paper-5k-resnet50 \
    --dataset cifar10 --data-dir $data --max-train 5000 --model resnet50

# 3 (cont.). CIFAR-10 skip-weight trajectories from w = 1 (the plain-ResNet point), same setting as part 2.
$py benchmarks/convergence.py --preset cifar --skips learned,rezero --seeds 3 --out $runs/cifar-r20-5k-init1 \
    --dataset cifar10 --data-dir $data --model resnet20 --width 8 --max-train 5000 --val-split 0.02 --epochs 10 \
    --skip-init 1

# Copy what RESULTS.md cites (metrics, summaries, sweep tables and plots; no checkpoints) into results/.
for d in $runs/*/; do
  name=$(basename "$d"); mkdir -p results/$name
  cp "$d"/convergence.json "$d"/convergence.md "$d"/*.png results/$name/ 2>/dev/null || true
  for r in "$d"/*-seed*/; do
    mkdir -p results/$name/$(basename "$r")
    cp "$r"/metrics.jsonl "$r"/summary.json results/$name/$(basename "$r")/
  done
done
