#!/usr/bin/env python3
"""adaresnet_jax's compiled train step against PyTorch (eager, channels-last, torch.compile) on CPU.

Every contender is a long-lived worker process of its own (the JAX step in this interpreter, PyTorch
in the one given by ``--torch-python``), driven over pipes: each is built, compiled and warmed up
first, then they are timed round by round, one at a time, in alternating order, so that drift and
background load hit all of them. Reported per network: images/s (median [min-max] over rounds), ours /
PyTorch as the median of per-round ratios [min-max], and MFU against each framework's own float32
matmul peak (2048 x 2048, measured in every round). Both sides train the same network (parameter counts
checked against the project's, train-mode logits compared with the JAX parameters loaded into PyTorch)
with the same step: a uint8 batch gathered from a resident data set and normalised, softmax
cross-entropy, backward, SGD with momentum 0.9, BatchNorm statistics updated; batch 128, float32.

    python benchmarks/vs_pytorch.py --torch-python /work/torchenv/bin/python
    python benchmarks/vs_pytorch.py --models resnet20 --rounds 2 --steps 1          # ours only
    python benchmarks/vs_pytorch.py --conv-impl hybrid,auto --torch-modes eager     # two JAX contenders

PyTorch is optional: without ``--torch-python`` the script says so and measures ours only. Its
environment: any Python with ``torch`` and ``numpy`` (benchmarks/README.md has the one used here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_MODELS = ("paper", "resnet18", "resnet18_cifar", "resnet56")
TORCH_MODES = ("eager", "channels_last", "compile")
# the project's parameter counts with identity skips (README, tests/test_models.py); "learned" adds one per block
EXPECTED_PARAMS = {"paper": 11_190_730, "resnet18": 11_689_512, "resnet18_cifar": 11_173_962, "resnet56": 853_018,
                   "resnet20": 269_722}
NUM_CLASSES = {"resnet18": 1000}  # the others: 10 (the torchvision network keeps its 1000 classes)


# ----------------------------------------------------------------------------- the JAX worker

def serve_jax(a: argparse.Namespace) -> None:
    """The JAX side of the protocol (see ``Worker``): this project's train step for one network."""
    out = sys.stdout
    sys.stdout = sys.stderr
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax.traverse_util import flatten_dict

    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    import adaresnet_jax as ar
    from adaresnet_jax import train as train_lib
    from throughput import model_flops, peak_flops

    classes = NUM_CLASSES.get(a.model, 10)
    from adaresnet_jax.conv import conv_impl_for

    mesh = train_lib.make_mesh(jax.local_devices()[:1])
    model = ar.create_model(a.model, num_classes=classes, skip=a.skip, conv_impl=conv_impl_for(mesh, a.conv_impl))
    tx = optax.sgd(0.1, momentum=0.9)
    state = train_lib.create_state(model, tx, (32, 32, 3), seed=0, mesh=mesh)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    step = train_lib.make_train_step(model, tx, train_lib.StepOptions(mean=mean, std=std), mesh=mesh)
    rng = np.random.default_rng(0)
    n_batches = 4
    x = rng.integers(0, 256, (n_batches * a.batch, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, classes, n_batches * a.batch).astype(np.int32)
    data = tuple(train_lib.replicate(v, mesh) for v in
                 (x, y, np.arange(len(x), dtype=np.int32).reshape(n_batches, a.batch)))
    t = time.perf_counter()
    compiled = step.on_dataset.lower(state, *data).compile()
    compile_s = time.perf_counter() - t

    def train(steps: int) -> tuple[float, float]:
        nonlocal state
        t, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            state, metrics = compiled(state, *data)
        jax.block_until_ready((state, metrics))
        return time.perf_counter() - t, time.process_time() - cpu

    train(2)
    params = flatten_dict(jax.device_get(state["params"]), sep="/")
    _reply(out, {"ready": True, "params": int(sum(v.size for v in params.values())), "compile_s": compile_s,
                 "flops_per_image": model_flops(model, (32, 32, 3)), "conv_impl": model.conv_impl,
                 "versions": train_lib.versions(), "device": jax.devices()[0].device_kind})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "train":
            seconds, cpu_seconds = train(req["steps"])
            _reply(out, {"seconds": seconds, "cpu_seconds": cpu_seconds})
        elif req["op"] == "peak":
            _reply(out, {"flops_per_s": peak_flops(jnp.float32)})
        elif req["op"] == "export":  # parameters (skip weights made non-zero) + a batch, and our logits
            p = flatten_dict(jax.device_get(state["params"]), sep="/")
            for i, k in enumerate(sorted(k for k in p if k.endswith("skip_weight"))):
                p[k] = np.full_like(p[k], 0.5 + 0.1 * i)
            for k in p:  # non-trivial BatchNorm affine parameters
                if k.endswith(("BatchNorm_0/scale", "bn/scale", "BatchNorm_1/scale")):
                    p[k] = 1.0 + 0.1 * rng.standard_normal(p[k].shape).astype(np.float32)
            xb = ((x[:8].astype(np.float32) / 255 - np.array(mean, np.float32)) / np.array(std, np.float32))
            variables = {"params": _unflatten(p), "batch_stats": state["batch_stats"]}
            logits, _ = model.apply(variables, jnp.asarray(xb), train=True, mutable=["batch_stats"])
            np.savez(req["npz"], x=xb, **{f"params/{k}": np.asarray(v) for k, v in p.items()})
            _reply(out, {"logits": np.asarray(logits).tolist()})
        elif req["op"] == "quit":
            _reply(out, {"bye": True})
            return


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    from flax.traverse_util import unflatten_dict
    return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _reply(out: Any, msg: dict[str, Any]) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


# ----------------------------------------------------------------------------- the driver

class Worker:
    """One contender in its own process: one JSON request per line on stdin, one reply per line on stdout."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log_dir / f"{name.replace('/', '_').replace(':', '_').replace('@', '_')}.log"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("w"),
                                     text=True, cwd=HERE.parent, env={**os.environ, **(env or {})})
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-2000:]
            return {"error": f"worker exited (code {self.proc.wait()}): {tail}"}
        return json.loads(line)

    def request(self, op: str, **kw: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request("quit")
            except (RuntimeError, BrokenPipeError, OSError):
                pass
            self.proc.wait(timeout=60)


def summarize(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info.update({k: fields[k] for k in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache")
                     if k in fields})
        flags = fields.get("Flags", "").split()
        info["avx512f"] = "avx512f" in flags
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def check_logits(jax_w: Worker, torch_w: Worker, tmp: Path) -> float:
    """max |logits_jax - logits_torch| / max |logits_jax| on 8 images, JAX parameters loaded into PyTorch."""
    npz = tmp / "check.npz"
    ours = jax_w.request("export", npz=str(npz))["logits"]
    theirs = torch_w.request("logits", npz=str(npz))["logits"]
    diff = max(abs(a - b) for ra, rb in zip(ours, theirs) for a, b in zip(ra, rb))
    return diff / max(abs(a) for r in ours for a in r)


def run_network(name: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    expected = EXPECTED_PARAMS.get(name)
    workers: dict[str, Worker] = {}
    result: dict[str, Any] = {"model": name, "batch": a.batch, "skip": a.skip, "contenders": {}, "errors": {}}
    common = ["--model", name, "--batch", str(a.batch), "--skip", a.skip]
    try:
        for impl in a.conv_impls:  # built one at a time: compiling never overlaps another's timing
            w = Worker(f"jax:{impl}", [sys.executable, str(Path(__file__).resolve()), "--worker", "--conv-impl", impl,
                                       *common], tmp)
            if "error" in w.info:
                raise RuntimeError(f"jax:{impl}: {w.info['error']}")
            workers[w.name] = w
        for spec in (a.torch_modes if a.torch_python else ()):
            mode, _, policy = spec.partition("@")
            env = {"OMP_WAIT_POLICY": "PASSIVE"} if policy == "passive" else None
            w = Worker(f"torch:{spec}", [a.torch_python, str(HERE / "torch_resnets.py"), "--mode", mode, *common], tmp,
                       env)
            if "error" in w.info:
                result["errors"][w.name] = w.info["error"]
                print(f"  {w.name} failed, left out: {w.info['error'][:300]}", flush=True)
                w.close()
                continue
            workers[w.name] = w
        jax0 = workers[f"jax:{a.conv_impls[0]}"]
        ref = jax0.info["params"]
        for w in workers.values():
            if w.info["params"] != ref:
                raise RuntimeError(f"{name}: {w.name} has {w.info['params']:,} parameters, JAX {ref:,}")
        blocks = ref - expected if expected else None
        result["params"], result["skip_weights"] = ref, blocks
        if expected and a.skip == "identity" and ref != expected:
            raise RuntimeError(f"{name}: {ref:,} parameters, the project's count is {expected:,}")
        torch_ws = [w for n, w in workers.items() if n.startswith("torch:")]
        if torch_ws and not a.no_check:
            result["logits_max_rel_diff"] = check_logits(jax0, torch_ws[0], tmp)
            if not result["logits_max_rel_diff"] < 1e-3:
                raise RuntimeError(f"{name}: PyTorch and JAX logits differ (max rel {result['logits_max_rel_diff']:.2e})")
        names = list(workers)
        ips: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}  # CPU seconds per step (all threads)
        peaks: dict[str, list[float]] = {n: [] for n in names}
        loads = [load()]
        for r in range(a.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                peaks[n].append(workers[n].request("peak")["flops_per_s"])
                time.sleep(0.2)  # let the previous worker's spinning threads go idle
                reply = workers[n].request("train", steps=a.steps)
                ips[n].append(a.steps * a.batch / reply["seconds"])
                cpu[n].append(reply["cpu_seconds"] / a.steps)
            print(f"  round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {ips[n][-1]:.0f} img/s ({cpu[n][-1]:.2f} cpu-s/step)"
                                                             for n in names), flush=True)
        loads.append(load())
        flops = jax0.info["flops_per_image"]
        base = "torch:eager" if "torch:eager" in workers else None
        for n in names:
            peak = statistics.median(peaks[n])
            row = {"images_per_s": ips[n], "train": summarize(ips[n]), "cpu_s_per_step": summarize(cpu[n]),
                   "peak_flops_per_s": peak, "peaks": peaks[n],
                   "mfu": 3 * flops * statistics.median(ips[n]) / peak, "info": workers[n].info}
            for other in names:
                if other != n:
                    row[f"ratio_vs_{other}"] = summarize([x / y for x, y in zip(ips[n], ips[other])])
            result["contenders"][n] = row
        result.update(flops_per_image=flops, loads=loads, baseline=base)
    finally:
        for w in workers.values():
            w.close()
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| network | contender | train img/s | ours / this: median of per-round ratios [min-max] | MFU | "
             "compile or warm-up s |", "|---|---|---|---|---|---|"]
    for res in results:
        jax_names = [n for n in res["contenders"] if n.startswith("jax:")]
        for n, row in res["contenders"].items():
            t = row["train"]
            ratio = "" if n.startswith("jax:") else ", ".join(
                f"{row_j}: {_fmt(res['contenders'][row_j][f'ratio_vs_{n}'])}" for row_j in jax_names)
            if n.startswith("jax:") and len(jax_names) > 1 and n != jax_names[0]:
                ratio = f"{n} / {jax_names[0]}: {_fmt(row[f'ratio_vs_{jax_names[0]}'])}"
            setup = row["info"].get("compile_s", row["info"].get("warmup_s", float("nan")))
            lines.append(f"| {res['model']} | {n} | {t['median']:.0f} [{t['min']:.0f}-{t['max']:.0f}] | {ratio} | "
                         f"{100 * row['mfu']:.0f}% | {setup:.1f} |")
    return "\n".join(lines)


def _fmt(r: dict[str, float]) -> str:
    return f"**{r['median']:.2f}** [{r['min']:.2f}-{r['max']:.2f}]"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated networks (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
    p.add_argument("--skip", default="learned", choices=("identity", "learned"),
                   help="skip rule of both sides (default: %(default)s, AdaResNet)")
    p.add_argument("--conv-impl", default="auto",
                   help="the JAX contenders' conv_impl, comma-separated; the first is the one compared (default: %(default)s)")
    p.add_argument("--torch-python", default=None,
                   help="a Python interpreter with torch; without it only the JAX step is measured")
    p.add_argument("--torch-modes", default=",".join(TORCH_MODES),
                   help=f"PyTorch contenders, comma-separated from {', '.join(TORCH_MODES)} (default: all; "
                   "channels_last and compile run in channels-last memory format); a suffix @passive runs that "
                   "contender with OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of spinning while they wait)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="train steps per contender per round (default: %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip the logits comparison of the two frameworks")
    p.add_argument("--out", default=None, help="raw JSON (default: benchmarks/results/cpu-vs-pytorch-<date>.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.models = a.models.split(",")
    a.conv_impls = a.conv_impl.split(",")
    a.torch_modes = a.torch_modes.split(",")
    for m in a.torch_modes:
        mode, _, policy = m.partition("@")
        if mode not in TORCH_MODES or policy not in ("", "passive"):
            p.error(f"unknown torch mode {m!r}; valid: {', '.join(TORCH_MODES)}, each optionally with @passive")
    if a.torch_python and not Path(a.torch_python).exists():
        p.error(f"--torch-python {a.torch_python}: no such file")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.worker:
        a.conv_impl = a.conv_impls[0]
        serve_jax(a)
        return {}
    if not a.torch_python:
        print("PyTorch not measured: no --torch-python given (an interpreter with torch and numpy); "
              "measuring the JAX step only.", flush=True)
    report: dict[str, Any] = {
        "command": " ".join(["vs_pytorch.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": machine(),
        "load_start": load(), "flags": {k: v for k, v in vars(a).items() if k not in ("worker", "model")},
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            print(f"{name}:", flush=True)
            try:
                report["results"].append(run_network(name, a, Path(tmp)))
            except RuntimeError as e:
                print(f"  {e}", file=sys.stderr, flush=True)
                report["results"].append({"model": name, "error": str(e)})
    report["load_end"] = load()
    ok = [r for r in report["results"] if "error" not in r]
    if ok:
        first = ok[0]["contenders"]
        report["versions"] = {n: c["info"].get("versions") for n, c in first.items()}
    out = Path(a.out) if a.out else HERE / "results" / f"cpu-vs-pytorch-{report['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{report['machine'].get('Model name', platform.processor())}, {report['machine']['cpus']} CPUs; "
          f"{report['load_start']} at the start, {report['load_end']} at the end; raw: {out}")
    print(table(ok))
    return report


if __name__ == "__main__":
    main()
