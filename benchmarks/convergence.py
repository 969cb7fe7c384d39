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

# One colour per variant name, the same in every figure of every sweep: Okabe and Ito's colour-blind-safe
# palette, then Paul Tol's muted one for names beyond it (every line of a figure gets its own colour).
COLORS = {"identity": "#000000", "learned": "#0072B2", "learned-w1": "#56B4E9", "rezero": "#E69F00",
          "rezero-w1": "#D55E00", "learned-pc": "#CC79A7", "learned-normal": "#009E73", "learned-x10": "#882255",
          "frozen0": "#999933", "frozen1": "#44AA99", "learned-x3": "#332288", "learned-x30": "#AA4499"}
_EXTRA_COLORS = ["#117733", "#DDCC77", "#88CCEE", "#661100", "#6699CC", "#888888"]
BAND = "min-max over seeds"


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
    p.add_argument("--replot", action="store_true",
                   help="train nothing: rebuild the tables and plots from the runs already in --out (an error if "
                        "one is missing)")
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
            if not done and a.replot:
                sys.exit(f"convergence.py: error: --replot: {workdir} has no finished run; drop --replot to train it")
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
            summary = json.loads(summary_path.read_text())
            runs[name].append({"summary": summary, "rows": read_jsonl(workdir / "metrics.jsonl"),
                               "provenance": stats.run_provenance(workdir, summary)})
    return runs


def to_reach(rows: list[dict[str, Any]], target: float) -> int | None:
    """First epoch (1-based) whose test accuracy reaches ``target`` (among the evaluated epochs)."""
    return next((r["epoch"] for r in evaluated(rows) if r["test_acc"] >= target), None)


def evaluated(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that carry a test evaluation (all of them, unless the run evaluated every few epochs with
    ``--eval-every-steps``)."""
    return [r for r in rows if r.get("test_acc") is not None]


def tested_sparsely(runs: dict[str, list[dict[str, Any]]]) -> bool:
    """Whether any run of the sweep skipped test evaluations (tables and plots then say "tested epochs")."""
    return any(len(evaluated(r["rows"])) < len(r["rows"]) for rs in runs.values() for r in rs)


def _pct(d: dict[str, float], key: str = "diff") -> str:
    return f"{100 * d[key]:+.2f}"


def _compare(a: list[float], b: list[float]) -> dict[str, dict[str, float]]:
    return {"paired": stats.paired(a, b), "welch": stats.welch(a, b)}


def report(a: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    names = list(a.variants)
    base = names[0]
    finals = {v: [r["summary"]["test_acc"] for r in runs[v]] for v in names}
    lastk = {v: [stats.last_k_mean([row["test_acc"] for row in evaluated(r["rows"])], a.last_k) for r in runs[v]] for v in names}
    train_acc = {v: [r["rows"][-1]["train_acc"] for r in runs[v]] for v in names}
    targets = ([float(t) for t in a.targets.split(",")] if a.targets else
               [round(statistics.fmean(finals[base]) * f, 3) for f in (0.8, 0.9, 0.97)])
    cfg = runs[base][0]["summary"]["config"]
    out: dict[str, Any] = {"preset": a.preset, "seeds": a.seeds, "last_k": a.last_k, "targets": targets,
                           "variants": {v: a.variants[v] for v in names}, "config": cfg,
                           "versions": runs[base][0]["summary"]["versions"],
                           "devices": runs[base][0]["summary"]["devices"], "rules": {}}
    k = a.last_k
    sparse = tested_sparsely(runs)
    last = f"last {k} tested epochs" if sparse else f"last {k} epochs"
    lines = [f"Test accuracy (%) after {cfg['epochs']} epochs, {a.seeds} seed(s) per variant, preset {a.preset} "
             f"({cfg['model']} on {cfg['dataset']}); differences to {base}, paired by seed: mean [95% t interval], "
             f"p, Wilcoxon p, seeds better/worse; Welch's unpaired interval for comparison:", "",
             f"| variant | final (mean +- std) | vs {base}, paired | Welch | {last} | vs {base}, paired "
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
        pairable, why = stats.pairing([r["provenance"] for r in runs[base]], [r["provenance"] for r in runs[v]])
        out["rules"][v]["pairable"], out["rules"][v]["pairing_note"] = pairable, why
        if v == base:
            vs_p = vs_w = vs_k = "-"
        elif not pairable:
            vs_p = vs_k = f"not paired ({why}): see Welch"
            vs_w = (f"{_pct(final_cmp['welch'])} [{_pct(final_cmp['welch'], 'lo')}, {_pct(final_cmp['welch'], 'hi')}], "
                    f"p={final_cmp['welch']['p']:.3f}")
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


def _other_code(runs: dict[str, list[dict[str, Any]]], v: str, base: str) -> str:
    """'' if variant v ran the base variant's code and convolution in every seed, else a legend mark."""
    ok, _ = stats.pairing([r["provenance"] for r in runs[base]], [r["provenance"] for r in runs[v]])
    if ok or v == base:
        return ""
    codes = sorted({f"{r['provenance']['commit']}, {r['provenance']['conv_impl']}" for r in runs[v]})
    return f" [ran at {' + '.join(codes)}: not paired]"


def _band(ax: Any, xs: list[list[float]], ys: list[list[float]], color: str, label: str, ls: Any = "-") -> None:
    """Mean over seeds as a line, the min-max over seeds as a band (epochs every seed has)."""
    n = min(len(x) for x in xs)
    x = xs[0][:n]
    cols = list(zip(*[y[:n] for y in ys]))
    ax.plot(x, [statistics.fmean(c) for c in cols], color=color, lw=1.6, ls=ls, label=label)
    ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], color=color, alpha=0.18, lw=0)


