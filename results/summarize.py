#!/usr/bin/env python3
"""RESULTS.md's summary table, from the per-run files under results/ (summary.json, metrics.jsonl).

Every comparison of the table is listed in COMPARISONS. Within one sweep the runs of a seed share
initial weights and data order across variants, so those comparisons are paired by seed (mean
per-seed difference, 95% t interval, paired t p, Wilcoxon signed-rank p, seeds better/worse);
comparisons across networks are unpaired (Welch). Holm's correction is applied over every comparison
that was run, and the table says how many that is.

    python results/summarize.py > results/summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "benchmarks"))

import stats  # noqa: E402

LAST_K = 3


class Comparison(NamedTuple):
    label: str
    sweep_a: str
    variant_a: str
    sweep_b: str
    variant_b: str
    paired: bool = True


def _c(label: str, sweep: str, a: str, b: str) -> Comparison:
    return Comparison(label, sweep, a, sweep, b)


COMPARISONS = [
    _c("seed setup (paper), CIFAR-10 5k: learned vs identity", "paper-5k", "identity", "learned"),
    Comparison("seed setup, CIFAR-10 5k: paper learned vs resnet50_keras", "paper-5k-resnet50keras", "identity",
               "paper-5k", "learned", paired=False),
    Comparison("seed setup, CIFAR-10 5k: paper identity vs resnet50_keras", "paper-5k-resnet50keras", "identity",
               "paper-5k", "identity", paired=False),
    _c("seed setup, full CIFAR-10: learned vs identity", "paper-full", "identity", "learned"),
    _c("preset cifar, ResNet-20 w8, CIFAR-10 5k: learned vs identity", "cifar-r20-5k", "identity", "learned"),
    _c("preset cifar, ResNet-20 w8, CIFAR-10 5k: rezero vs identity", "cifar-r20-5k", "identity", "rezero"),
    *[_c(f"digits, 10 seeds: {v} vs identity", "digits-10seeds", "identity", v)
      for v in ("learned", "learned-w1", "rezero", "learned-pc")],
    _c("digits, 10 seeds: learned-w1 vs learned", "digits-10seeds", "learned", "learned-w1"),
    _c("digits, 10 seeds: learned-pc vs learned", "digits-10seeds", "learned", "learned-pc"),
    *[_c(f"depth, digits, {m}: {v} vs identity", f"depth-digits-{m}", "identity", v)
      for m in ("resnet20", "resnet56", "resnet110") for v in ("learned", "learned-w1", "rezero")],
    Comparison("depth, CIFAR-10 5k, resnet20: learned-w1 vs identity", "cifar-r20-5k", "identity",
               "cifar-r20-5k-init1", "learned"),
    Comparison("depth, CIFAR-10 5k, resnet20: rezero-w1 vs identity", "cifar-r20-5k", "identity",
               "cifar-r20-5k-init1", "rezero"),
    *[_c(f"depth, CIFAR-10 5k, resnet56: {v} vs identity", "depth-cifar-resnet56", "identity", v)
      for v in ("learned", "learned-w1", "rezero")],
    *[_c(f"digits, Adam lr {lr}: {v} vs identity", f"digits-lr{lr}", "identity", v)
      for lr in ("0.001", "0.003", "0.01", "0.03") for v in ("learned", "learned-x10")],
    _c("digits, 60 epochs: learned-w1 vs learned", "digits-60ep", "learned", "learned-w1"),
    _c("CIFAR-10 5k, 50 epochs: learned-w1 vs learned", "cifar-r20-5k-50ep", "learned", "learned-w1"),
]


def runs(sweep: str, variant: str) -> list[dict]:
    """[{"final", "last_k", "train_acc"}] per seed, in seed order; empty if the sweep was not run."""
    out = []
    for seed in range(100):
        d = ROOT / sweep / f"{variant}-seed{seed}"
        if not (d / "summary.json").exists():
            break
        summary = json.loads((d / "summary.json").read_text())
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if not summary.get("finished"):
            break
        out.append({"final": summary["test_acc"], "last_k": stats.last_k_mean([r["test_acc"] for r in rows], LAST_K),
                    "train_acc": rows[-1]["train_acc"]})
    return out


def table() -> str:
    done = []
    for c in COMPARISONS:
        a, b = runs(c.sweep_a, c.variant_a), runs(c.sweep_b, c.variant_b)
        if min(len(a), len(b)) < 2:
            continue
        if c.paired:  # the seeds both sides have; unpaired comparisons keep every run of each side
            a, b = a[:min(len(a), len(b))], b[:min(len(a), len(b))]
        n = f"{len(a)}" if len(a) == len(b) else f"{len(a)} / {len(b)}"
        test = stats.paired if c.paired else stats.welch
        res = {key: test([r[key] for r in a], [r[key] for r in b]) for key in ("final", "last_k", "train_acc")}
        done.append((c, n, a, b, res))
    adjusted = stats.holm([res["final"]["p"] for *_, res in done])
    lines = [f"{len(done)} comparisons (Holm's correction over all {len(done)}, on the final-epoch p-values). "
             "Test accuracy in %; differences B - A with 95% intervals; paired by seed unless marked Welch.", "",
             "| comparison (A vs B) | seeds (A / B) | A final | B final | B - A final [95% CI] | p | Holm p | Wilcoxon p "
             "| seeds B>A / B<A | B - A, last 3 epochs [95% CI] | B - A, train acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (c, n, a, b, res), p_holm in zip(done, adjusted):
        f, k, t = res["final"], res["last_k"], res["train_acc"]
        ma, sa = stats.mean_std([r["final"] for r in a])
        mb, sb = stats.mean_std([r["final"] for r in b])
        signs = f"{f['positive']} / {f['negative']}" if c.paired else "-"
        wil = f"{f['wilcoxon_p']:.3f}" if c.paired else "-"
        lines.append(
            f"| {c.label}{'' if c.paired else ' (Welch)'} | {n} | {100 * ma:.2f} +- {100 * sa:.2f} | "
            f"{100 * mb:.2f} +- {100 * sb:.2f} | {_ci(f)} | {f['p']:.3f} | {p_holm:.3f} | {wil} | {signs} | "
            f"{_ci(k)} | {100 * t['diff']:+.2f} |")
    return "\n".join(lines)


def _ci(d: dict) -> str:
    return f"{100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"


if __name__ == "__main__":
    print(table())
