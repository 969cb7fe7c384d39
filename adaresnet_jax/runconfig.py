"""A workdir's saved configuration, ``<workdir>/config.json``: written when a run starts training, read back to
resume (:func:`check_workdir` refuses a workdir that holds another configuration) and by ``--eval-only``
(which takes the run's own config). The flags in ``RESUME_SAFE_FIELDS`` may change between the commands of
one run; any other difference is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from adaresnet_jax.config import RESUME_SAFE_FIELDS, Config


class IncompatibleWorkdir(ValueError):
    """The workdir belongs to a run with another configuration."""


def config_diff(saved: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Fields (outside RESUME_SAFE_FIELDS) whose saved value differs from ``cfg``: {name: (saved, now)}."""
    now = dataclasses.asdict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}  # fields newer than a saved config
    keys = (set(saved) | set(now)) - RESUME_SAFE_FIELDS
    return {k: (saved.get(k, defaults.get(k)), now.get(k)) for k in sorted(keys)
            if saved.get(k, defaults.get(k)) != now.get(k)}


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
    """Writes ``<workdir>/config.json`` (process 0 only)."""
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(cfg.to_json() + "\n")


def load_config(workdir: Path) -> dict[str, Any] | None:
    """The saved config as a dict, or None when the workdir has none."""
    path = workdir / "config.json"
    return json.loads(path.read_text()) if path.exists() else None
