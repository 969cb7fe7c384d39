#!/usr/bin/env python3
"""RESULTS.md's summary tables, from the per-run files under results/ (summary.json, metrics.jsonl).

Every comparison is listed in COMPARISONS. The primary endpoint is final-epoch test accuracy (what the
seed reports). Runs of one seed share initial weights and data order across variants, so a comparison
is paired by seed (mean per-seed difference, 95% t interval, paired t p) when every pair of runs ran
the same code with the same convolution; otherwise it is unpaired (Welch) and the table says why.
What a run ran comes from its summary.json ("provenance": commit, dirty, conv_impl) or, for runs older
than that key, from its sweep's provenance.json (what git history and RESULTS.md say). Runs of a
dirty tree pair if their commit and convolution agree; the table notes the dirty flag.

Four families of p-values, each with its own Holm correction, each named where it is printed:
  P  (primary)  final-epoch test accuracy: paired t, or Welch where the runs cannot be paired;
  W  Wilcoxon signed-rank p of the same final-epoch differences (paired comparisons only);
  L  the mean test accuracy of the last 3 epochs (secondary);
  T  the final epoch's training accuracy (secondary; the running train-mode mean over that epoch).
A comparison whose runs are a subset of another comparison's (DUPLICATES) is printed but is in no
family: a run enters each family once.

    python results/summarize.py > results/summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "benchmarks"))

import stats  # noqa: E402

LAST_K = 3
FAMILIES = {"P": "final-epoch test accuracy (primary)", "W": "Wilcoxon signed-rank, final epoch",
            "L": f"mean test accuracy of the last {LAST_K} epochs", "T": "final training accuracy"}


class Comparison(NamedTuple):
    label: str
    sweep_a: str
    variant_a: str
    sweep_b: str
    variant_b: str
    paired: bool = True  # False: different networks (never paired); True: paired if provenance allows


def _c(label: str, sweep: str, a: str, b: str) -> Comparison:
    return Comparison(label, sweep, a, sweep, b)


COMPARISONS = [
    _c("seed setup (paper), CIFAR-10 5k: learned vs identity", "paper-5k", "identity", "learned"),
    Comparison("seed setup, CIFAR-10 5k: paper learned vs resnet50_keras", "paper-5k-resnet50keras", "identity",
               "paper-5k", "learned", paired=False),
    Comparison("seed setup, CIFAR-10 5k: paper identity vs resnet50_keras", "paper-5k-resnet50keras", "identity",
               "paper-5k", "identity", paired=False),
    _c("round 1 paper (pre-Keras init), CIFAR-10 5k: learned, downsample w ~ N(0, 0.05), vs identity",
       "paper-5k-round1", "identity", "learned-normal"),
    _c("seed setup, full CIFAR-10: learned vs identity", "paper-full", "identity", "learned"),
    Comparison("seed setup, full CIFAR-10: learned, downsample w ~ N(0, 0.05) (the seed script), vs identity",
               "paper-full", "identity", "paper-full-normal", "learned-normal"),
    _c("preset cifar, ResNet-20 w8, CIFAR-10 5k: learned vs identity", "cifar-r20-5k", "identity", "learned"),
    _c("preset cifar, ResNet-20 w8, CIFAR-10 5k: rezero vs identity", "cifar-r20-5k", "identity", "rezero"),
    Comparison("preset cifar, ResNet-20 w8, CIFAR-10 5k: learned-w1 vs learned", "cifar-r20-5k", "learned",
               "cifar-r20-5k-init1", "learned"),
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
    # rows appear once their sweeps have run (results/run_all.sh; long_cifar, paper_normal: not yet)
    _c("CIFAR-10 5k, 50 epochs: learned-w1 vs learned", "cifar-r20-5k-50ep", "learned", "learned-w1"),
    *[_c(f"controls, CIFAR-10 5k, ResNet-20: {v} vs identity", "controls-cifar-r20-5k", "identity", v)
      for v in ("frozen0", "frozen1", "learned", "learned-w1")],
    _c("controls, CIFAR-10 5k, ResNet-20: learned vs frozen0", "controls-cifar-r20-5k", "frozen0", "learned"),
    *[_c(f"budget, CIFAR-10 5k, ResNet-20, {e} epochs: {v} vs identity", f"budget-cifar-r20-5k-{e}ep", "identity", v)
      for e in (30, 100) for v in ("learned", "learned-w1")],  # 10 epochs: the controls rows
    *[Comparison(f"CIFAR-10 5k, ResNet-20, skip lr multiplier: {v} vs {base}", "controls-cifar-r20-5k", base,
                 "lr-cifar-r20-5k", v) for base in ("identity", "learned") for v in ("learned-x3", "learned-x10",
                                                                                      "learned-x30")],
    *[_c(f"seed setup (paper), CIFAR-10 5k: {v} vs identity", "paper-5k-normal", "identity", v)
      for v in ("learned", "learned-normal")],
]

# Comparisons whose runs are all in another comparison already: printed, but in no family.
DUPLICATES = {
    "digits, Adam lr 0.003: learned vs identity":
        "the same numbers as depth, digits, resnet20: learned vs identity (a bit-identical rerun)",
    "depth, digits, resnet20: learned vs identity": "seeds 0-2 of digits, 10 seeds: learned vs identity",
    "depth, digits, resnet20: learned-w1 vs identity": "seeds 0-2 of digits, 10 seeds: learned-w1 vs identity",
    "depth, digits, resnet20: rezero vs identity": "seeds 0-2 of digits, 10 seeds: rezero vs identity",
}


def runs(sweep: str, variant: str, root: Path = ROOT) -> list[dict[str, Any]]:
    """[{"final", "last_k", "train_acc", "provenance"}] per finished seed, in seed order (stops at the first gap)."""
    out = []
    for seed in range(100):
        d = root / sweep / f"{variant}-seed{seed}"
        if not (d / "summary.json").exists():
            break
        summary = json.loads((d / "summary.json").read_text())
        if not summary.get("finished"):
            break
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        tested = [r["test_acc"] for r in rows if r.get("test_acc") is not None]
        out.append({"final": summary["test_acc"],  # last_k: None for a run not tested after every epoch
                    "last_k": stats.last_k_mean(tested, LAST_K) if len(tested) == len(rows) else None,
                    "train_acc": rows[-1]["train_acc"], "provenance": stats.run_provenance(d, summary)})
    return out


def pairing(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[bool, str]:
    """(may the runs be paired seed by seed, why not / a note): stats.pairing on their provenance."""
    return stats.pairing([r["provenance"] for r in a], [r["provenance"] for r in b])


def compare(c: Comparison, root: Path = ROOT) -> dict[str, Any] | None:
    """One comparison's statistics (None if either side has under 2 runs)."""
    a, b = runs(c.sweep_a, c.variant_a, root), runs(c.sweep_b, c.variant_b, root)
    if min(len(a), len(b)) < 2:
        return None
    note = "different networks"
    paired = c.paired
    if paired:
        n = min(len(a), len(b))
        paired, note = pairing(a[:n], b[:n])
        if paired:
            a, b = a[:n], b[:n]
    test = stats.paired if paired else stats.welch
    res = {key: None if any(r[key] is None for r in a + b) else test([r[key] for r in a], [r[key] for r in b])
           for key in ("final", "last_k", "train_acc")}
    return {"c": c, "a": a, "b": b, "paired": paired, "note": note, "res": res,
            "n": f"{len(a)}" if len(a) == len(b) else f"{len(a)} / {len(b)}"}