def plot(a: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """accuracy.png (test accuracy, and training accuracy as the running train-mode mean over each epoch, in %:
    mean over seeds with a min-max band) and skip_weights.png (each block's weight from epoch 0, its initial
    value: mean over seeds with a min-max band, one panel per variant with learned weights). Legends sit
    outside the axes; a variant that ran other code than the first is marked in the legend and dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, what = list(a.variants), _describe(a, runs)
    base = names[0]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), sharey=True)
    sparse = tested_sparsely(runs)
    titles = {"test_acc": "test accuracy at each evaluated epoch" if sparse else "test accuracy after each epoch",
              "train_acc": "training accuracy: running mean over each epoch (train mode)"}
    for ax, key in zip(axes, ("test_acc", "train_acc")):
        for v in names:
            mark = _other_code(runs, v, base)
            label = f"{v} ({_init_label(runs[v][0])})".replace(" ()", "") + f", {len(runs[v])} seeds" + mark
            rows = [[row for row in r["rows"] if row.get(key) is not None] for r in runs[v]]
            _band(ax, [[row["epoch"] for row in rs] for rs in rows],
                  [[100 * row[key] for row in rs] for rs in rows], color(v, names), label,
                  ls="--" if mark else "-")
        ax.set(xlabel="epoch", ylabel="accuracy (%)", title=titles[key])
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title=f"line: mean over seeds; band: {BAND}", title_fontsize=8, frameon=False)
    fig.suptitle(what, fontsize=10)
    fig.tight_layout()
    paths = [a.out / "accuracy.png"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    plt.close(fig)

    learned = [v for v in names if runs[v][0]["summary"]["skip_weights"]]
    if learned:
        fig, axes = plt.subplots(1, len(learned), figsize=(5.5 * len(learned), 4.2), squeeze=False, sharey=True)
        blocks: list[str] = []
        for ax, v in zip(axes[0], learned):
            blocks = list(runs[v][0]["summary"]["skip_weights"])
            cmap = plt.get_cmap("viridis", max(len(blocks), 2))
            for j, b in enumerate(blocks):
                xs, ys = [], []
                for r in runs[v]:
                    init = (r["summary"].get("skip_weights_init") or {}).get(b)
                    xs.append(([0] if init is not None else []) + [row["epoch"] for row in r["rows"]])
                    ys.append(([_scalar(init)] if init is not None else [])
                              + [_scalar(row["skip_weights"][b]) for row in r["rows"]])
                _band(ax, xs, ys, cmap(j), b)
            ax.axhline(1.0, color="grey", lw=0.5, ls="--")
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set(xlabel="epoch (0: initial value)", ylabel="skip weight w",
                   title=f"{v} ({_init_label(runs[v][0])})".replace(" ()", "")
                   + _other_code(runs, v, base).replace(" [", "\n["))
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{what}: skip weight per block (line: mean over seeds; band: {BAND})", fontsize=10,
                     y=1.0 if len(blocks) <= 12 else 1.06)
        if len(blocks) <= 12:
            fig.tight_layout()
            handles, labels = axes[0][-1].get_legend_handles_labels()
            fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False,
                       title="block (colour)", title_fontsize=8)
        else:  # too many blocks for a legend: a colour bar from the first block to the last
            sm = plt.cm.ScalarMappable(cmap=plt.get_cmap("viridis", len(blocks)), norm=plt.Normalize(1, len(blocks)))
            fig.colorbar(sm, ax=axes[0].tolist(), label=f"block, 1 ({blocks[0]}) to {len(blocks)} ({blocks[-1]})",
                         fraction=0.03, pad=0.02)
        paths.append(a.out / "skip_weights.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a, train_args = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    runs = run_sweep(a, train_args)
    result = report(a, runs)
    command = " ".join(["benchmarks/convergence.py", *(sys.argv[1:] if argv is None else argv)])
    saved = a.out / "convergence.json"
    if a.replot and saved.exists():  # the command that trained the runs, not the one that redrew them
        command = json.loads(saved.read_text()).get("command", command)
    result["command"] = command
    (a.out / "convergence.json").write_text(json.dumps(result, indent=1))
    (a.out / "convergence.md").write_text(result["table"] + "\n")
    paths = plot(a, runs)
    print(result["table"])
    print(f"\nwrote {a.out / 'convergence.json'}, {a.out / 'convergence.md'}, {', '.join(map(str, paths))}")
    return result


if __name__ == "__main__":
    main()
