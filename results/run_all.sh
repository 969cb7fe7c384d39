#!/usr/bin/env bash
# Every run behind RESULTS.md (2 CPU cores; RESULTS.md gives each sweep's time). Each sweep resumes where
# it stopped: rerun the same command to finish an interrupted one.
#
#   bash results/run_all.sh                  # every section, in order
#   bash results/run_all.sh depth_digits     # only the named sections
#
# CIFAR-10 sections need data/cifar10.npz: python ../shared/data/cifar10/to_npz.py data/cifar10.npz (the
# project's offline copy, JPEG q75: accuracies run 2-3 points under the original pixels'); with network,
# leave CIFAR10_NPZ unset and drop --data-dir: train.py then downloads the original archive.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
runs=${RUNS:-runs/results}      # checkpoints and full logs (not committed)
data=${CIFAR10_NPZ:-data/cifar10.npz}
conv="$py benchmarks/convergence.py"
# the four skip rules every study compares; learned-w1 is AdaResNet started at the plain-ResNet point
four="identity=--skip identity;learned=--skip learned;learned-w1=--skip learned --skip-init 1;rezero=--skip rezero"
# the CIFAR-10 subset setting (preset cifar on 5,000 images, 10 epochs), He's CIFAR networks at width 8
c5k=(--dataset cifar10 --data-dir "$data" --max-train 5000 --val-split 0.02 --epochs 10 --width 8)

digits_init() {  # Part 3: what the skip weights learn on the embedded digits, from 0 and from 1 (round 1)
  $conv --preset quick --skips learned,rezero --seeds 3 --out $runs/digits-init0 --skip-init 0
  $conv --preset quick --skips learned,rezero --seeds 3 --out $runs/digits-init1 --skip-init 1
}

cifar_r20() {  # Part 2: preset cifar, ResNet-20 at half width, 5,000 images (round 1)
  $conv --preset cifar --skips identity,learned,rezero --seeds 3 --out $runs/cifar-r20-5k --model resnet20 "${c5k[@]}"
  $conv --preset cifar --skips learned,rezero --seeds 3 --out $runs/cifar-r20-5k-init1 --model resnet20 "${c5k[@]}" \
      --skip-init 1
}

digits_10seeds() {  # (b) 10 paired seeds on the cheapest decisive setting, every rule, per-channel weights too
  $conv --preset quick --seeds 10 --out $runs/digits-10seeds --title "digits, 10 seeds" \
      --variants "$four;learned-pc=--skip learned --skip-per-channel"
}

lr_digits() {  # (d) learning-rate sensitivity of identity and learned, and the skip weights' own lr multiplier
  for lr in 0.001 0.003 0.01 0.03; do
    $conv --preset quick --seeds 3 --out $runs/digits-lr$lr --title "digits, Adam lr $lr" --lr $lr \
        --variants "identity=--skip identity;learned=--skip learned;learned-x10=--skip learned --skip-lr-mult 10"
  done
}

depth_digits() {  # (c) depth: He's ResNet-20, 56 and 110 at width 8 on the digits, every rule
  for m in resnet20 resnet56 resnet110; do
    $conv --preset quick --seeds 3 --out $runs/depth-digits-$m --title "depth, digits, $m" --model $m --variants "$four"
  done
}

paper_5k() {  # Part 1: the seed's experiment (preset paper, exactly the seed's network and recipe) on 5,000 images
  $conv --preset paper --skips identity,learned --seeds 3 --out $runs/paper-5k --title "seed setup, 5k" \
      --dataset cifar10 --data-dir "$data" --max-train 5000
  $conv --preset paper --skips identity --seeds 2 --out $runs/paper-5k-resnet50keras --title "seed baseline, 5k" \
      --dataset cifar10 --data-dir "$data" --max-train 5000 --model resnet50_keras
}

long_digits() {  # (e) a longer schedule on the digits: 60 epochs (cosine over all 60): do the weights keep moving?
  $conv --preset quick --seeds 3 --out $runs/digits-60ep --title "digits, 60 epochs" --epochs 60 \
      --variants "learned=--skip learned;learned-w1=--skip learned --skip-init 1"
}

long_cifar() {  # (e) a longer schedule: 50 epochs on the 5,000-image subset (not run yet: about 15 min a run here)
  $conv --preset cifar --seeds 2 --out $runs/cifar-r20-5k-50ep --title "50 epochs, CIFAR-10 5k" --model resnet20 \
      "${c5k[@]}" --epochs 50 --variants "learned=--skip learned;learned-w1=--skip learned --skip-init 1"
}

depth_cifar() {  # (c) depth on CIFAR-10: ResNet-56 at width 8, 5,000 images, the four rules, 2 seeds (ResNet-20
  # in this setting is cifar_r20's two sweeps: same flags and seeds, so paired across them). identity and learned
  # ran with the `tuned` of commit 5060110; learned-w1 and rezero later, with that of 5c9e4c0 (RESULTS.md, part 4)
  $conv --preset cifar --seeds 2 --out $runs/depth-cifar-resnet56 --title "depth, CIFAR-10 5k, resnet56" --model resnet56 \
      "${c5k[@]}" --variants "$four"
}

depth_cifar_more() {  # not run yet (about 8 min a ResNet-56 run here): a third seed, and ResNet-110
  for m in resnet56 resnet110; do
    $conv --preset cifar --seeds 3 --out $runs/depth-cifar-$m --title "depth, CIFAR-10 5k, $m" --model $m \
        "${c5k[@]}" --variants "$four"
  done
}

paper_full() {  # (a) the seed's experiment as the seed ran it: all 50,000 training images, 10 epochs (not run yet:
  # about 16 min a paper seed and 45-85 min a resnet50_keras seed on 2 CPU cores; results/gpu_science.sh on a GPU)
  $conv --preset paper --skips identity,learned --seeds 3 --out $runs/paper-full --title "seed setup, full data" \
      --dataset cifar10 --data-dir "$data"
  $conv --preset paper --skips identity --seeds 3 --out $runs/paper-full-resnet50keras --title "seed baseline, full data" \
      --dataset cifar10 --data-dir "$data" --model resnet50_keras
}

collect() {  # copy what RESULTS.md cites (sweep tables, plots, per-run metrics; no checkpoints) into results/
  for d in $runs/*/; do
    name=$(basename "$d"); mkdir -p results/$name
    cp "$d"/convergence.json "$d"/convergence.md "$d"/*.png results/$name/ 2>/dev/null || true
    for r in "$d"/*-seed*/; do
      mkdir -p results/$name/$(basename "$r")
      cp "$r"/metrics.jsonl "$r"/summary.json results/$name/$(basename "$r")/ 2>/dev/null || true
    done
  done
  $py results/summarize.py > results/summary.md
}

sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(digits_init cifar_r20 digits_10seeds lr_digits depth_digits paper_5k long_digits
                                       long_cifar depth_cifar paper_full collect)
for s in "${sections[@]}"; do
  echo "=== $s ($(date -u +%FT%TZ))"
  "$s"
done
