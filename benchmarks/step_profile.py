#!/usr/bin/env python3
"""Where one train step's time goes: the JAX profiler's trace of a few steps, per part of the network.

The step is the package's own (``throughput.build``: train.py's step, resident uint8 data, the preset's
optimizer). Its XLA thunks are traced with ``jax.profiler`` (a Perfetto trace, no TensorBoard needed),
each attributed to the JAX operation it came from (the HLO's ``op_name``) and grouped: the convolutions'
forward pass, input gradient and kernel gradient (told apart under ``tuned``, whose backward pass names
its two halves; other implementations' convolution backward passes are one group), BatchNorm forward
and backward, ReLU, max pooling and the skip (forward and backward), and the rest (loss, head,
optimizer, data). Times are the thunks' durations summed over threads, per step: XLA runs independent
thunks side by side, so they add up to more than the wall time, which is printed beside them.

    python benchmarks/step_profile.py --model resnet56
    python benchmarks/step_profile.py --model resnet56 --conv-impl hybrid --top 20 --out prof.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import adaresnet_jax as ar  # noqa: E402
import throughput  # noqa: E402
from adaresnet_jax import train as train_lib  # noqa: E402

GROUPS = ("conv forward", "conv input gradient", "conv kernel gradient", "conv backward (both)",
          "BatchNorm forward", "BatchNorm backward", "ReLU, pooling, skip: forward",
          "ReLU, pooling, skip: backward", "other")


def group(op_name: str) -> str:
    """The part of the network an HLO ``op_name`` (e.g. ``jit(f)/transpose(jvp(ResNet))/stage1_block1/...``) belongs to."""
    backward = "transpose(" in op_name
    path = op_name.split("/")
    if "kernel_grad" in path:
        return "conv kernel gradient"
    if "input_grad" in path:
        return "conv input gradient"
    if any(p == "Conv" or p.startswith("Conv_") or p.endswith("_conv") for p in path):
        return "conv backward (both)" if backward else "conv forward"
    if any("BatchNorm" in p or p.endswith("_bn") for p in path):
        return "BatchNorm backward" if backward else "BatchNorm forward"
    if any(k in op_name for k in ("relu", "max_pool", "skip", "combine", "select_n", "/max")):
        return "ReLU, pooling, skip: backward" if backward else "ReLU, pooling, skip: forward"
    return "other"


def trace(compiled: dict[str, Any], steps: int) -> tuple[list[dict[str, Any]], float]:
    """The profiler's complete events of ``steps`` train steps, and their wall time."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t = time.perf_counter()
            throughput.time_train(compiled, steps)
            wall = time.perf_counter() - t
        path = sorted(glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True))[-1]
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})], wall


def top_level(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The thunks not nested in another on the same thread (a loop's body runs inside the loop's thunk)."""
    out = []
    by_thread: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        by_thread[e["tid"]].append(e)
    for es in by_thread.values():
        end = float("-inf")
        for e in sorted(es, key=lambda e: (e["ts"], -e["dur"])):
            if e["ts"] >= end:
                out.append(e)
                end = e["ts"] + e["dur"]
    return out


def profile(model: str, skip: str, conv_impl: str, batch: int, steps: int, preset: str) -> dict[str, Any]:
    mesh = train_lib.make_mesh()
    conv_impl = throughput.conv_impl_for(mesh, conv_impl)  # "auto": the CPU algorithms on CPU devices
    c = throughput.build(model, skip, conv_impl, batch, 32, jnp.float32, mesh, preset)
    op_names = dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"', c["train"].as_text(),
                               re.M))
    throughput.time_train(c, 2)  # warm up
    events, wall = trace(c, steps)
    ops: collections.Counter = collections.Counter()
    for e in top_level(events):
        name = e["args"]["hlo_op"]
        op = op_names.get(name, "")
        ops[(group(op), re.sub(r"^jit\([^)]*\)/", "", op) or name)] += e["dur"] / 1000 / steps  # trace times: µs
    groups: collections.Counter = collections.Counter()
    for (g, _), ms in ops.items():
        groups[g] += ms
    return dict(model=model, skip=skip, conv_impl=conv_impl, batch=batch, steps=steps,
                wall_ms_per_step=1000 * wall / steps, images_per_s=batch * steps / wall,
                groups_ms={g: groups[g] for g in GROUPS}, ops_ms=[(g, op, ms) for (g, op), ms in ops.most_common()])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56", help=f"one of {', '.join(ar.MODEL_NAMES)} (default: %(default)s)")
    p.add_argument("--skip", default="learned", choices=("identity", "learned", "rezero"))
    p.add_argument("--conv-impl", default="auto", help="conv_impl of the network (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="traced steps (default: %(default)s)")
    p.add_argument("--preset", default="cifar", help="train.py preset of the step (default: %(default)s)")
    p.add_argument("--top", type=int, default=12, help="also list the heaviest operations (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON with the groups and every operation's time")
    a = p.parse_args(argv)
    if a.batch < 1 or a.steps < 1:
        p.error("--batch and --steps must be positive")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    r = profile(a.model, a.skip, a.conv_impl, a.batch, a.steps, a.preset)
    total = sum(r["groups_ms"].values())
    print(f"{a.model} ({a.skip}, conv {a.conv_impl}), batch {a.batch}: {r['wall_ms_per_step']:.0f} ms per step wall "
          f"({r['images_per_s']:.0f} img/s while traced); thunks {total:.0f} ms per step summed over threads\n")
    print("| part of the step | ms per step | share |\n|---|---|---|")
    for g, ms in r["groups_ms"].items():
        if ms > 0:
            print(f"| {g} | {ms:.0f} | {ms / total:.0%} |")
    if a.top:
        print("\nheaviest operations (ms per step):")
        for g, op, ms in r["ops_ms"][:a.top]:
            print(f"  {ms:7.1f}  {g}: {op[:110]}")
    if a.out:
        Path(a.out).write_text(json.dumps({**r, "jax": jax.__version__}, indent=1))
    return r


if __name__ == "__main__":
    main()
