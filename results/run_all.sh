#!/usr/bin/env bash
# Every run behind RESULTS.md (2 CPU cores; RESULTS.md gives each sweep's time). Each sweep resumes where
# it stopped: rerun the same command to finish an interrupted one.
#
#   bash results/run_all.sh                  # every section behind results/summary.md, in order, then collect
#   bash results/run_all.sh depth_digits     # only the named sections
#   DRY_RUN=1 bash results/run_all.sh        # print the commands instead (tests/test_summarize.py checks that
#                                            # they reproduce the committed runs' configs)
#
# Each sweep passes the convolution it ran with (--conv-impl; results/<sweep>/provenance.json): the committed
# numbers came from code at the commits named there, so a rerun at today's commit gives numbers of the same
# kind, not the same bits (training amplifies float round-off).
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
dry() { printf 'DRY_RUN'; printf ' %q' "$@"; printf '\n'; }
[ -z "${DRY_RUN:-}" ] || conv="dry $conv"
# the four skip rules every study compares; learned-w1 is AdaResNet started at the plain-ResNet point
four="identity=--skip identity;learned=--skip learned;learned-w1=--skip learned --skip-init 1;rezero=--skip rezero"
# the CIFAR-10 subset setting (preset cifar on 5,000 images, 10 epochs), He's CIFAR networks at width 8
c5k=(--dataset cifar10 --data-dir "$data" --max-train 5000 --val-split 0.02 --epochs 10 --width 8)
hy=(--conv-impl hybrid)  # the CPU default (auto) of every committed sweep but depth-cifar-resnet56

digits_init() {  # Part 6: what the skip weights learn on the embedded digits, from 0 and from 1 (round 1, whose
  # quick preset had nesterov on: it does nothing under Adam, but the config records it)
  $conv --preset quick --skips learned,rezero --seeds 3 --out $runs/digits-init0 --title "digits, w0 = 0" --skip-init 0 --nesterov "${hy[@]}"
  $conv --preset quick --skips learned,rezero --seeds 3 --out $runs/digits-init1 --title "digits, w0 = 1" --skip-init 1 --nesterov "${hy[@]}"
}

cifar_r20() {  # Part 2: preset cifar, ResNet-20 at half width, 5,000 images (round 1)
  $conv --preset cifar --skips identity,learned,rezero --seeds 3 --out $runs/cifar-r20-5k --model resnet20 "${c5k[@]}" \
      "${hy[@]}"
  $conv --preset cifar --skips learned,rezero --seeds 3 --out $runs/cifar-r20-5k-init1 --model resnet20 "${c5k[@]}" \
      --skip-init 1 "${hy[@]}"
}

digits_10seeds() {  # Part 3: 10 paired seeds on the cheapest setting, every rule, per-channel weights too
  $conv --preset quick --seeds 10 --out $runs/digits-10seeds --title "digits, 10 seeds" "${hy[@]}" \
      --variants "$four;learned-pc=--skip learned --skip-per-channel"
}

lr_digits() {  # Part 5: learning-rate sensitivity of identity and learned, and the skip weights' own lr multiplier
  for lr in 0.001 0.003 0.01 0.03; do
    $conv --preset quick --seeds 3 --out $runs/digits-lr$lr --title "digits, Adam lr $lr" --lr $lr "${hy[@]}" \
        --variants "identity=--skip identity;learned=--skip learned;learned-x10=--skip learned --skip-lr-mult 10"
  done
}

depth_digits() {  # Part 4: depth: He's ResNet-20, 56 and 110 at width 8 on the digits, every rule
  for m in resnet20 resnet56 resnet110; do
    $conv --preset quick --seeds 3 --out $runs/depth-digits-$m --title "depth, digits, $m" --model $m "${hy[@]}" \
        --variants "$four"
  done
}

paper_5k() {  # Part 1: the seed's experiment (preset paper: the seed's network and recipe) on 5,000 JPEG images
  $conv --preset paper --skips identity,learned --seeds 3 --out $runs/paper-5k --title "seed setup, 5k" \
      --dataset cifar10 --data-dir "$data" --max-train 5000 "${hy[@]}"
  $conv --preset paper --skips identity --seeds 2 --out $runs/paper-5k-resnet50keras --title "seed baseline, 5k" \
      --dataset cifar10 --data-dir "$data" --max-train 5000 --model resnet50_keras "${hy[@]}"
}
# paper-5k-round1 (round 1's paper network, before it was made Keras-exact) cannot be rerun at today's code.

