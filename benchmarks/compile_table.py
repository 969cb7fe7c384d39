"""Compiled for accelerators, never run: memory, FLOPs and roofline bounds of the benchmark networks on H100, H200,
A100 and TPU v5e, from ``train.py --compile-only`` (adaresnet_jax/aot.py). Regenerates the table of
benchmarks/README.md ("Compiled for accelerators (not run)") and its raw JSON.

    # TPU rows need jax[tpu] (the test extra), GPU rows jax[cuda12]; each interpreter compiles the rows it can:
    nice -n 5 python benchmarks/compile_table.py --platform gpu          # appends to results/compile_table.json
    nice -n 5 python benchmarks/compile_table.py --platform tpu
    python benchmarks/compile_table.py --render                          # the markdown table, from the JSON

Rows already in the JSON are kept (delete an entry to recompile it); ``--max-batch 'NET|TARGET' ...`` recompiles
those rows with ``--find-max-batch``: the largest global batch whose train step fits, to within 1/32 (one compile
of the train step per try, placed by a linear model of memory in the batch; aot.find_max_batch). A row without
it says how long one compile took here. Every network compiles with ``--dtype auto`` (bfloat16 on the targets) at
its preset's global batch and data set.

    PYTHONPATH=. JAX_PLATFORMS=cpu nice -n 5 /path/to/gpu-venv/bin/python benchmarks/compile_table.py \
        --max-batch 'resnet50|gpu:h100' 'paper|gpu:h100' ...
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "compile_table.json"

# network: the train.py flags of its run (preset, batch and data set of that preset)
NETS = {
    "paper": ["--preset", "paper", "--dtype", "auto"],
    "resnet18_cifar": ["--preset", "cifar", "--dtype", "auto"],
    "resnet56": ["--preset", "cifar", "--model", "resnet56", "--dtype", "auto"],
    "resnet50_keras": ["--preset", "paper", "--model", "resnet50_keras", "--skip", "identity", "--dtype", "auto"],
    "resnet50": ["--preset", "imagenet", "--skip", "identity"],
}
TARGETS = {"gpu": ["gpu:h100", "gpu:h200", "gpu:a100-80gb", "gpu:h100:2x1x8"], "tpu": ["tpu:v5e:2x2", "tpu:v5e:16x16"]}
# what is compiled by default: every network on the GPUs; the 32-pixel ones on a v5e host; ResNet-50 on a v5e pod
DEFAULT_ROWS = {**{f"{n}|{t}": None for n in NETS for t in TARGETS["gpu"][:3]},
                "resnet50|gpu:h100:2x1x8": None,
                **{f"{n}|tpu:v5e:2x2": None for n in ("paper", "resnet18_cifar", "resnet56", "resnet50_keras")},
                "resnet50|tpu:v5e:16x16": None}
ANCHORS = {"resnet50|gpu:h100": "MLPerf Training ResNet-50: about 7,160 img/s per H100",
           "resnet50|gpu:h200": "MLPerf Training ResNet-50: about 7,950 img/s per H200",
           "resnet50|gpu:a100-80gb": "NVIDIA's PyTorch ResNet-50 AMP: 2,470 img/s per A100 80GB"}


def compile_row(net: str, target: str, max_batch: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "train.py", *NETS[net], "--compile-only", target, "--workdir", tmp,
               *(["--find-max-batch"] if max_batch else [])]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        report_path = Path(tmp) / "compile_report.json"
        if not report_path.exists():
            return {"error": (out.stderr.strip().splitlines() or ["?"])[-1], "command": " ".join(cmd[1:])}
        report = json.loads(report_path.read_text())
    report["command"] = "python " + " ".join(cmd[1:]).replace(tmp, "DIR")
    report["wall_s"] = round(wall, 1)
    report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["compilers"] = _compilers()
    report["exit_code"] = out.returncode
    return report


def _compilers() -> dict[str, str]:
    """Versions of the packages that compiled the row (this interpreter's)."""
    from importlib import metadata

    out = {}
    for name in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def max_batch_cell(r: dict) -> str:
    """The "largest batch" cell: the batch, the first that does not fit, the compiles and seconds of the search;
    or, not searched, the seconds one compile of the train step took here."""
    mb = r.get("max_batch")
    if not mb:
        return f"not searched in time: {r['programs']['train'].get('compile_s', 0):,.0f} s a compile here"
    if mb["max_batch"] is None:
        return f"none ({mb['first_that_does_not_fit']} does not fit)"
    rest = ("all of the training set" if mb["capped_by_training_set"]
            else f"{mb['first_that_does_not_fit']:,} does not")
    return f"{mb['max_batch']:,} ({rest}; {mb['compiles']} compiles, {mb['search_s']:,.0f} s)"


def render(rows: dict) -> str:
    g = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = ["| network | target | batch (per device) | memory per device, GiB (of usable) | largest batch | "
             "GFLOP per image (HLO / analytic 3x fwd) | roofline bound, img/s per device | limited by | anchor | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted(set(DEFAULT_ROWS) | set(rows), key=lambda k: (list(NETS).index(k.split("|")[0]), k.split("|")[1]))
    for key in keys:
        net, target = key.split("|")
        r = rows.get(key)
        if r is None or "error" in r:
            why = "not compiled (time budget on a 2-core machine)" if r is None else f"failed: {r['error']}"
            lines.append(f"| {net} | {target} | | {why} | | | | | {ANCHORS.get(key, '')} | |")
            continue
        run, tr, rf = r["run"], r["programs"]["train"], r["roofline"]
        mbs = max_batch_cell(r)
        lines.append(
            f"| {net} | {target} ({r['target']['devices']} dev, {r['target']['hosts']} host) | {run['global_batch']} "
            f"({run['per_device_batch']}) | {g(r['needed_bytes_per_device'])} of {g(r['target']['usable_memory_bytes'])}: "
            f"{'fits' if r['fits'] else 'does not fit'} | {mbs} | {tr['flops_per_image'] / 1e9:.2f} / "
            f"{r['analytic']['train_flops_per_image'] / 1e9:.2f} | {rf['images_per_s_per_device_upper_bound']:,.0f} | "
            f"{rf['limited_by']} | {ANCHORS.get(key, '')} | {r['compile_s']:.0f} |")
    coll = ["", "Collectives in the train step (count, MiB of results per device):", ""]
    for key in keys:
        r = rows.get(key)
        if r and "error" not in r and r["target"]["devices"] > 1:
            c = r["programs"]["train"]["collectives"]
            coll.append(f"- {key.replace('|', ' on ')}: " + ", ".join(
                f"{v['count']} {k} ({v['result_bytes'] / 2**20:.1f} MiB)" for k, v in c.items()))
    return "\n".join(lines + coll)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", choices=("gpu", "tpu"), help="compile the default rows of this platform")
    p.add_argument("--only", nargs="*", default=None, help="NET|TARGET rows to compile (default: the platform's)")
    p.add_argument("--max-batch", nargs="*", default=[], help="NET|TARGET rows to compile with --find-max-batch")
    p.add_argument("--render", action="store_true", help="print the markdown table from the JSON")
    p.add_argument("--out", type=Path, default=OUT, help="the JSON to read and update (parallel runs: one each)")
    p.add_argument("--merge", nargs="*", type=Path, default=[], help="copy these JSONs' rows into --out")
    a = p.parse_args()
    out = a.out
    if a.merge:
        rows = json.loads(out.read_text())["rows"] if out.exists() else {}
        for path in a.merge:
            rows.update(json.loads(path.read_text())["rows"])
        out.write_text(json.dumps({"machine": _cpu(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")
        return
    rows = json.loads(out.read_text())["rows"] if out.exists() else {}
    if a.render:
        print(render(rows))
        return
    todo = a.only if a.only is not None else [] if a.max_batch and not a.platform else [
        k for k in DEFAULT_ROWS if k.split("|")[1].startswith(a.platform or "")]
    for key in dict.fromkeys([*todo, *a.max_batch]):
        if key in rows and key not in a.max_batch and "error" not in rows[key]:
            continue
        net, target = key.split("|")
        print(f"compiling {net} for {target} ...", file=sys.stderr, flush=True)
        r = compile_row(net, target, key in a.max_batch)
        print(f"  {r.get('verdict', r.get('error'))} ({r.get('wall_s', '?')} s)", file=sys.stderr, flush=True)
        rows = json.loads(out.read_text())["rows"] if out.exists() else {}  # another platform's run may have added rows
        rows[key] = r
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": _cpu(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
