#!/usr/bin/env bash
# The whole GPU benchmark, end to end, from a copy of the repository (target: under 6 minutes on
# one H100). Needs only jax (with CUDA), flax, optax, orbax-checkpoint, numpy, Pillow, matplotlib:
# no tensorflow-datasets, no install step.
#
#   mkdir -p .bench && cp ../shared/data/cifar10/cifar10_jpeg.npz .bench/   # once, here
#   bash benchmarks/gpu.sh [OUTDIR]                                          # there
#
# Writes every JSON/markdown/PNG under OUTDIR (default: $OUT if set, else benchmarks/results/gpu)
# and prints one summary last.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
data=${CIFAR10_NPZ:-.bench/cifar10_jpeg.npz}

$py - <<'PY'
import jax
backend = jax.default_backend()
print("devices:", jax.devices())
if backend != "gpu":
    raise SystemExit(f"gpu.sh: JAX sees no GPU (backend {backend!r}): install jax[cuda12] or jax[cuda13]")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true

t0=$SECONDS
# Throughput: the package's train and eval steps, identity vs learned interleaved, compile apart.
$py benchmarks/throughput.py --models resnet18_cifar,resnet50,paper --dtype bfloat16 \
    --batch-sizes 512 --rounds 5 --steps 20 --out "$out/throughput-bf16.json" | tee "$out/throughput-bf16.md"
$py benchmarks/throughput.py --models resnet18_cifar --dtype float32 --conv-impl xla,slice_dot \
    --batch-sizes 512 --rounds 5 --steps 20 --out "$out/throughput-f32.json" | tee "$out/throughput-f32.md"
echo "throughput: $((SECONDS - t0)) s"

# A short real convergence run: CIFAR-10 (lossy JPEG copy), resnet18_cifar, both skip rules.
if [ -f "$data" ]; then
  $py benchmarks/convergence.py --preset cifar --seeds 1 --out "$out/convergence" \
      --dataset cifar10 --data-dir "$data" --epochs 4 --batch-size 512 --lr 0.2 --dtype bfloat16 \
      | tee "$out/convergence.md"
else
  echo "gpu.sh: $data not found: skipping the convergence run (copy cifar10_jpeg.npz there)"
fi
echo "total: $((SECONDS - t0)) s"

echo; echo "===== summary ====="
tail -n 9 "$out/throughput-bf16.md"
tail -n 7 "$out/throughput-f32.md"
[ -f "$out/convergence/convergence.md" ] && head -n 6 "$out/convergence/convergence.md" || true
