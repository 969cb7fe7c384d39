"""The project's named networks written in PyTorch, for benchmarks/vs_pytorch.py (no project imports).

Each network computes what ``adaresnet_jax.create_model(name, ...)`` computes: the same layers,
padding semantics (TF/Keras ``'same'`` for ``paper``, PyTorch's symmetric padding otherwise), BatchNorm
settings, shortcuts and skip rule (``identity``: F(x) + x, ``learned``: F(x) + w x with one scalar
``w`` per block, AdaResNet). Parameter counts equal the JAX models' (checked by vs_pytorch.py and,
when torch is installed, by tests/test_benchmarks.py). Inputs are NCHW, or channels-last in memory.
Runs under any Python with torch (the project itself needs 3.12; torch's CPU wheel here is for 3.11).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# name -> (class count, blocks per stage, stage strides, width, stem, shortcut, padding, bottleneck)
SPECS: dict[str, dict] = {
    "paper": dict(classes=10, stages=(2, 2, 2, 2), strides=(2, 2, 2, 2), width=64, stem="imagenet",
                  shortcut="projection", keras=True),
    "resnet18": dict(classes=1000, stages=(2, 2, 2, 2), strides=(1, 2, 2, 2), width=64, stem="imagenet",
                     shortcut="projection", keras=False),
    "resnet18_cifar": dict(classes=10, stages=(2, 2, 2, 2), strides=(1, 2, 2, 2), width=64, stem="cifar",
                           shortcut="projection", keras=False),
    **{f"resnet{6 * n + 2}": dict(classes=10, stages=(n, n, n), strides=(1, 2, 2), width=16, stem="cifar",
                                  shortcut="zero_pad", keras=False) for n in (3, 5, 7, 9, 18)},
}


def same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    """TF/Keras 'same' padding along one axis: (lo, hi), the extra one on the high side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


