#!/usr/bin/env bash
# The whole GPU benchmark, end to end, from a copy of the repository (target: under 6 minutes on
# one H100). Needs only jax (with CUDA), flax, optax, orbax-checkpoint, numpy, Pillow, matplotlib:
# no tensorflow-datasets, no install step.
#
#   mkdir -p .bench && cp ../shared/data/cifar10/cifar10_jpeg.npz .bench/   # once, here
#   bash benchmarks/gpu.sh [OUTDIR]                                          # there
#
# Writes every JSON/markdown/PNG under OUTDIR (default: $OUT if set, else benchmarks/results/gpu)
# and prints one summary last. SMOKE=1 runs the same steps with a tiny model on any backend (CPU
# included) in about a minute: the check that this script works before GPU time is spent on it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
data=${CIFAR10_NPZ:-.bench/cifar10_jpeg.npz}
if [ "${SMOKE:-0}" = 1 ]; then
  models=tiny; f32_model=tiny; bench=(--batch-sizes 16 --rounds 2 --steps 1)
  conv=(--model tiny --max-train 64 --max-test 64 --epochs 1 --batch-size 16 --val-split 0)
else
  models=resnet18_cifar,resnet50,paper; f32_model=resnet18_cifar; bench=(--batch-sizes 512 --rounds 5 --steps 20)
  conv=(--epochs 4 --batch-size 512 --lr 0.2)
fi

SMOKE=${SMOKE:-0} $py - <<'PY'
import os
import jax
backend = jax.default_backend()
print("devices:", jax.devices())
if backend != "gpu" and os.environ["SMOKE"] != "1":
    raise SystemExit(f"gpu.sh: JAX sees no GPU (backend {backend!r}): install jax[cuda12] or jax[cuda13]")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true

t0=$SECONDS
# Throughput: the package's train and eval steps, identity vs learned interleaved, compile apart.
$py benchmarks/throughput.py --models $models --dtype bfloat16 "${bench[@]}" \
    --out "$out/throughput-bf16.json" | tee "$out/throughput-bf16.md"
# The convolution choice, measured on this device before any default changes (CPU: hybrid wins).
$py benchmarks/throughput.py --models $f32_model --dtype float32 --conv-impl xla,hybrid,slice_dot "${bench[@]}" \
    --out "$out/throughput-f32.json" | tee "$out/throughput-f32.md"
echo "throughput: $((SECONDS - t0)) s"

# A short real convergence run: CIFAR-10 (lossy JPEG copy), resnet18_cifar, both skip rules.
if [ -f "$data" ]; then
  $py benchmarks/convergence.py --preset cifar --seeds 1 --out "$out/convergence" \
      --dataset cifar10 --data-dir "$data" --dtype bfloat16 "${conv[@]}" | tee "$out/convergence.md"
else
  echo "gpu.sh: $data not found: skipping the convergence run (copy cifar10_jpeg.npz there)"
fi
echo "total: $((SECONDS - t0)) s"

echo; echo "===== summary ====="
last_table() { awk '/raw timings:/ {buf = ""} {buf = buf $0 "\n"} END {printf "%s", buf}' "$1"; }
last_table "$out/throughput-bf16.md"
last_table "$out/throughput-f32.md"
[ -f "$out/convergence/convergence.md" ] && head -n 6 "$out/convergence/convergence.md" || true