def families(done: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Holm-adjusted p per family, in the order of ``done`` (NaN for rows outside the family)."""
    nan = float("nan")
    raw = {"P": [d["res"]["final"]["p"] for d in done],
           "W": [d["res"]["final"].get("wilcoxon_p", nan) for d in done],
           "L": [d["res"]["last_k"]["p"] if d["res"]["last_k"] else nan for d in done],
           "T": [d["res"]["train_acc"]["p"] for d in done]}
    out = {}
    for fam, ps in raw.items():
        ps = [nan if d["c"].label in DUPLICATES else p for d, p in zip(done, ps)]
        out[fam] = stats.holm(ps)
    return out


def _p(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"


def _ci(d: dict[str, float] | None) -> str:
    if d is None:  # not computed: runs tested only every few epochs have no last-3-epoch mean
        return "-"
    if d["lo"] != d["lo"]:  # no interval (zero spread: e.g. 100% training accuracy in every run)
        return f"{100 * d['diff']:+.2f} [-]"
    return f"{100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"


def table(root: Path = ROOT) -> str:
    done = [r for c in COMPARISONS if (r := compare(c, root)) is not None]
    holm = families(done)
    size = {f: sum(x == x for x in holm[f]) for f in FAMILIES}
    fam_lines = "; ".join(f"{f}: {FAMILIES[f]}, {size[f]} p-values" for f in FAMILIES)
    lines = [
        f"{len(done)} comparisons. Primary endpoint: final-epoch test accuracy. Holm's correction is applied within "
        f"each of four named families ({fam_lines}). The {sum(d['c'].label in DUPLICATES for d in done)} rows marked "
        "'dup' reuse runs of another row and are in no family. Test accuracy in %; differences B - A with 95% "
        "intervals; paired by seed unless marked Welch (with the reason: different networks, or runs of "
        "different commits or convolutions). Sweeps tested only every few epochs have no last-3-epoch column. "
        "Training accuracy is the running train-mode mean over the last epoch.",
        "",
        "| comparison (A vs B) | seeds (A / B) | A final | B final | B - A final [95% CI] | p (P) | Holm p (P) "
        "| Wilcoxon p (W) | Holm p (W) | seeds B>A / B<A | B - A, last 3 epochs [95% CI] | p (L) | Holm p (L) "
        "| B - A, train acc [95% CI] | p (T) | Holm p (T) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, d in enumerate(done):
        c, res = d["c"], d["res"]
        f, k, t = res["final"], res["last_k"], res["train_acc"]
        ma, sa = stats.mean_std([r["final"] for r in d["a"]])
        mb, sb = stats.mean_std([r["final"] for r in d["b"]])
        label = c.label + ("" if d["paired"] else f" (Welch: {d['note']})")
        if d["paired"] and d["note"]:
            label += f" ({d['note']})"
        if c.label in DUPLICATES:
            label += f" (dup: {DUPLICATES[c.label]})"
        signs = f"{f['positive']} / {f['negative']}" if d["paired"] else "-"
        lines.append(
            f"| {label} | {d['n']} | {100 * ma:.2f} +- {100 * sa:.2f} | {100 * mb:.2f} +- {100 * sb:.2f} | {_ci(f)} "
            f"| {_p(f['p'])} | {_p(holm['P'][i])} | {_p(f.get('wilcoxon_p', float('nan')))} | {_p(holm['W'][i])} "
            f"| {signs} | {_ci(k)} | {_p(k['p'] if k else float('nan'))} | {_p(holm['L'][i])} | {_ci(t)} | {_p(t['p'])} | {_p(holm['T'][i])} |")
    return "\n".join(lines + ["", provenance_table(root)])


def provenance_table(root: Path = ROOT) -> str:
    """Which code and convolution each sweep's variants ran (from the runs or provenance.json)."""
    lines = ["What each sweep ran (commit; convolution; source: 'run' = the run's own summary.json, 'sweep' = "
             "the sweep's provenance.json, reconstructed from git history):", "",
             "| sweep | variant: commit, conv (source) |", "|---|---|"]
    for sweep in sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*-seed*/summary.json"))):
        cells: dict[str, set[str]] = {}
        for run in sorted(root.glob(f"{sweep}/*-seed*/summary.json")):
            name = run.parent.name
            p = stats.run_provenance(run.parent, json.loads(run.read_text()))
            cells.setdefault(name.rsplit("-seed", 1)[0], set()).add(f"{str(p['commit'])[:7]}, {p['conv_impl']} ({p['source']})")
        lines.append(f"| {sweep} | " + "; ".join(f"{v}: {' + '.join(sorted(s))}" for v, s in cells.items()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