class Conv(nn.Module):
    """A 2-D convolution with 'same' (TF: asymmetric where needed) or symmetric (k // 2) padding."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, *, bias: bool, same: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=0 if same else k // 2, bias=bias)
        self.k, self.stride, self.same = k, stride, same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            (hl, hh), (wl, wh) = (same_pads(s, self.k, self.stride) for s in x.shape[2:])
            if hl or hh or wl or wh:
                x = F.pad(x, (wl, wh, hl, hh))
        return self.conv(x)


class Block(nn.Module):
    """BasicBlock: two 3x3 conv + BN, a shortcut where the shape changes, then act(F(x) + w x)."""

    def __init__(self, cin: int, cout: int, stride: int, *, skip: str, shortcut: str, keras: bool,
                 flax_name: str) -> None:
        super().__init__()
        self.flax_name = flax_name  # "stage1_block2": the JAX module holding this block's parameters
        bn = (lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)) if keras else nn.BatchNorm2d
        conv = lambda a, b, k, s: Conv(a, b, k, s, bias=keras, same=keras)  # noqa: E731
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), bn(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3, 1), bn(cout)
        self.project = cin != cout or stride != 1
        self.shortcut, self.stride, self.extra = shortcut, stride, cout - cin
        if self.project and shortcut == "projection":
            self.proj_conv = Conv(cin, cout, 1, stride, bias=keras, same=keras)
            self.proj_bn = bn(cout)
        self.skip_weight = nn.Parameter(torch.zeros(1)) if skip == "learned" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.project:
            if self.shortcut == "projection":
                x = self.proj_bn(self.proj_conv(x))
            else:  # He et al. option A: subsample, zero-pad the new channels
                x = x[:, :, :: self.stride, :: self.stride]
                x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(y + (x if self.skip_weight is None else self.skip_weight * x))


class ResNet(nn.Module):
    def __init__(self, name: str, skip: str = "learned") -> None:
        super().__init__()
        s = SPECS[name]
        keras, width = s["keras"], s["width"]
        self.keras = keras
        if s["stem"] == "imagenet":
            self.stem_conv = Conv(3, width, 7, 2, bias=keras, same=keras)
            self.pool = True
        else:
            self.stem_conv = Conv(3, width, 3, 1, bias=keras, same=keras)
            self.pool = False
        self.stem_bn = nn.BatchNorm2d(width, eps=1e-3, momentum=0.01) if keras else nn.BatchNorm2d(width)
        blocks, cin = [], width
        for i, (n, stride) in enumerate(zip(s["stages"], s["strides"])):
            cout = width * 2**i
            for j in range(n):
                blocks.append(Block(cin, cout, stride if j == 0 else 1, skip=skip, shortcut=s["shortcut"],
                                    keras=keras, flax_name=f"stage{i + 1}_block{j + 1}"))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, s["classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        if self.pool:
            if self.keras:  # 'same' max-pool: pads with -inf on the high side
                (hl, hh), (wl, wh) = (same_pads(d, 3, 2) for d in x.shape[2:])
                x = F.max_pool2d(F.pad(x, (wl, wh, hl, hh), value=-math.inf), 3, 2)
            else:
                x = F.max_pool2d(x, 3, 2, padding=1)
        x = self.blocks(x)
        return self.head(x.mean((2, 3)))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def create(name: str, skip: str = "learned") -> ResNet:
    if name not in SPECS:
        raise ValueError(f"no PyTorch definition of {name!r}; have {sorted(SPECS)}")
    return ResNet(name, skip)


def flax_names(model: ResNet) -> list[tuple[nn.Module, str]]:
    """(PyTorch layer, the JAX module that holds its parameters) for every conv, BatchNorm and the head."""
    pairs: list[tuple[nn.Module, str]] = [(model.stem_conv.conv, "stem_conv"), (model.stem_bn, "stem_bn"),
                                          (model.head, "head")]
    for b in model.blocks:
        pairs += [(b.conv1.conv, f"{b.flax_name}/Conv_0"), (b.bn1, f"{b.flax_name}/BatchNorm_0"),
                  (b.conv2.conv, f"{b.flax_name}/Conv_1"), (b.bn2, f"{b.flax_name}/BatchNorm_1")]
        if hasattr(b, "proj_conv"):
            pairs += [(b.proj_conv.conv, f"{b.flax_name}/proj_conv"), (b.proj_bn, f"{b.flax_name}/proj_bn")]
    return pairs


def load_flax(model: ResNet, params: dict[str, np.ndarray]) -> None:
    """Copy the JAX model's parameters (flattened flax names, "stage1_block1/Conv_0/kernel") into ``model``:
    HWIO kernels become OIHW, Dense (in, out) becomes (out, in). Every parameter must find its place."""
    params = dict(params)

    def put(param: torch.Tensor, key: str, value: np.ndarray) -> None:
        if tuple(param.shape) != value.shape:
            raise ValueError(f"{key}: JAX shape {value.shape}, PyTorch {tuple(param.shape)}")
        param.data = torch.from_numpy(np.ascontiguousarray(value, np.float32))

    for module, prefix in flax_names(model):
        for leaf in ("kernel", "scale", "bias"):
            key = f"{prefix}/{leaf}"
            if key in params:
                value = params.pop(key)
                if leaf == "kernel":
                    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
                put(module.bias if leaf == "bias" else module.weight, key, value)
    for b in model.blocks:
        if b.skip_weight is not None:
            key = f"{b.flax_name}/skip/skip_weight"
            put(b.skip_weight, key, params.pop(key))
    if params:
        raise ValueError(f"JAX parameters with no PyTorch counterpart: {sorted(params)[:5]}")


# ----------------------------------------------------------------------------- benchmark worker

MODES = ("eager", "channels_last", "compile")


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matrix product (median of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


class Trainer:
    """The train step of vs_pytorch.py: uint8 batch gathered from a resident data set, normalised,
    forward, softmax cross-entropy, backward, SGD (momentum 0.9), BatchNorm statistics updated."""

    def __init__(self, name: str, skip: str, batch: int, mode: str, n_batches: int = 4, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.name, self.skip = name, skip
        self.model = create(name, skip)
        self.params = num_params(self.model)
        self.channels_last = mode in ("channels_last", "compile")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = torch.compile(self.model) if mode == "compile" else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        rng = np.random.default_rng(seed)
        self.x = torch.from_numpy(rng.integers(0, 256, (n_batches * batch, 32, 32, 3), dtype=np.uint8))
        self.y = torch.from_numpy(rng.integers(0, SPECS[name]["classes"], n_batches * batch).astype(np.int64))
        self.perm = torch.arange(n_batches * batch).reshape(n_batches, batch)
        self.mean = torch.tensor((0.49, 0.48, 0.45)).reshape(1, 3, 1, 1)
        self.std = torch.tensor((0.25, 0.24, 0.26)).reshape(1, 3, 1, 1)
        self.i = 0

    def step(self) -> None:
        idx = self.perm[self.i % len(self.perm)]
        self.i += 1
        x = (self.x[idx].permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        y = self.y[idx]
        self.model.train()
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.correct = (logits.argmax(-1) == y).sum()  # as the JAX step counts it

    def time(self, steps: int) -> tuple[float, float]:
        """(wall seconds, CPU seconds of all threads) for ``steps`` steps."""
        t, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        return time.perf_counter() - t, time.process_time() - cpu

    def logits(self, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        """Train-mode logits with the JAX model's parameters on the normalised NHWC batch ``x``."""
        model = create(self.name, self.skip)
        load_flax(model, params)
        model.train()
        with torch.no_grad():
            return model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()


def serve(argv: list[str] | None = None) -> None:
    """A long-lived worker driven by vs_pytorch.py: one JSON request per stdin line, one reply per line."""
    p = argparse.ArgumentParser(description="PyTorch worker of benchmarks/vs_pytorch.py")
    p.add_argument("--model", required=True)
    p.add_argument("--skip", default="learned")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--mode", choices=MODES, default="eager")
    a = p.parse_args(argv)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything torch prints must not break the protocol
    t = time.perf_counter()
    try:
        trainer = Trainer(a.model, a.skip, a.batch, a.mode)
        trainer.time(2)  # warm-up; under torch.compile, the compile
    except Exception as e:  # noqa: BLE001 - reported to the driver, which carries on without this contender
        _reply(out, {"error": f"{type(e).__name__}: {e}"[:2000]})
        return
    info = {"ready": True, "params": trainer.params, "warmup_s": time.perf_counter() - t,
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0], "numpy": np.__version__},
            "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available()}
    _reply(out, info)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "train":
            seconds, cpu_seconds = trainer.time(req["steps"])
            _reply(out, {"seconds": seconds, "cpu_seconds": cpu_seconds})
        elif req["op"] == "peak":
            _reply(out, {"flops_per_s": matmul_peak()})
        elif req["op"] == "logits":
            with np.load(req["npz"]) as f:
                params = {k[len("params/"):]: f[k] for k in f.files if k.startswith("params/")}
                logits = trainer.logits(params, f["x"])
            _reply(out, {"logits": logits.tolist()})
        elif req["op"] == "quit":
            _reply(out, {"bye": True})
            return


def _reply(out: Any, msg: dict) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


if __name__ == "__main__":
    serve()
