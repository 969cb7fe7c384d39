#!/usr/bin/env python3
"""Every convolution of a network, each pass timed alone with every algorithm: what ``tuned`` picks, and why.

The layer shapes are read off the network's own jaxpr at the given batch size (each distinct shape once,
with how many times the network uses it). For each layer, the forward pass, the input gradient and the
kernel gradient are compiled separately for every algorithm of ``adaresnet_jax.conv`` that applies
(forward / input gradient: xla, slice_dot, winograd; kernel gradient: xla, im2col, winograd) and timed
round by round in alternating order. The table gives milliseconds per call (median over rounds), the
algorithm ``conv.plan`` picks (marked *) and the fastest; the totals multiply by the uses and compare
XLA's convolution, ``hybrid`` (slice-and-dot at most 16 output positions, XLA's otherwise), ``tuned``
and the per-pass best. ``--clock cpu`` times CPU seconds of all threads instead of wall seconds: on a
shared machine it moves far less with the load (the README says which clock each table used).

    python benchmarks/conv_profile.py --model resnet18_cifar
    python benchmarks/conv_profile.py --model resnet56 --rounds 5 --clock cpu --out prof.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adaresnet_jax as ar  # noqa: E402
from adaresnet_jax import conv  # noqa: E402

PARTS = {"forward": conv.FORWARD_ALGORITHMS, "input_grad": conv.INPUT_GRAD_ALGORITHMS,
         "kernel_grad": conv.KERNEL_GRAD_ALGORITHMS}
Layer = tuple[tuple[int, ...], tuple[int, ...], tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]


def conv_layers(name: str, batch: int, image_size: int = 32, num_classes: int = 10) -> Counter:
    """Counter of (input shape, kernel shape, strides, explicit padding) over the network's convolutions."""
    model = ar.create_model(name, num_classes=num_classes, conv_impl="xla")
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    found: Counter = Counter()
    for eqn in _eqns(jaxpr.jaxpr):
        if eqn.primitive.name == "conv_general_dilated":
            p = eqn.params
            found[(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape), tuple(p["window_strides"]),
                   tuple(tuple(q) for q in p["padding"]))] += 1
    return found


