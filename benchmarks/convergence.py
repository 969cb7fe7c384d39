#!/usr/bin/env python3
"""Convergence of ResNet (identity skip) versus AdaResNet (learned skip) and other variants over seeds.

Trains every (variant, seed) pair through the package's own training code
(``adaresnet_jax.train.run``, what train.py runs), each in its own workdir under ``--out``, then
writes a table of final test accuracy and of the mean over the last ``--last-k`` epochs (mean +- std
over seeds), the difference to the first variant, paired by seed (the runs of one seed share initial
weights and data order: mean difference with its 95% t interval, p, Wilcoxon p and the sign count)
and, for comparison, unpaired (Welch), epochs to reach given test accuracies, the train accuracy, and
the skip weights per block, plus PNG plots. A sweep that was stopped resumes where it stopped.

    python benchmarks/convergence.py --preset quick --seeds 3
    python benchmarks/convergence.py --preset quick --seeds 10 --variants \\
        "identity=--skip identity;learned=--skip learned;learned-w1=--skip learned --skip-init 1;rezero=--skip rezero"
    python benchmarks/convergence.py --preset paper --seeds 3 --out runs/paper \\
        --dataset cifar10 --data-dir data/cifar10.npz --max-train 10000      # any train.py flag
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import stats  # noqa: E402

from adaresnet_jax import train as train_lib  # noqa: E402
from adaresnet_jax.config import parse_config  # noqa: E402
from adaresnet_jax.metrics import read_jsonl  # noqa: E402
from adaresnet_jax.models import SKIP_RULES  # noqa: E402

# One colour per variant name, the same in every figure of every sweep.
COLORS = {"identity": "black", "learned": "tab:blue", "learned-w1": "tab:cyan", "rezero": "tab:orange",
          "rezero-w1": "tab:red", "learned-pc": "tab:purple", "learned-normal": "tab:green"}
_EXTRA_COLORS = ["tab:brown", "tab:pink", "tab:olive", "tab:gray", "gold", "navy"]
SEED_STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
SEED_MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "h", "<"]


def _seed_style(i: int, n_points: int) -> dict[str, Any]:
    """Line style and marker of seed ``i``: together they tell up to 60 seeds apart."""
    return {"ls": SEED_STYLES[i % len(SEED_STYLES)], "marker": SEED_MARKERS[i % len(SEED_MARKERS)],
            "markersize": 3, "markevery": max(1, n_points // 8)}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other flags go to train.py "
                                "(see python train.py --help), e.g. --epochs 5 --dataset digits.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", help="train.py preset (default: %(default)s)")
    p.add_argument("--skips", default="identity,learned",
                   help="comma-separated skip rules, each a variant of that name; the first is the baseline "
                        "(default: %(default)s)")
    p.add_argument("--variants", default=None,
                   help='"name=train.py flags;name=flags;...": variants with their own flags (replaces --skips); '
                        "the first is the baseline")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (default: %(default)s)")
    p.add_argument("--last-k", type=int, default=3, help="epochs averaged for the last-k accuracy (default: 3)")
    p.add_argument("--targets", default=None,
                   help="comma-separated test accuracies for epochs-to-accuracy (default: 3 levels below the "
                        "baseline's final mean)")
    p.add_argument("--title", default=None, help="sweep name shown in figure titles (default: the --out folder)")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/convergence-<preset>)")
    a, rest = p.parse_known_args(argv)
    if a.variants:
        a.variants = dict(_variant(v, p) for v in a.variants.split(";") if v.strip())
    else:
        skips = a.skips.split(",")
        for s in skips:
            if s not in SKIP_RULES:
                p.error(f"unknown skip rule {s!r}; valid: {', '.join(SKIP_RULES)}")
        a.variants = {s: ["--skip", s] for s in skips}
    if a.seeds < 1 or a.last_k < 1:
        p.error(f"--seeds and --last-k must be at least 1, got {a.seeds} and {a.last_k}")
    a.out = Path(a.out or f"runs/convergence-{a.preset}")
    a.title = a.title or a.out.name
    return a, rest


def _variant(spec: str, p: argparse.ArgumentParser) -> tuple[str, list[str]]:
    name, sep, flags = spec.partition("=")
    if not sep or not name.strip() or "/" in name:
        p.error(f"bad variant {spec!r}: write name=flags, e.g. learned-w1=--skip learned --skip-init 1")
    return name.strip(), shlex.split(flags)


def run_sweep(a: argparse.Namespace, train_args: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every (variant, seed) run; returns {variant: [{"summary", "rows"} per seed]}."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in a.variants}
    for seed in range(a.seeds):
        for name, flags in a.variants.items():
            workdir = a.out / f"{name}-seed{seed}"
            summary_path = workdir / "summary.json"
            done = summary_path.exists() and json.loads(summary_path.read_text()).get("finished")
            if not done:
                cfg = parse_config(["--preset", a.preset, *train_args, *flags, "--seed", str(seed),
                                    "--workdir", str(workdir), "--quiet"])
                print(f"[convergence] {name} seed {seed} -> {workdir}", flush=True)
                try:
                    result = train_lib.run(cfg)
                except train_lib.UsageError as e:
                    sys.exit(f"convergence.py: error: {e}")
                if result.get("interrupted"):
                    sys.exit(f"convergence.py: stopped in {workdir}; rerun the same command to resume the sweep")
            runs[name].append({"summary": json.loads(summary_path.read_text()),
                               "rows": read_jsonl(workdir / "metrics.jsonl")})
    return runs


def to_reach(rows: list[dict[str, Any]], target: float) -> int | None:
    """First epoch (1-based) whose test accuracy reaches ``target``."""
    return next((r["epoch"] for r in rows if r["test_acc"] >= target), None)


def _pct(d: dict[str, float], key: str = "diff") -> str:
    return f"{100 * d[key]:+.2f}"


def _compare(a: list[float], b: list[float]) -> dict[str, dict[str, float]]:
    return {"paired": stats.paired(a, b), "welch": stats.welch(a, b)}


def report(a: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    names = list(a.variants)
    base = names[0]
    finals = {v: [r["summary"]["test_acc"] for r in runs[v]] for v in names}
    lastk = {v: [stats.last_k_mean([row["test_acc"] for row in r["rows"]], a.last_k) for r in runs[v]] for v in names}
    train_acc = {v: [r["rows"][-1]["train_acc"] for r in runs[v]] for v in names}
    targets = ([float(t) for t in a.targets.split(",")] if a.targets else
               [round(statistics.fmean(finals[base]) * f, 3) for f in (0.8, 0.9, 0.97)])
    cfg = runs[base][0]["summary"]["config"]
    out: dict[str, Any] = {"preset": a.preset, "seeds": a.seeds, "last_k": a.last_k, "targets": targets,
                           "variants": {v: a.variants[v] for v in names}, "config": cfg,
                           "versions": runs[base][0]["summary"]["versions"],
                           "devices": runs[base][0]["summary"]["devices"], "rules": {}}
    k = a.last_k
    lines = [f"Test accuracy (%) after {cfg['epochs']} epochs, {a.seeds} seed(s) per variant, preset {a.preset} "
             f"({cfg['model']} on {cfg['dataset']}); differences to {base}, paired by seed: mean [95% t interval], "
             f"p, Wilcoxon p, seeds better/worse; Welch's unpaired interval for comparison:", "",
             f"| variant | final (mean +- std) | vs {base}, paired | Welch | last {k} epochs | vs {base}, paired "
             f"| train acc | " + " | ".join(f"epochs to {100 * t:.1f}" for t in targets) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(targets)]
    for v in names:
        m, sd = stats.mean_std(finals[v])
        mk, sdk = stats.mean_std(lastk[v])
        tr, _ = stats.mean_std(train_acc[v])
        final_cmp, lastk_cmp = _compare(finals[base], finals[v]), _compare(lastk[base], lastk[v])
        reach = [{"target": t, "epochs": [to_reach(r["rows"], t) for r in runs[v]]} for t in targets]
        skip_final = {b: [r["summary"]["skip_weights"][b] for r in runs[v]] for b in runs[v][0]["summary"]["skip_weights"]}
        out["rules"][v] = {"test_acc": finals[v], "mean": m, "std": sd, "last_k": lastk[v], "last_k_mean": mk,
                           "last_k_std": sdk, "train_acc": train_acc[v], "vs_base": final_cmp["welch"],
                           "vs_base_paired": final_cmp["paired"], "last_k_vs_base_paired": lastk_cmp["paired"],
                           "last_k_vs_base": lastk_cmp["welch"], "reach": reach, "skip_weights": skip_final,
                           "images_per_sec": statistics.median(r["summary"]["images_per_sec"] for r in runs[v]),
                           "test_acc_at_best_val": [r["summary"]["test_acc_at_best_val"] for r in runs[v]]}
        cells = []
        for rc in reach:
            hit = [e for e in rc["epochs"] if e is not None]
            cells.append(f"{statistics.fmean(hit):.1f} ({len(hit)}/{a.seeds})" if hit else f"never (0/{a.seeds})")
        if v == base:
            vs_p = vs_w = vs_k = "-"
        else:
            vs_p, vs_k, vs_w = _paired_cell(final_cmp["paired"]), _paired_cell(lastk_cmp["paired"]), (
                f"{_pct(final_cmp['welch'])} [{_pct(final_cmp['welch'], 'lo')}, {_pct(final_cmp['welch'], 'hi')}], "
                f"p={final_cmp['welch']['p']:.3f}")
        lines.append(f"| {v} | {100 * m:.2f} +- {100 * sd:.2f} | {vs_p} | {vs_w} | {100 * mk:.2f} +- {100 * sdk:.2f} "
                     f"| {vs_k} | {100 * tr:.2f} | " + " | ".join(cells) + " |")
    lines += _skip_table(out, names)
    out["table"] = "\n".join(lines)
    return out


def _paired_cell(d: dict[str, float]) -> str:
    return (f"{_pct(d)} [{_pct(d, 'lo')}, {_pct(d, 'hi')}], p={d['p']:.3f}, W p={d['wilcoxon_p']:.3f}, "
            f"{d['positive']}/{d['negative']}")


def _skip_table(out: dict[str, Any], names: list[str]) -> list[str]:
    """Final skip weight per block: mean, and the range over seeds (not a per-block statement about one run)."""
    blocks = next((list(out["rules"][v]["skip_weights"]) for v in names if out["rules"][v]["skip_weights"]), [])
    if not blocks:  # no table when every variant is the plain identity skip
        return []
    lines = ["", "Learned skip weights at the end, per block: mean over seeds [min, max over seeds] (per-channel weights "
             "averaged over channels):", "", "| variant | " + " | ".join(blocks) + " |", "|---|" + "---|" * len(blocks)]
    for v in names:
        sw = out["rules"][v]["skip_weights"]
        if sw:
            cells = []
            for b in blocks:
                xs = [_scalar(x) for x in sw.get(b, [])]
                cells.append(f"{statistics.fmean(xs):+.3f} [{min(xs):+.2f}, {max(xs):+.2f}]" if xs else "-")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def _scalar(v: float | list[float]) -> float:
    return statistics.fmean(v) if isinstance(v, list) else float(v)


def color(name: str, names: list[str]) -> str:
    """The variant's colour: fixed for the usual names, else one of the spares in sweep order."""
    spare = [n for n in names if n not in COLORS]
    return COLORS.get(name) or _EXTRA_COLORS[spare.index(name) % len(_EXTRA_COLORS)]


