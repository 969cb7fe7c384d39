#!/usr/bin/env python3
"""Convergence of ResNet (identity skip) versus AdaResNet (learned skip) over several seeds.

Trains every (skip rule, seed) pair through the package's own training code
(``adaresnet_jax.train.run``, what train.py runs), each in its own workdir under ``--out``, then
writes a table of final test accuracy (mean +- std over seeds; the difference to the first rule with
a 95% Welch interval and p-value), epochs and seconds to reach given test accuracies, throughput and
the learned skip weights per block, plus PNG plots. A sweep that was stopped resumes where it
stopped: finished runs are kept, an interrupted run resumes from its checkpoint.

    python benchmarks/convergence.py --preset quick --seeds 3
    python benchmarks/convergence.py --preset paper --seeds 3 --out runs/paper \\
        --dataset cifar10 --data-dir data/cifar10.npz --max-train 10000      # any train.py flag
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaresnet_jax import train as train_lib  # noqa: E402
from adaresnet_jax.config import parse_config  # noqa: E402
from adaresnet_jax.metrics import read_jsonl  # noqa: E402
from adaresnet_jax.models import SKIP_RULES  # noqa: E402


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other flags go to train.py "
                                "(see python train.py --help), e.g. --epochs 5 --dataset digits.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", help="train.py preset (default: %(default)s)")
    p.add_argument("--skips", default="identity,learned",
                   help="comma-separated skip rules; the first is the baseline (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per rule (default: %(default)s)")
    p.add_argument("--targets", default=None,
                   help="comma-separated test accuracies for epochs/seconds-to-accuracy (default: 3 levels "
                        "below the baseline's final mean)")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/convergence-<preset>)")
    a, rest = p.parse_known_args(argv)
    a.skips = a.skips.split(",")
    for s in a.skips:
        if s not in SKIP_RULES:
            p.error(f"unknown skip rule {s!r}; valid: {', '.join(SKIP_RULES)}")
    if a.seeds < 1:
        p.error(f"--seeds must be at least 1, got {a.seeds}")
    a.out = Path(a.out or f"runs/convergence-{a.preset}")
    return a, rest


def run_sweep(a: argparse.Namespace, train_args: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every (skip, seed) run; returns {skip: [{"summary", "rows"} per seed]}."""
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in a.skips}
    for seed in range(a.seeds):
        for skip in a.skips:
            workdir = a.out / f"{skip}-seed{seed}"
            summary_path = workdir / "summary.json"
            done = summary_path.exists() and json.loads(summary_path.read_text()).get("finished")
            if not done:
                cfg = parse_config(["--preset", a.preset, *train_args, "--skip", skip, "--seed", str(seed),
                                    "--workdir", str(workdir), "--quiet"])
                print(f"[convergence] {skip} seed {seed} -> {workdir}", flush=True)
                try:
                    result = train_lib.run(cfg)
                except train_lib.UsageError as e:
                    sys.exit(f"convergence.py: error: {e}")
                if result.get("interrupted"):
                    sys.exit(f"convergence.py: stopped in {workdir}; rerun the same command to resume the sweep")
            runs[skip].append({"summary": json.loads(summary_path.read_text()),
                               "rows": read_jsonl(workdir / "metrics.jsonl")})
    return runs


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan")


def welch(a: list[float], b: list[float]) -> dict[str, float]:
    """Difference of means b - a with a 95% Welch interval and two-sided p-value (nan under 2 seeds)."""
    diff = statistics.fmean(b) - statistics.fmean(a)
    if min(len(a), len(b)) < 2:
        return {"diff": diff, "lo": math.nan, "hi": math.nan, "p": math.nan}
    from scipy import stats

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "lo": diff, "hi": diff, "p": 1.0 if diff == 0 else 0.0}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = stats.t.ppf(0.975, df)
    p = 2 * stats.t.sf(abs(diff / se), df)
    return {"diff": diff, "lo": diff - t * se, "hi": diff + t * se, "p": float(p), "df": df}


def to_reach(rows: list[dict[str, Any]], target: float) -> tuple[int | None, float | None]:
    """First epoch (1-based) whose test accuracy reaches ``target``, and the training seconds until then."""
    seconds = 0.0
    for r in rows:
        seconds += r["epoch_time"]
        if r["test_acc"] >= target:
            return r["epoch"], seconds
    return None, None