long_digits() {  # Part 6: a longer schedule on the digits: 60 epochs (cosine over all 60)
  $conv --preset quick --seeds 3 --out $runs/digits-60ep --title "digits, 60 epochs" --epochs 60 "${hy[@]}" \
      --variants "learned=--skip learned;learned-w1=--skip learned --skip-init 1"
}

depth_cifar() {  # Part 4: ResNet-56 at width 8, 5,000 images, the four rules, 2 seeds. identity and learned ran with
  # the `tuned` of commit 5060110, learned-w1 and rezero with that of 5c9e4c0 (provenance.json): compared unpaired
  $conv --preset cifar --seeds 2 --out $runs/depth-cifar-resnet56 --title "depth, CIFAR-10 5k, resnet56" --model resnet56 \
      "${c5k[@]}" --conv-impl tuned --variants "$four"
}

paper_full() {  # 5a: the seed's experiment as the seed ran it: all 50,000 training images, 10 epochs (16-40 min a
  # seed on 2 CPU cores, depending on what else runs; results/gpu_science.sh on a GPU). Ran at commit 01c534e (round 3).
  $conv --preset paper --skips identity,learned --seeds 3 --out $runs/paper-full --title "seed setup, full data" \
      --dataset cifar10 --data-dir "$data" --conv-impl tuned
}

paper_full_normal() {  # 5a: the seed script's variant on the full data (downsampling blocks' w ~ RandomNormal(0.05)),
  # paired with paper_full's identity by seed (run from a worktree at commit 01c534e, like paper_full; 2026-12-03/04,
  # 26-44 min a run on the shared machine)
  $conv --preset paper --seeds 3 --out $runs/paper-full-normal --title "seed setup, full data, downsample w normal" \
      --dataset cifar10 --data-dir "$data" --conv-impl tuned \
      --variants "learned-normal=--skip learned --downsample-skip-init normal"
}

controls() {  # 5b: w frozen at 0 (no skip path) and at 1 (= identity) beside learned from 0 and from 1, ResNet-20,
  # CIFAR-10 5k (--skip-lr-mult 0 scales the skip weights' update to exactly 0 under SGD, Adam and AdamW, and
  # weight decay never reaches them: tests/test_summarize.py); test accuracy at epochs 5 and 10 only (see budget);
  # 15 runs, 5-8 minutes each on this machine while it was shared (2026-12-03)
  $conv --preset cifar --seeds 3 --out $runs/controls-cifar-r20-5k --title "controls, CIFAR-10 5k, resnet20" \
      --model resnet20 "${c5k[@]}" --eval-every-steps 195 --conv-impl tuned_single_device --variants "identity=--skip identity;frozen0=--skip learned --skip-lr-mult 0;\
frozen1=--skip learned --skip-init 1 --skip-lr-mult 0;learned=--skip learned;learned-w1=--skip learned --skip-init 1"
}

budget() {  # 5c: does the gap close with training? identity, learned from 0 and from 1 for 30 epochs (cosine over
  # all 30), ResNet-20, CIFAR-10 5k, seeds 0-2 (all at commit 53925ef: seeds 0-1 of identity and learned in round 4's
  # first session, the rest in its second); the 10-epoch point is the controls sweep's runs (the same flags). Test
  # accuracy every 5 epochs and at the end: testing the 10,000 images every epoch took 5x the 5,000-image epoch
  # here, and testing never changes the training (the controls' identity, tested every epoch or every 5, ends
  # bit-identical). About 12 minutes a run on a quiet machine, 20-25 shared.
  $conv --preset cifar --seeds 3 --out $runs/budget-cifar-r20-5k-30ep --title "budget, CIFAR-10 5k, 30 epochs" \
      --model resnet20 "${c5k[@]}" --epochs 30 --eval-every-steps 195 --conv-impl tuned_single_device \
      --variants "identity=--skip identity;learned=--skip learned;learned-w1=--skip learned --skip-init 1"
}

budget_100() {  # 5c at 100 epochs (cosine over all 100), tested every 15 epochs and at the end; seeds 0-2, from a
  # worktree at commit 53925ef like budget, 2026-12-04: 14-17 min a run here, 37 shared. results/budget_curve.py
  # (run by collect) puts the 10-, 30- and 100-epoch points side by side
  $conv --preset cifar --seeds 3 --out $runs/budget-cifar-r20-5k-100ep --title "budget, CIFAR-10 5k, 100 epochs" \
      --model resnet20 "${c5k[@]}" --epochs 100 --eval-every-steps 585 --conv-impl tuned_single_device \
      --variants "identity=--skip identity;learned=--skip learned;learned-w1=--skip learned --skip-init 1"
}

