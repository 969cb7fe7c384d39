"""Run outputs in the workdir: metrics.jsonl, TensorBoard events, summary.json, PNG plots.

Only process 0 writes (the trainer constructs :class:`RunLog` with ``enabled=jax.process_index() == 0``).
metrics.jsonl has one JSON object per epoch (or per --log-every-steps / --eval-every-steps steps) with the
keys of :data:`EPOCH_KEYS`: ``epoch`` is the epochs done (an integer at an epoch's end, else a fraction),
train loss and accuracy are over the steps since the previous row, ``val_*``/``test_*`` are null where no
evaluation ran (or without a validation split), ``epoch_time`` is the seconds those steps took,
``bad_images`` the unreadable images the streaming input path has skipped so far (null for the resident
path); ``skip_weights`` maps ``"stage1/block1"`` to a float (or a list for per-channel weights).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

EPOCH_KEYS = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
              "lr", "images_per_sec", "epoch_time", "bad_images", "skip_weights")


def skip_values(weights: dict[str, Any]) -> dict[str, float | list[float]]:
    """{"stage1/block1": array (1,) or (C,)} -> JSON-ready floats / lists."""
    out: dict[str, float | list[float]] = {}
    for k, v in weights.items():
        a = np.asarray(v, np.float64).reshape(-1)
        out[k] = float(a[0]) if a.size == 1 else [float(x) for x in a]
    return out


def _clean(v: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/Inf to None."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    """Writes metrics.jsonl and TensorBoard scalars per epoch; plots and summary at the end."""

    def __init__(self, workdir: Path, *, enabled: bool, resume_step: int = 0) -> None:
        self.workdir, self.enabled = workdir, enabled
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        # A resumed run replaces rows logged after its checkpoint (those steps will be trained again).
        rows = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def _writer(self):  # noqa: ANN202
        """The TensorBoard writer, or None where tensorboardX is not installed (a lean GPU image)."""
        if self._tb is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print("warning: tensorboardX is not installed: no TensorBoard event files "
                      "(metrics.jsonl has every number)", file=sys.stderr)
                self._tb = False
            else:
                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        return self._tb or None

    def epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = _clean(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tb, step = self._writer(), row["step"]
        if tb is None:
            return
        for k, v in row.items():
            if k not in ("epoch", "step", "skip_weights") and isinstance(v, (int, float)):
                tb.add_scalar(k, v, step)
        for name, w in row["skip_weights"].items():
            w = w if isinstance(w, list) else [w]
            tb.add_scalar(f"skip_weight/{name}", float(np.mean(w)), step)
        tb.flush()

    def close(self) -> None:
        if self._tb:
            self._tb.close()
            self._tb = None

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def summary(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            (self.workdir / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")

    def plots(self) -> None:
        if self.enabled:
            plot_curves(self.rows(), self.workdir)


def plot_curves(rows: list[dict[str, Any]], out: Path) -> None:
    """curves.png (loss and accuracy per epoch) and skip_weights.png (each block's mean skip weight)."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for fig, name in ((curves_figure(rows), "curves.png"), (skip_weights_figure(rows), "skip_weights.png")):
        fig.tight_layout(); fig.savefig(out / name, dpi=100); plt.close(fig)


def curves_figure(rows: list[dict[str, Any]]) -> Any:
    """The figure of curves.png: loss (log axis, so a blow-up leaves the rest readable) and accuracy per epoch."""
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "acc")):
        for split in ("train", "val", "test"):
            ys = [r.get(f"{split}_{metric}") for r in rows]
            if any(y is not None for y in ys):
                ax.plot(ep, [np.nan if y is None else y for y in ys], marker=".", label=split)
        ax.set_xlabel("epoch"); ax.set_ylabel(metric); ax.grid(alpha=0.3); ax.legend()
    axes[0].set_yscale("log")
    axes[0].set_ylabel("loss (log scale)")
    return fig


def skip_weights_figure(rows: list[dict[str, Any]]) -> Any:
    """The figure of skip_weights.png: one line per block, coloured from a colormap sampled at as many points
    as there are blocks (distinct colours for up to 256 blocks; matplotlib's default cycle repeats after 10)."""
    import matplotlib
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(rows[-1]["skip_weights"])
    colours = matplotlib.colormaps["turbo"](np.linspace(0.0, 1.0, max(len(names), 1)))
    for name, colour in zip(names, colours):
        ys = [np.mean(r["skip_weights"].get(name, np.nan)) for r in rows]
        ax.plot(ep, ys, marker=".", label=name, color=colour)
    ax.set_xlabel("epoch"); ax.set_ylabel("skip weight (mean over channels)"); ax.grid(alpha=0.3)
    ax.set_title("skip weights per block" if names else "no skip weights (skip=identity)")
    if names:
        ax.legend(fontsize=7, ncol=2)
    return fig