def report(a: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    base = a.skips[0]
    finals = {s: [r["summary"]["test_acc"] for r in runs[s]] for s in a.skips}
    base_mean = statistics.fmean(finals[base])
    targets = ([float(t) for t in a.targets.split(",")] if a.targets else
               [round(base_mean * f, 3) for f in (0.8, 0.9, 0.97)])
    cfg = runs[base][0]["summary"]["config"]
    out: dict[str, Any] = {"preset": a.preset, "seeds": a.seeds, "targets": targets, "config": cfg,
                           "versions": runs[base][0]["summary"]["versions"],
                           "devices": runs[base][0]["summary"]["devices"], "rules": {}}
    lines = [f"Final test accuracy after {cfg['epochs']} epochs, {a.seeds} seed(s), preset {a.preset} "
             f"({cfg['model']} on {cfg['dataset']}):", "",
             f"| skip | test acc (mean +- std) | vs {base} (95% CI, Welch p) | acc at best val | img/s | "
             + " | ".join(f"epochs / s to {t:.3f}" for t in targets) + " |",
             "|---|---|---|---|---|" + "---|" * len(targets)]
    for s in a.skips:
        m, sd = mean_std(finals[s])
        w = welch(finals[base], finals[s])
        at_best = [r["summary"]["test_acc_at_best_val"] for r in runs[s]]
        ips = statistics.median(r["summary"]["images_per_sec"] for r in runs[s])
        reach = []
        for t in targets:
            hits = [to_reach(r["rows"], t) for r in runs[s]]
            ok = [h for h in hits if h[0] is not None]
            reach.append({"target": t, "reached": len(ok), "epochs": [h[0] for h in hits],
                          "seconds": [h[1] for h in hits]})
        skip_final = {k: [r["summary"]["skip_weights"][k] for r in runs[s]]
                      for k in runs[s][0]["summary"]["skip_weights"]}
        out["rules"][s] = {"test_acc": finals[s], "mean": m, "std": sd, "vs_base": w, "images_per_sec": ips,
                           "test_acc_at_best_val": at_best, "reach": reach, "skip_weights": skip_final}
        vs = "-" if s == base else f"{100 * w['diff']:+.2f} [{100 * w['lo']:+.2f}, {100 * w['hi']:+.2f}], p={w['p']:.3f}"
        best = "-" if None in at_best else f"{100 * statistics.fmean(at_best):.2f}"
        cells = []
        for rc in reach:
            ok = [(e, sec) for e, sec in zip(rc["epochs"], rc["seconds"]) if e is not None]
            cells.append(f"{statistics.fmean(e for e, _ in ok):.1f} / {statistics.fmean(x for _, x in ok):.1f} "
                         f"({rc['reached']}/{a.seeds})" if ok else f"never (0/{a.seeds})")
        lines.append(f"| {s} | {100 * m:.2f} +- {100 * sd:.2f} | {vs} | {best} | {ips:.0f} | " + " | ".join(cells) + " |")
    blocks = _blocks(runs, a.skips)
    if blocks:  # no table when every rule is the plain identity skip
        lines += ["", "Learned skip weights at the end (mean +- std over seeds; per-channel weights averaged):", "",
                  "| skip | " + " | ".join(blocks) + " |", "|---|" + "---|" * len(blocks)]
    for s in a.skips:
        sw = out["rules"][s]["skip_weights"]
        if sw:
            cells = [f"{mean_std([_scalar(v) for v in sw[k]])[0]:+.3f} +- {mean_std([_scalar(v) for v in sw[k]])[1]:.3f}"
                     if k in sw else "-" for k in blocks]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    out["table"] = "\n".join(lines)
    return out


def _blocks(runs: dict[str, list[dict[str, Any]]], skips: list[str]) -> list[str]:
    for s in skips:
        if runs[s][0]["summary"]["skip_weights"]:
            return list(runs[s][0]["summary"]["skip_weights"])
    return []


def _scalar(v: float | list[float]) -> float:
    return statistics.fmean(v) if isinstance(v, list) else float(v)


def plot(a: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(a.skips, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for s in a.skips:
        for i, r in enumerate(runs[s]):
            ep = [row["epoch"] for row in r["rows"]]
            acc = [row["test_acc"] for row in r["rows"]]
            wall, t = [], 0.0
            for row in r["rows"]:
                t += row["epoch_time"]
                wall.append(t)
            label = s if i == 0 else None
            ax_e.plot(ep, acc, color=colors[s], alpha=0.8, label=label)
            ax_t.plot(wall, acc, color=colors[s], alpha=0.8, label=label)
    ax_e.set(xlabel="epoch", ylabel="test accuracy", title="accuracy vs epoch")
    ax_t.set(xlabel="training seconds (compile excluded)", title="accuracy vs wall time")
    ax_e.legend()
    fig.tight_layout()
    paths = [a.out / "accuracy.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    learned = [s for s in a.skips if runs[s][0]["summary"]["skip_weights"]]
    if learned:
        fig, axes = plt.subplots(1, len(learned), figsize=(6 * len(learned), 4), squeeze=False)
        for ax, s in zip(axes[0], learned):
            names = list(runs[s][0]["summary"]["skip_weights"])
            cmap = plt.get_cmap("viridis", max(len(names), 2))
            for j, k in enumerate(names):
                for i, r in enumerate(runs[s]):
                    ax.plot([row["epoch"] for row in r["rows"]], [_scalar(row["skip_weights"][k]) for row in r["rows"]],
                            color=cmap(j), alpha=0.7, label=k if i == 0 else None)
            ax.axhline(1.0, color="grey", lw=0.5, ls="--")
            ax.set(xlabel="epoch", ylabel="skip weight w", title=f"{s}: skip weight per block")
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(a.out / "skip_weights.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a, train_args = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    runs = run_sweep(a, train_args)
    result = report(a, runs)
    result["command"] = " ".join(["benchmarks/convergence.py", *(sys.argv[1:] if argv is None else argv)])
    (a.out / "convergence.json").write_text(json.dumps(result, indent=1))
    (a.out / "convergence.md").write_text(result["table"] + "\n")
    paths = plot(a, runs)
    print(result["table"])
    print(f"\nwrote {a.out / 'convergence.json'}, {a.out / 'convergence.md'}, {', '.join(map(str, paths))}")
    return result


if __name__ == "__main__":
    main()
