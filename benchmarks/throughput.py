#!/usr/bin/env python3
"""Training and inference throughput of ResNet (identity skip) versus AdaResNet (learned skip).

Times the package's own compiled train step (``adaresnet_jax.train.make_train_step``, the function
train.py runs) and eval step on whatever backend JAX sees, data-parallel over the local devices.

Method: every contender is compiled first (compile time reported apart, never timed as
throughput), run once to warm up, then the contenders are timed round by round in interleaved
order (A, B, A, B, ...) so that drift hits all of them; each timed region ends with
``block_until_ready``. Reported: median images/s with min-max over rounds, and each ratio as the
median of per-round ratios. Model FLOPs are counted the usual way (2 x multiply-adds of every conv
and dense layer, padding positions included), beside XLA's cost analysis; MFU divides achieved
FLOP/s (training = 3 x forward) by the peak of a large matrix product in the same dtype, measured
in the same run.

    python benchmarks/throughput.py                      # paper, resnet18_cifar, resnet56, resnet50
    python benchmarks/throughput.py --quick              # a few minutes on 2 CPU cores
    python benchmarks/throughput.py --models resnet18_cifar --dtype bfloat16 --batch-sizes 512
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adaresnet_jax as ar  # noqa: E402
from adaresnet_jax import train as train_lib  # noqa: E402
from adaresnet_jax.config import parse_config  # noqa: E402
from adaresnet_jax.conv import CONV_IMPLS, conv_impl_for  # noqa: E402
from adaresnet_jax.flops import model_flops  # noqa: E402,F401 (moved into the package; vs_pytorch imports it here)
from adaresnet_jax.optim import make_optimizer  # noqa: E402

DEFAULT_MODELS = ("paper", "resnet18_cifar", "resnet56", "resnet50")
QUICK_MODELS = ("paper", "resnet20")


# ----------------------------------------------------------------------------- FLOP counting

def xla_flops(compiled: Any) -> float | None:
    """XLA's cost-analysis FLOPs of a compiled function (it skips taps that fall on padding)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None


def peak_flops(dtype: Any, n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a large n x n matrix product in ``dtype`` on the default device (median)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


# ----------------------------------------------------------------------------- contenders

def build(name: str, skip: str, conv_impl: str, batch: int, image_size: int, dtype: Any, mesh: Any,
          preset: str, n_batches: int = 4) -> dict[str, Any]:
    """Compile the package's train step (as train.py runs it: batches gathered on device from a
    resident uint8 data set, augmented and normalised in the step, optimizer and recipe of
    ``preset``) and eval step for one contender; return them with their compile times."""
    model = ar.create_model(name, num_classes=10, skip=skip, dtype=dtype, conv_impl=conv_impl_for(mesh, conv_impl))
    cfg = parse_config(["--preset", preset])
    tx, _ = make_optimizer(cfg, steps_per_epoch=1000)
    state = train_lib.create_state(model, tx, (image_size, image_size, 3), seed=0, mesh=mesh)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_batches * batch, image_size, image_size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n_batches * batch).astype(np.int32)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    step = train_lib.make_train_step(model, tx, train_lib.StepOptions(
        mean=mean, std=std, dtype=dtype, crop_pad=cfg.crop_pad if cfg.augment else 0, flip=cfg.augment and cfg.flip,
        label_smoothing=cfg.label_smoothing), mesh=mesh)
    data = tuple(train_lib.replicate(a, mesh) for a in (x, y, np.arange(len(x), dtype=np.int32).reshape(n_batches, batch)))
    t = time.perf_counter()
    train_c = step.on_dataset.lower(state, *data).compile()
    compile_train = time.perf_counter() - t
    batch_args = tuple(train_lib.shard_batch(a, mesh) for a in (x[:batch], y[:batch], np.ones(batch, bool)))
    t = time.perf_counter()
    eval_c = train_lib.make_eval_step(model, mesh=mesh, mean=mean, std=std, dtype=dtype).lower(
        state, *batch_args).compile()
    compile_eval = time.perf_counter() - t
    return dict(state=state, data=data, batch_args=batch_args, train=train_c, eval=eval_c,
                compile_train_s=compile_train, compile_eval_s=compile_eval,
                xla_train_flops=xla_flops(train_c), xla_eval_flops=xla_flops(eval_c))


