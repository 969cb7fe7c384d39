"""Checkpoints of the train state with orbax-checkpoint, and the workdir's saved config.

Layout of a workdir: ``config.json`` (the run's :class:`~adaresnet_jax.config.Config`),
``checkpoints/<step>/`` (the latest ``keep_checkpoints``, saved every ``checkpoint_every`` epochs, after
the last epoch and on SIGTERM) and ``best/<step>/`` (one checkpoint, the best validation accuracy so
far). The two managers are separate so keeping the best never deletes the newest.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from adaresnet_jax.config import RESUME_SAFE_FIELDS, Config


class IncompatibleWorkdir(ValueError):
    """The workdir belongs to a run with another configuration."""


def config_diff(saved: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Fields (outside RESUME_SAFE_FIELDS) whose saved value differs from ``cfg``: {name: (saved, now)}."""
    now = dataclasses.asdict(cfg)
    keys = (set(saved) | set(now)) - RESUME_SAFE_FIELDS
    return {k: (saved.get(k), now.get(k)) for k in sorted(keys) if saved.get(k) != now.get(k)}


def check_workdir(workdir: Path, cfg: Config) -> bool:
    """Raises IncompatibleWorkdir if workdir/config.json is another run's; True if it exists (a resume)."""
    path = workdir / "config.json"
    if not path.exists():
        return False
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IncompatibleWorkdir(f"cannot read {path} ({e}): use a fresh --workdir") from None
    diff = config_diff(saved, cfg)
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:4])
        raise IncompatibleWorkdir(f"workdir '{workdir}' holds a run with another config ({shown}"
                                  f"{', ...' if len(diff) > 4 else ''}): use another --workdir or the same flags")
    return True


def write_config(workdir: Path, cfg: Config) -> None:
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(cfg.to_json() + "\n")


def load_config(workdir: Path) -> dict[str, Any] | None:
    path = workdir / "config.json"
    return json.loads(path.read_text()) if path.exists() else None


class Checkpoints:
    """The latest-N manager and the best-by-validation-accuracy manager of one workdir.

    ``read_only`` (for --eval-only) creates no folders. Saves are asynchronous (orbax copies the arrays
    off the device before ``save`` returns, so the train step may donate them); ``wait`` blocks.
    """

    def __init__(self, workdir: Path, *, keep: int = 2, with_best: bool = True, read_only: bool = False) -> None:
        self.latest = ocp.CheckpointManager(
            (workdir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only))
        self.best = None
        if with_best:
            self.best = ocp.CheckpointManager(
                (workdir / "best").absolute(),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1, best_fn=lambda m: m["val_acc"], best_mode="max",
                    keep_checkpoints_without_metrics=False, create=not read_only))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state: Any) -> None:
        self.latest.save(step, args=ocp.args.StandardSave(state), force=True)

    def save_best(self, step: int, state: Any, val_acc: float) -> None:
        if self.best is not None:
            self.best.save(step, args=ocp.args.StandardSave(state), metrics={"val_acc": float(val_acc)},
                           force=True)

    def best_val_acc(self) -> float | None:
        """Validation accuracy of the kept best checkpoint (None without one)."""
        step = None if self.best is None else self.best.best_step()
        if step is None:
            return None
        metrics = self.best.metrics(step)
        return None if not metrics else float(metrics["val_acc"])

    def restore(self, abstract_state: Any, *, which: str = "latest") -> tuple[int, Any]:
        """(step, state) of the latest (or best) checkpoint, restored into ``abstract_state``'s shardings."""
        mngr = self.best if which == "best" else self.latest
        step = None if mngr is None else (mngr.best_step() if which == "best" else mngr.latest_step())
        if step is None:
            raise FileNotFoundError(f"no {which} checkpoint")
        return step, mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()