lr_cifar() {  # 5d: the skip weights' learning-rate multiplier on CIFAR-10 (preset cifar: SGD lr 0.1), ResNet-20, 5k:
  # x3, x10, x30 beside the controls sweep's learned (x1) and identity, paired by seed (the same flags and commit,
  # 53925ef, from a worktree; they trained in the controls folder, 2026-12-04, 3-7 minutes a run while shared)
  $conv --preset cifar --seeds 3 --out $runs/lr-cifar-r20-5k --title "skip lr multiplier, CIFAR-10 5k, resnet20" \
      --model resnet20 "${c5k[@]}" --eval-every-steps 195 --conv-impl tuned_single_device --variants \
      "learned-x3=--skip learned --skip-lr-mult 3;learned-x10=--skip learned --skip-lr-mult 10;\
learned-x30=--skip learned --skip-lr-mult 30"
}

# ---- Prepared, not run yet (not in the default list, not in results/summary.md's families) ----

paper_full_resnet50keras() {  # not run yet (45-85 min a seed here): the seed's own baseline on the full data
  $conv --preset paper --skips identity --seeds 3 --out $runs/paper-full-resnet50keras --title "seed baseline, full data" \
      --dataset cifar10 --data-dir "$data" --model resnet50_keras
}

paper_normal() {  # the seed script's variant on 5,000 images at today's code (on the full data: paper_full_normal)
  $conv --preset paper --seeds 3 --out $runs/paper-5k-normal --title "seed setup, 5k, downsample w normal" \
      --dataset cifar10 --data-dir "$data" --max-train 5000 \
      --variants "identity=--skip identity;learned=--skip learned;learned-normal=--skip learned --downsample-skip-init normal"
}

long_cifar() {  # a longer schedule: 50 epochs on the 5,000-image subset (about 15 min a run here)
  $conv --preset cifar --seeds 2 --out $runs/cifar-r20-5k-50ep --title "50 epochs, CIFAR-10 5k" --model resnet20 \
      "${c5k[@]}" --epochs 50 --variants "learned=--skip learned;learned-w1=--skip learned --skip-init 1"
}

depth_cifar_more() {  # about 8 min a ResNet-56 run here: a third seed, and ResNet-110
  for m in resnet56 resnet110; do
    $conv --preset cifar --seeds 3 --out $runs/depth-cifar-$m --title "depth, CIFAR-10 5k, $m" --model $m \
        "${c5k[@]}" --variants "$four"
  done
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
  $py results/budget_curve.py > results/budget_curve.md  # and results/budget_curve.png
}

replot_one() {  # convergence.py's command with --out pointed at results/<sweep> and --replot: reads, never trains
  local args=("$@") out="" i
  for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[i]}" != --out ] || out=${args[i + 1]}; done
  "${args[@]}" --out "results/$(basename "$out")" --replot
}

replot() {  # the committed sweeps' tables and plots, redrawn from their per-run files (no training), then summary.md
  local saved=$conv
  conv="replot_one $py benchmarks/convergence.py"
  digits_init; cifar_r20; digits_10seeds; lr_digits; depth_digits; paper_5k; long_digits; depth_cifar; paper_full
  paper_full_normal; controls; budget; budget_100; lr_cifar
  $conv --preset paper --seeds 3 --out results/paper-5k-round1 --title "seed setup, 5k, round 1 (pre-Keras init)" \
      --variants "identity=--skip identity;learned-normal=--skip learned"
  conv=$saved
  $py results/summarize.py > results/summary.md
  $py results/budget_curve.py > results/budget_curve.md
}

# The default list is exactly the sweeps behind results/summary.md's families (rounds 1 to 4).
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(digits_init cifar_r20 digits_10seeds lr_digits depth_digits paper_5k long_digits
                                       depth_cifar paper_full paper_full_normal controls budget budget_100 lr_cifar collect)
[ -z "${DRY_RUN:-}" ] || sections=("${sections[@]/collect/}")
for s in "${sections[@]}"; do
  [ -n "$s" ] || continue
  echo "=== $s ($(date -u +%FT%TZ))"
  "$s"
done