def _describe(a: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> str:
    cfg = runs[next(iter(runs))][0]["summary"]["config"]
    subset = f", {cfg['max_train']:,} images" if cfg.get("max_train") else ""
    width = f" width {cfg['width']}" if cfg.get("width") else ""
    return f"{a.title}: {cfg['model']}{width} on {cfg['dataset']}{subset}"


def _init_label(r: dict[str, Any]) -> str:
    init = r["summary"].get("skip_weights_init") or {}
    vals = sorted({round(_scalar(x), 3) for x in init.values()})
    return "" if not vals else f"w0 = {vals[0]:g}" if len(vals) == 1 else f"w0 in [{vals[0]:g}, {vals[-1]:g}]"


def plot(a: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """accuracy.png (test and train accuracy in % per epoch, every seed) and skip_weights.png (each
    block's weight from epoch 0, the initial value, one panel per variant with learned weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, what = list(a.variants), _describe(a, runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, key in zip(axes, ("test_acc", "train_acc")):
        for v in names:
            for i, r in enumerate(runs[v]):
                ax.plot([row["epoch"] for row in r["rows"]], [100 * row[key] for row in r["rows"]],
                        color=color(v, names), **_seed_style(i, len(r["rows"])), alpha=0.85, lw=1.2,
                        label=f"{v} ({_init_label(r)})".replace(" ()", "") if i == 0 else None)
        ax.set(xlabel="epoch", ylabel=f"{key.split('_')[0]} accuracy (%)", title=f"{key.split('_')[0]} accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title=f"line style and marker = seed (0-{a.seeds - 1})", title_fontsize=7)
    fig.suptitle(what, fontsize=10)
    fig.tight_layout()
    paths = [a.out / "accuracy.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    learned = [v for v in names if runs[v][0]["summary"]["skip_weights"]]
    if learned:
        fig, axes = plt.subplots(1, len(learned), figsize=(6 * len(learned), 4.2), squeeze=False, sharey=True)
        for ax, v in zip(axes[0], learned):
            blocks = list(runs[v][0]["summary"]["skip_weights"])
            cmap = plt.get_cmap("viridis", max(len(blocks), 2))
            for j, b in enumerate(blocks):
                for i, r in enumerate(runs[v]):
                    init = (r["summary"].get("skip_weights_init") or {}).get(b)
                    ep = ([0] if init is not None else []) + [row["epoch"] for row in r["rows"]]
                    w = ([_scalar(init)] if init is not None else []) + [_scalar(row["skip_weights"][b]) for row in r["rows"]]
                    ax.plot(ep, w, color=cmap(j), **_seed_style(i, len(ep)), alpha=0.8, lw=1.1,
                            label=b if i == 0 else None)
            ax.axhline(1.0, color="grey", lw=0.5, ls="--")
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set(xlabel="epoch (0: initial value)", ylabel="skip weight w",
                   title=f"{v} ({_init_label(runs[v][0])})".replace(" ()", ""))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.suptitle(f"{what}: skip weight per block (line style and marker = seed)", fontsize=10)
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
