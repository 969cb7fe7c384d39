"""The statistics of a seed sweep: paired and unpaired intervals, a signed-rank test, Holm's correction.

Runs of one seed share their initial weights and data order bit for bit across skip rules (flax derives
each parameter's key from its module path, and the data order from the seed alone), so the design is
paired: the per-seed difference is the quantity to test. Welch's interval is reported beside it for
comparison with unpaired reports. A standard error of exactly zero gives NaN p-values, never p = 0.

Accuracies are counts of test images over the test-set size, so two seeds that gain the same number of
images have the same difference; in floating point those differences can disagree in the last bits
(0.9805 - 0.9777 != 0.9833 - 0.9805), which would break the ties the Wilcoxon test must see. The
signed-rank test therefore ranks the differences rounded to ``DIFF_DECIMALS`` places (finer than any
test set's resolution, coarser than float round-off) and leaves zeros and ties to scipy's own handling.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NAN = math.nan
DIFF_DECIMALS = 9  # a 10,000-image test set's resolution is 1e-4; float64 round-off is ~1e-16


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else NAN


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """mean(b) - mean(a) with a 95% Welch interval and two-sided p (NaN under 2 seeds or a zero SE)."""
    from scipy import stats

    diff = statistics.fmean(b) - statistics.fmean(a)
    if min(len(a), len(b)) < 2:
        return {"diff": diff, "lo": NAN, "hi": NAN, "p": NAN}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "lo": NAN, "hi": NAN, "p": NAN}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = float(stats.t.ppf(0.975, df))
    return {"diff": diff, "lo": diff - t * se, "hi": diff + t * se,
            "p": float(2 * stats.t.sf(abs(diff / se), df)), "df": df}


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Per-seed differences b_i - a_i: their mean with a 95% t interval and two-sided p (paired t-test),
    the Wilcoxon signed-rank p (``scipy.stats.wilcoxon`` with its defaults: zero differences dropped,
    exact without ties, tie-corrected otherwise) on the differences rounded to ``DIFF_DECIMALS`` places,
    and how many differences are positive / negative."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired analysis needs the same seeds on both sides, got {len(a)} and {len(b)} runs")
    d = [y - x for x, y in zip(a, b)]
    out = {"diff": statistics.fmean(d), "lo": NAN, "hi": NAN, "p": NAN, "wilcoxon_p": NAN, "n": len(d),
           "positive": sum(round(x, DIFF_DECIMALS) > 0 for x in d),
           "negative": sum(round(x, DIFF_DECIMALS) < 0 for x in d)}
    if len(d) < 2:
        return out
    se = statistics.stdev(d) / math.sqrt(len(d))
    if se > 0:
        t = float(stats.t.ppf(0.975, len(d) - 1))
        out.update(lo=out["diff"] - t * se, hi=out["diff"] + t * se,
                   p=float(2 * stats.t.sf(abs(out["diff"] / se), len(d) - 1)))
    rounded = [round(x, DIFF_DECIMALS) for x in d]
    if any(x != 0 for x in rounded):
        out["wilcoxon_p"] = float(stats.wilcoxon(rounded, zero_method="wilcox").pvalue)
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order; NaN stays NaN and does not count as a test)."""
    valid = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m, adjusted, running = len(valid), [NAN] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def last_k_mean(accuracies: Sequence[float], k: int) -> float:
    """Mean of the last ``k`` values (all of them if there are fewer)."""
    tail = list(accuracies)[-k:]
    return statistics.fmean(tail)


def run_provenance(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """{"commit", "conv_impl", "dirty", "source"} of one run: its summary.json's "provenance" ("run"), else
    its sweep folder's provenance.json, reconstructed from git history for runs older than that key
    ("sweep"), else unknown (None values)."""
    if "provenance" in summary:
        p = summary["provenance"]
        return {"commit": p.get("commit"), "conv_impl": p.get("conv_impl"), "dirty": p.get("dirty"), "source": "run"}
    table = run_dir.parent / "provenance.json"
    if table.exists():
        known = json.loads(table.read_text())["runs"].get(run_dir.name)
        if known:
            return {"commit": known["commit"], "conv_impl": known["conv_impl"], "dirty": None, "source": "sweep"}
    return {"commit": None, "conv_impl": None, "dirty": None, "source": "unknown"}


def pairing(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> tuple[bool, str]:
    """May runs a[i] and b[i] (their run_provenance dicts) be paired seed by seed? (ok, reason or note).
    Only if every pair ran a known commit and convolution, the same on both sides; a dirty tree pairs
    (its commit and convolution agree) with the note "dirty tree"."""
    reasons, dirty = set(), False
    for px, py in zip(a, b):
        if None in (px["commit"], py["commit"], px["conv_impl"], py["conv_impl"]):
            reasons.add("provenance unknown")
        elif px["commit"] != py["commit"]:
            reasons.add(f"commits {px['commit']} / {py['commit']}")
        elif px["conv_impl"] != py["conv_impl"]:
            reasons.add(f"conv {px['conv_impl']} / {py['conv_impl']}")
        dirty = dirty or bool(px["dirty"]) or bool(py["dirty"])
    if reasons:
        return False, "; ".join(sorted(reasons))
    return True, "dirty tree" if dirty else ""
