#!/usr/bin/env python3
"""Images/s the streaming input pipeline delivers, against the train step's, to see which one limits a run.

Writes a folder of ImageNet-like JPEGs (smooth random scenes with grain, about 500x375 px and 100 KB, like
ImageNet's average photo), then times:

* decode per core: ``images.train_image`` (Inception crop + flip to ``--image-size``) and ``eval_image``
  on one thread, file bytes already in memory;
* the pipeline for each ``--workers`` count: ``TrainStream`` (read, decode, crop, batch in grain worker
  processes, or threads for 0) and ``DevicePrefetch`` (the global batch put on the devices with
  ``jax.make_array_from_process_local_data``), consumed as fast as possible: what train.py's streaming
  path can feed;
* the train step (``benchmarks/throughput.py``'s machinery: the package's compiled update) of ``--model``
  at the same image size and batch.

Files are read from the page cache after the first pass (so this is decode-bound, not disk-bound).
Rounds alternate between contenders; medians with min-max. ``--out`` gets every raw number as JSON.

    python benchmarks/input_pipeline.py                          # resnet50 at 224, batch 64, workers 0,1,2
    python benchmarks/input_pipeline.py --workers 0,2,4,8 --model resnet18 --image-size 160
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaresnet_jax.data import images as img  # noqa: E402
from adaresnet_jax.data import streaming as S  # noqa: E402


def write_folder(root: Path, n: int, classes: int = 8, seed: int = 0) -> None:
    """``n`` JPEGs (quality 90) in root/train/<class>/ and a few in root/val/<class>/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n + classes):
        w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        scene = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), np.float32)
        scene += rng.normal(0, 16, scene.shape)  # sensor-like grain: JPEGs of ImageNet's size and entropy
        split = "train" if i < n else "val"
        path = root / split / f"c{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8)).save(path, quality=90)


def per_core(sd: S.StreamingData, size: int, reps: int = 2) -> dict[str, float]:
    """Images/s of one thread decoding with the train and the eval transform (bytes in memory)."""
    files = [sd.train_records[int(i)][0] for i in sd.train_idx]
    out = {}
    for name, fn in (("train", lambda d, k: img.train_image(d, size, np.random.default_rng(k))),
                     ("eval", lambda d, k: img.eval_image(d, size))):
        t = time.perf_counter()
        for r in range(reps):
            for k, data in enumerate(files):
                fn(data, k + r * len(files))
        out[name] = reps * len(files) / (time.perf_counter() - t)
    out["mean_kb"] = float(np.mean([len(f) for f in files]) / 1024)
    return out


def pipeline(sd: S.StreamingData, workers: int, batch: int, size: int, steps: int, mesh: Any) -> float:
    """Images/s of TrainStream + DevicePrefetch over ``steps`` batches (after one warm-up batch)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    data = NamedSharding(mesh, P("data"))
    spe = len(sd.train_idx) // batch

    def place(item: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
        x, y = item["image"], item["label"]
        return (jax.make_array_from_process_local_data(data, x, (batch, *x.shape[1:])),
                jax.make_array_from_process_local_data(data, y, (batch,)))

    from adaresnet_jax.inputs import DevicePrefetch

    spec = S.TrainImages(batch=batch, steps_per_epoch=spe, size=size, seed=0, augment=True)
    stream = S.TrainStream(sd, spec, range(0, steps + 1), workers=workers)
    batches = DevicePrefetch(stream, place)
    try:
        jax.block_until_ready(next(batches))  # workers started, first batch through
        t = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(next(batches))
        return steps * batch / (time.perf_counter() - t)
    finally:
        batches.close()


def machine() -> dict[str, Any]:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "load_avg_1_5_15": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="0,1,2", help="comma-separated grain worker counts (0: threads)")
    p.add_argument("--images", type=int, default=256, help="JPEGs written (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="batches timed per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="resnet50", help="network whose train step is timed ('none': skip it)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--dir", default=None, help="folder for the JPEGs (default: a temporary one)")
    p.add_argument("--out", default=None, help="JSON with every number")
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    import throughput
    from adaresnet_jax import train as train_lib

    workers = [int(w) for w in a.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.dir or tmp) / "jpegs"
        if not (root / "train").is_dir():
            write_folder(root, a.images)
        sd = S.open_streaming("bench", str(root))
        report: dict[str, Any] = {
            "command": " ".join(["input_pipeline.py", *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **machine(),
            "versions": {**train_lib.versions(), "pillow": __import__("PIL").__version__,
                         "grain": __import__("importlib.metadata").metadata.version("grain")},
            "device": jax.devices()[0].device_kind, "flags": vars(a)}
        report["per_core"] = per_core(sd, a.image_size)
        mesh = train_lib.make_mesh(jax.local_devices())
        step = None
        if a.model != "none":
            dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
            step = throughput.build(a.model, "identity", "auto" if jax.default_backend() != "cpu" else "hybrid",
                                    a.batch_size, a.image_size, dtype, mesh, "cifar", n_batches=1)
            throughput.time_train(step, 1)
        runs: dict[str, list[float]] = {f"workers={w}": [] for w in workers}
        if step is not None:
            runs["train step"] = []
        for r in range(a.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                if name == "train step":
                    runs[name].append(a.steps * a.batch_size / throughput.time_train(step, a.steps))
                else:
                    runs[name].append(pipeline(sd, int(name.split("=")[1]), a.batch_size, a.image_size, a.steps,
                                               mesh))
        report["images_per_s"] = runs
    print(table(report))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))
    return report


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def table(report: dict[str, Any]) -> str:
    pc, f = report["per_core"], report["flags"]
    lines = [f"{report['cpu']}, {report['cores']} cores, load average {report['load_avg_1_5_15'][0]:.1f} at the "
             f"start; {report['date']}; {f['image_size']} px, batch {f['batch_size']}",
             f"decode per core (one thread): train crop {pc['train']:.0f} img/s, eval crop {pc['eval']:.0f} img/s "
             f"(JPEGs of {pc['mean_kb']:.0f} KB on average)", "",
             "| contender | images/s median [min-max] |", "|---|---|"]
    for name, xs in report["images_per_s"].items():
        label = f"train step ({f['model']}, {f['dtype']}, {report['device']})" if name == "train step" else \
            f"pipeline, {name.replace('workers=', '')} worker processes" + (" (threads)" if name == "workers=0" else "")
        lines.append(f"| {label} | {_num(statistics.median(xs))} [{_num(min(xs))}-{_num(max(xs))}] |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
