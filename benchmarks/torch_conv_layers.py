#!/usr/bin/env python3
"""PyTorch's three passes of single convolution layers on CPU, to set beside ``conv_profile.py``'s.

Runs in an interpreter with ``torch`` (benchmarks/README.md has the environment); it does not import
this project. For each layer, given as ``HxWxC->K/S`` (3x3 kernel, one pixel of zero padding, stride
S, batch ``--batch``), it times the forward pass, the input gradient and the weight gradient (each
alone, through ``aten.convolution_backward``) in PyTorch's default NCHW layout and in channels-last,
round by round in alternating order, and prints wall milliseconds per call (median over rounds).

    /work/torchenv/bin/python benchmarks/torch_conv_layers.py --layers "32x32x16->16/1,8x8x64->64/1"
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import torch

RESNET56 = "32x32x3->16/1,32x32x16->16/1,32x32x16->32/2,16x16x32->32/1,16x16x32->64/2,8x8x64->64/1"


def parse_layer(text: str) -> tuple[int, int, int, int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)->(\d+)/(\d+)", text.strip())
    if not m:
        raise SystemExit(f"bad layer {text!r}: write HxWxC->K/S, e.g. 32x32x16->16/1")
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def passes(layer: tuple[int, int, int, int, int], batch: int, channels_last: bool) -> dict:
    h, w, c, k, s = layer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=g)
    wt = torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn_like(torch.nn.functional.conv2d(x, wt, stride=s, padding=1))
    back = lambda mask: torch.ops.aten.convolution_backward(  # noqa: E731
        gy, x, wt, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, mask)
    return {"forward": lambda: torch.nn.functional.conv2d(x, wt, stride=s, padding=1),
            "input_grad": lambda: back([True, False, False]), "kernel_grad": lambda: back([False, True, False])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default=RESNET56, help="comma-separated HxWxC->K/S (default: resnet56's 3x3 layers)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None, help="JSON with every timing")
    a = p.parse_args()
    layers = [(text.strip(), parse_layer(text)) for text in a.layers.split(",")]
    torch.set_grad_enabled(False)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": a.batch, "layers": {}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}; wall ms per call, median of "
          f"{a.rounds}\n| layer | layout | forward | input gradient | kernel gradient |\n|---|---|---|---|---|")
    for text, layer in layers:
        fns = {(fmt, part): fn for fmt in ("nchw", "channels_last")
               for part, fn in passes(layer, a.batch, fmt == "channels_last").items()}
        for fn in fns.values():  # warm-up: oneDNN creates its primitives on the first call
            fn(), fn()
        times: dict = {key: [] for key in fns}
        for r in range(a.rounds):
            for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t = time.perf_counter()
                fns[key]()
                times[key].append(1000 * (time.perf_counter() - t))
        report["layers"][text] = {f"{fmt}/{part}": v for (fmt, part), v in times.items()}
        for fmt in ("nchw", "channels_last"):
            med = [statistics.median(times[(fmt, part)]) for part in ("forward", "input_grad", "kernel_grad")]
            print(f"| {text} | {fmt} | " + " | ".join(f"{m:.1f}" for m in med) + " |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