def time_train(c: dict[str, Any], steps: int) -> float:
    """Seconds for ``steps`` train steps; the state is carried (and donated) from step to step."""
    state = c["state"]
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = c["train"](state, *c["data"])
    jax.block_until_ready((state, metrics))
    c["state"] = state
    return time.perf_counter() - t


def time_eval(c: dict[str, Any], steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        out = c["eval"](c["state"], *c["batch_args"])
    jax.block_until_ready(out)
    return time.perf_counter() - t


def interleaved(contenders: dict[str, dict], timer: Callable[[dict, int], float], steps: int,
                rounds: int, batch: int) -> dict[str, list[float]]:
    """Images/s of every contender, round by round, in alternating order."""
    names = list(contenders)
    for n in names:  # warm-up: first call after compile
        timer(contenders[n], 1)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(steps * batch / timer(contenders[n], steps))
    return out


def summarize(samples: list[float]) -> dict[str, float]:
    return dict(median=statistics.median(samples), min=min(samples), max=max(samples))


def ratio(a: list[float], b: list[float]) -> dict[str, float]:
    """Median, min and max of per-round ratios a/b."""
    return summarize([x / y for x, y in zip(a, b)])


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated model names (default: %(default)s); any of {', '.join(ar.MODEL_NAMES)}")
    p.add_argument("--skips", default="identity,learned",
                   help="comma-separated skip rules; the first is the baseline of the ratios (default: %(default)s)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated global batch sizes (default: 128; 32 with --quick)")
    p.add_argument("--image-size", type=int, default=32, help="square input size (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--conv-impl", default="auto",
                   help="auto (tuned on CPU, xla elsewhere), xla, slice_dot, hybrid, tuned, or a comma-separated "
                   "list to compare them; the first is the baseline of the conv ratios (default: %(default)s)")
    p.add_argument("--devices", type=int, default=None, help="data-parallel over this many local devices (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default: 5)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed region (default: 10; 3 with --quick)")
    p.add_argument("--preset", default="cifar", help="train.py preset whose optimizer and augmentation the "
                   "train step uses (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help=f"models {', '.join(QUICK_MODELS)}, batch 32, 3 steps")
    p.add_argument("--no-peak", action="store_true", help="skip the peak matmul (MFU is then not reported)")
    p.add_argument("--out", default=None, help="JSON file for the report with every raw timing (default: none written)")
    a = p.parse_args(argv)
    if a.quick and a.models == ",".join(DEFAULT_MODELS):
        a.models = ",".join(QUICK_MODELS)
    a.batch_sizes = [int(b) for b in (a.batch_sizes or ("32" if a.quick else "128")).split(",")]
    a.rounds = a.rounds or 5
    a.steps = a.steps or (3 if a.quick else 10)
    a.models = a.models.split(",")
    a.skips = a.skips.split(",")
    for m in a.models:
        if m not in ar.MODEL_NAMES:
            p.error(f"unknown model {m!r}; valid: {', '.join(ar.MODEL_NAMES)}")
    for s in a.skips:
        if s not in ar.SKIP_RULES:
            p.error(f"unknown skip rule {s!r}; valid: {', '.join(ar.SKIP_RULES)}")
    n_dev = len(jax.local_devices())
    a.devices = a.devices or n_dev
    if not 1 <= a.devices <= n_dev:
        p.error(f"--devices {a.devices}: this host has {n_dev} local device(s)")
    for c in a.conv_impl.split(","):
        if c not in ("auto", *CONV_IMPLS):
            p.error(f"unknown conv impl {c!r}; valid: auto, {', '.join(CONV_IMPLS)}")
    try:  # chosen for the devices the steps run on, as the trainer does
        a.conv_impls = [conv_impl_for(jax.local_devices()[: a.devices], c) for c in a.conv_impl.split(",")]
    except ValueError as e:
        p.error(str(e))
    for b in a.batch_sizes:
        if b % a.devices:
            p.error(f"batch size {b} is not divisible by {a.devices} devices")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
    mesh = train_lib.make_mesh(jax.local_devices()[: a.devices])
    dev = jax.local_devices()[0]
    backend = jax.default_backend()
    peak = None if a.no_peak else peak_flops(dtype)
    report: dict[str, Any] = dict(
        command=" ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        backend=backend, device_kind=dev.device_kind, devices=a.devices, host=platform.node(),
        cpu=platform.processor() or platform.machine(), python=platform.python_version(),
        versions=train_lib.versions(), flags={k: v for k, v in vars(a).items()},
        peak_flops_per_s=peak, results=[])
    base = a.skips[0]
    for name in a.models:
        flops = model_flops(ar.create_model(name, num_classes=10), (a.image_size, a.image_size, 3))
        for batch in a.batch_sizes:
            contenders = {}
            for conv_impl in a.conv_impls:
                for skip in a.skips:
                    contenders[f"{skip}/{conv_impl}"] = build(name, skip, conv_impl, batch, a.image_size, dtype, mesh,
                                                             a.preset)
            train = interleaved(contenders, time_train, a.steps, a.rounds, batch)
            infer = interleaved(contenders, time_eval, a.steps, a.rounds, batch)
            for key, c in contenders.items():
                skip, conv_impl = key.split("/")
                row = dict(model=name, skip=skip, conv_impl=conv_impl, batch=batch, dtype=a.dtype,
                           model_flops_per_image=flops,
                           xla_train_flops_per_image=_per(c["xla_train_flops"], batch),
                           xla_eval_flops_per_image=_per(c["xla_eval_flops"], batch),
                           compile_train_s=c["compile_train_s"], compile_eval_s=c["compile_eval_s"],
                           train_images_per_s=train[key], eval_images_per_s=infer[key],
                           train=summarize(train[key]), eval=summarize(infer[key]))
                row["train_mfu"] = 3 * flops * row["train"]["median"] / peak if peak else None
                row["eval_mfu"] = flops * row["eval"]["median"] / peak if peak else None
                ref = f"{base}/{conv_impl}"
                row[f"train_ratio_vs_{base}"] = ratio(train[key], train[ref])
                row[f"eval_ratio_vs_{base}"] = ratio(infer[key], infer[ref])
                first_impl = f"{skip}/{a.conv_impls[0]}"
                row[f"train_ratio_vs_{a.conv_impls[0]}"] = ratio(train[key], train[first_impl])
                report["results"].append(row)
            print(f"throughput.py: {name} at batch {batch} timed", file=sys.stderr, flush=True)  # progress only
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{report['device_kind']} x{a.devices} ({backend}), {a.dtype}, jax {report['versions']['jax']}, "
          f"peak {peak / 1e12 if peak else float('nan'):.3g} TFLOP/s (matmul); raw timings: "
          f"{a.out or 'not kept (pass --out FILE)'}")
    print(table(report["results"], base, a.conv_impls[0]))  # the one table, every row once
    return report


def _per(x: float | None, batch: int) -> float | None:
    return None if x is None else x / batch


def table(rows: list[dict[str, Any]], base: str, impl0: str) -> str:
    """Markdown table: images/s median [min-max], ratios, compile time, FLOPs and MFU."""
    impls = len({r["conv_impl"] for r in rows}) > 1
    lines = [f"| model | skip | conv | batch | train img/s | train / {base} | "
             + (f"train / {impl0} | " if impls else "")
             + f"eval img/s | eval / {base} | compile s | MFLOP/img | XLA MFLOP/img | train MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if impls else "")]
    for r in rows:
        t, e = r["train"], r["eval"]
        mfu = f"{100 * r['train_mfu']:.1f}%" if r["train_mfu"] else "-"
        xla = f"{r['xla_eval_flops_per_image'] / 1e6:.1f}" if r["xla_eval_flops_per_image"] else "-"
        vs_impl = f"{r[f'train_ratio_vs_{impl0}']['median']:.2f} | " if impls else ""
        lines.append(
            f"| {r['model']} | {r['skip']} | {r['conv_impl']} | {r['batch']} "
            f"| {t['median']:.0f} [{t['min']:.0f}-{t['max']:.0f}] | {r[f'train_ratio_vs_{base}']['median']:.3f} | "
            + vs_impl +
            f"{e['median']:.0f} [{e['min']:.0f}-{e['max']:.0f}] | {r[f'eval_ratio_vs_{base}']['median']:.3f} "
            f"| {r['compile_train_s']:.1f} | {r['model_flops_per_image'] / 1e6:.2f} | {xla} | {mfu} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