def _eqns(jaxpr: Any):
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for inner in p if isinstance(p, (list, tuple)) else (p,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def applicable(part: str, algorithm: str, layer: Layer) -> bool:
    xs, ws, strides, pads = layer
    if algorithm.startswith("winograd"):
        return conv.winograd_applies(xs, ws, strides, pads, jnp.float32) and xs[1] * xs[2] >= 4
    if algorithm == "shifted":  # stride-1 3x3 with one pixel of padding, any map
        return conv.winograd_applies(xs, ws, strides, pads, jnp.float32)
    return True


def compile_part(part: str, algorithm: str, layer: Layer, x: jax.Array, w: jax.Array,
                 dy: jax.Array) -> Callable[[], Any]:
    _, _, strides, pads = layer
    if part == "forward":
        f = jax.jit(lambda a, b: conv.forward(algorithm, a, b, strides, pads)).lower(x, w).compile()
        return lambda: f(x, w)
    if part == "input_grad":
        f = jax.jit(lambda a, b, g: conv.input_grad(algorithm, a, b, g, strides, pads)).lower(x, w, dy).compile()
        return lambda: f(x, w, dy)
    f = jax.jit(lambda a, g: conv.kernel_grad(algorithm, a, w.shape, g, strides, pads)).lower(x, dy).compile()
    return lambda: f(x, dy)


def profile(name: str, batch: int, rounds: int, image_size: int, clock: str,
            num_classes: int = 10) -> list[dict[str, Any]]:
    now = time.process_time if clock == "cpu" else time.perf_counter
    rows = []
    for layer, count in conv_layers(name, batch, image_size, num_classes).items():
        xs, ws, strides, pads = layer
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(xs, np.float32))
        w = jnp.asarray(rng.standard_normal(ws, np.float32) / np.sqrt(np.prod(ws[:3])))
        out = jax.eval_shape(lambda a, b: conv.forward("xla", a, b, strides, pads), x, w).shape
        dy = jnp.asarray(rng.standard_normal(out, np.float32))
        fns = {(part, alg): compile_part(part, alg, layer, x, w, dy)
               for part, algs in PARTS.items() for alg in algs if applicable(part, alg, layer)}
        for fn in fns.values():
            jax.block_until_ready(fn())
        samples: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
        keys = list(fns)
        for r in range(rounds):
            for k in (keys if r % 2 == 0 else keys[::-1]):
                t = now()
                jax.block_until_ready(fns[k]())
                samples[k].append(now() - t)
        p = conv.plan(xs, ws, strides, pads, single_device=True)  # as timed here: one device, chunked
        ms = {part: {alg: 1e3 * statistics.median(samples[(part, alg)]) for alg in algs if (part, alg) in samples}
              for part, algs in PARTS.items()}
        row = {"input": xs, "kernel": ws, "strides": strides, "padding": pads, "output": out, "count": count,
               "flops": 2 * int(np.prod(out)) * int(np.prod(ws[:3])), "ms": ms,
               "plan": {"forward": p.forward, "input_grad": p.input_grad, "kernel_grad": p.kernel_grad}}
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    _, h, w, c = row["input"]
    kh, kw, _, k = row["kernel"]
    cells = []
    for part, times in row["ms"].items():
        best = min(times, key=times.get)
        cells.append(", ".join(f"{a} {t:.0f}{'*' if a == row['plan'][part] else ''}{'<' if a == best else ''}"
                               for a, t in times.items()))
    return (f"| {h}x{w}x{c} -> {row['output'][1]}x{row['output'][2]}x{k}, {kh}x{kw}/{row['strides'][0]} "
            f"| {row['count']} | {row['flops'] / 1e9:.2f} | " + " | ".join(cells) + " |")


def totals(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Milliseconds per network step by part for xla, hybrid, tuned (the plan) and the per-pass best."""
    small = lambda r: "slice_dot" if r["output"][1] * r["output"][2] <= conv.HYBRID_MAX_POSITIONS else "xla"  # noqa: E731
    pick = {"xla": lambda r, part: "xla",
            "hybrid": lambda r, part: "xla" if part == "kernel_grad" else small(r),
            "tuned": lambda r, part: r["plan"][part],
            "best": lambda r, part: min(r["ms"][part], key=r["ms"][part].get)}
    return {name: {part: sum(r["count"] * r["ms"][part][choose(r, part)] for r in rows) for part in PARTS}
            for name, choose in pick.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18_cifar", help=f"one of {', '.join(ar.MODEL_NAMES)} (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="input size (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=10, help="head size; no convolution depends on it")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall seconds, or CPU seconds of all threads (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON with every timing")
    a = p.parse_args(argv)
    if a.model not in ar.MODEL_NAMES:
        p.error(f"unknown model {a.model!r}; valid: {', '.join(ar.MODEL_NAMES)}")
    print(f"{a.model}, batch {a.batch}, {a.clock} ms per call (median of {a.rounds}); *: tuned's plan, <: fastest")
    print("| layer | uses | GFLOP | forward | input gradient | kernel gradient |\n|---|---|---|---|---|---|")
    rows = profile(a.model, a.batch, a.rounds, a.image_size, a.clock, a.num_classes)
    tot = totals(rows)
    print("\n| network total, ms | forward | input gradient | kernel gradient | sum |\n|---|---|---|---|---|")
    for name, t in tot.items():
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in t.values()) + f" | **{sum(t.values()):.0f}** |")
    report = {"model": a.model, "batch": a.batch, "clock": a.clock, "rounds": a.rounds, "rows": rows, "totals_ms": tot,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "jax": jax.__version__,
              "backend": jax.default_backend(), "devices": jax.device_count()}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
