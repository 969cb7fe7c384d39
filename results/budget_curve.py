#!/usr/bin/env python3
"""The training-budget curve (issue 21, 5c): ResNet-20 (width 8) on the CIFAR-10 subset, preset cifar, trained
for 10, 30 and 100 epochs (cosine over each whole run). Does AdaResNet's gap to the identity skip close, stay
or grow with training?

Reads the final test accuracy of each seed from the committed runs (the 10-epoch point is the controls sweep,
the same flags and commit but the epoch count), pairs every rule with identity by seed (refusing runs of
different code or convolutions, like summarize.py), prints a markdown table and draws the curve:

    python results/budget_curve.py                      # table on stdout, results/budget_curve.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import summarize
from summarize import stats

EPOCHS = {10: "controls-cifar-r20-5k", 30: "budget-cifar-r20-5k-30ep", 100: "budget-cifar-r20-5k-100ep"}
RULES = {"identity": "identity (ResNet)", "learned": "learned from 0 (AdaResNet)", "learned-w1": "learned from 1"}
COLORS = {"identity": "#1f77b4", "learned": "#d62728", "learned-w1": "#2ca02c"}


def curve(root: Path = summarize.ROOT) -> dict[int, dict[str, Any]]:
    """{epochs: {"acc": {rule: [% per seed]}, "gap": {rule: stats.paired(identity, rule) in %}, "steps"}} for the
    budgets whose sweep has at least 2 finished seeds of every rule (the seeds every rule has)."""
    out: dict[int, dict[str, Any]] = {}
    for epochs, sweep in EPOCHS.items():
        runs = {rule: summarize.runs(sweep, rule, root) for rule in RULES}
        n = min(len(r) for r in runs.values())
        if n < 2:
            continue
        runs = {rule: r[:n] for rule, r in runs.items()}
        acc = {rule: [100 * r["final"] for r in rs] for rule, rs in runs.items()}
        gap = {}
        for rule in list(RULES)[1:]:
            ok, why = summarize.pairing(runs["identity"], runs[rule])
            if not ok:
                raise SystemExit(f"budget_curve.py: {sweep}: {rule} cannot be paired with identity ({why})")
            gap[rule] = stats.paired(acc["identity"], acc[rule])
        last = (root / sweep / "identity-seed0" / "metrics.jsonl").read_text().splitlines()[-1]
        out[epochs] = {"acc": acc, "gap": gap, "steps": json.loads(last)["step"]}
    return out


def table(data: dict[int, dict[str, Any]]) -> str:
    cols = ["epochs (steps)", "seeds", *(f"{RULES[r]}, test acc %" for r in RULES),
            *(f"{r} - identity, paired [95% CI], seeds better/worse" for r in list(RULES)[1:])]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for epochs, d in data.items():
        cells = [f"{epochs} ({d['steps']:,})", str(len(d["acc"]["identity"]))]
        for rule in RULES:
            xs = d["acc"][rule]
            cells.append(f"{statistics.fmean(xs):.2f} ({', '.join(f'{x:.2f}' for x in xs)})")
        for g in d["gap"].values():
            cells.append(f"{g['diff']:+.2f} [{g['lo']:+.2f}, {g['hi']:+.2f}], {g['positive']}/{g['negative']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(data: dict[int, dict[str, Any]], path: Path) -> None:
    """Left: each rule's mean (line) and seeds (dots) against epochs; right: the paired gap to identity with
    its 95% interval. Legend below the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(data)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, rule in enumerate(RULES):
        xs = [e * 1.03 ** (k - 1) for e in epochs]  # a small offset per rule keeps the seeds' dots apart
        means = [statistics.fmean(data[e]["acc"][rule]) for e in epochs]
        left.plot(xs, means, color=COLORS[rule], lw=1.6, marker="o", label=RULES[rule])
        for x, e in zip(xs, epochs):
            left.scatter([x] * len(data[e]["acc"][rule]), data[e]["acc"][rule], color=COLORS[rule], s=10, alpha=0.5)
        if rule == "identity":
            continue
        g = [data[e]["gap"][rule] for e in epochs]
        right.errorbar(xs, [x["diff"] for x in g], yerr=[[x["diff"] - x["lo"] for x in g], [x["hi"] - x["diff"] for x in g]],
                       color=COLORS[rule], marker="o", capsize=3, lw=1.6)
    right.axhline(0.0, color="grey", lw=0.8, ls="--")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(epochs, [str(e) for e in epochs])
        ax.minorticks_off()
        ax.set_xlabel("training epochs (cosine schedule over the whole run)")
        ax.grid(alpha=0.3)
    left.set_ylabel("final test accuracy (%)")
    left.set_title("mean (line) and seeds (dots)", fontsize=9)
    right.set_ylabel("rule - identity, paired (points)")
    right.set_title("gap to identity, mean and 95% t interval", fontsize=9)
    fig.suptitle("Training budget: ResNet-20 (width 8), CIFAR-10 subset (4,900 JPEG images), preset cifar", fontsize=10)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=3, frameon=False, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=summarize.ROOT, help="the folder holding the sweeps")
    ap.add_argument("--out", default=str(summarize.ROOT / "budget_curve.png"), help="the plot ('' for none)")
    a = ap.parse_args()
    data = curve(a.root)
    if not data:
        raise SystemExit(f"budget_curve.py: no budget sweep with 2 finished seeds of every rule under {a.root}")
    print(table(data))
    if a.out:
        plot(data, Path(a.out))


if __name__ == "__main__":
    main()
