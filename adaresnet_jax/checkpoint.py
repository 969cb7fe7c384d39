"""Checkpoints of the train state with orbax-checkpoint (the workdir's ``config.json`` is :mod:`adaresnet_jax.runconfig`'s).

Layout of a workdir: ``checkpoints/<step>/`` (the latest ``keep_checkpoints``, saved every ``checkpoint_every`` epochs, after
the last epoch and on SIGTERM) and ``best/<step>/`` (one checkpoint, the best validation accuracy so
far). The two managers are separate so keeping the best never deletes the newest.

Crash safety. orbax writes each step into a temporary folder and renames it to ``<step>`` only when
it is complete, so a process killed mid-write (SIGKILL, preemption) leaves no ``<step>`` folder; the
next run removes the temporary one and resumes from the newest complete step. Every step also
records, in its orbax step metadata (``_CHECKPOINT_METADATA``), the device and process count it was
saved on and a CRC-32 of every array of the state; :meth:`Checkpoints.restore_latest` checks it after
restoring. A step that fails to restore, lacks that metadata or does not match its checksum is
reported on stderr by name, moved to ``<workdir>/corrupt_checkpoints/`` and skipped for the next
older one; when none is left it raises :class:`NoGoodCheckpoint` (``train.py`` exits with code 2
rather than silently starting over in a workdir that holds a run; rerunning the command then starts
from step 0, since the corrupt steps are no longer in ``checkpoints/``). Checkpoints written before
these checksums existed count as corrupt.

Streaming runs (:mod:`adaresnet_jax.data.streaming`) save a second item beside the state in each step of
``checkpoints/``: ``data/process_<i>-of-<n>.json``, each process's grain iterator state, written by
grain's orbax handler (``grain.checkpoint``); the state stays the item ``default``, so the layout of the
state and its checksum are those of a resident run. :meth:`Checkpoints.restore_latest` returns this
process's input state, or None where the step has none for this process count.

Multi-process runs: the two managers synchronise the processes with their own barrier names
(``barrier_sync_key_prefix`` "latest" and "best"), since both often save the same step.
"""

from __future__ import annotations

import shutil
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CorruptCheckpoint(RuntimeError):
    """A checkpoint step that cannot be restored or does not match its recorded checksum."""


class NoGoodCheckpoint(RuntimeError):
    """Every checkpoint step of a workdir is corrupt (each was reported and moved aside)."""


def state_checksum(state: Any) -> int | None:
    """CRC-32 over the bytes of every array of ``state`` (tree order), or None if some array is not
    fully replicated (then no process holds all of it). Fetches one copy of each array to the host."""
    crc = 0
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array):
            if not leaf.sharding.is_fully_replicated:
                return None
            leaf = leaf.addressable_data(0)
        crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
    return crc


def _warn(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"train.py: warning: {msg}", file=sys.stderr, flush=True)


class _InputState:
    """What grain's orbax handler saves and restores: ``get_state`` -> bytes, ``set_state(bytes)``."""

    def __init__(self, value: bytes | None = None) -> None:
        self.value = value

    def get_state(self) -> bytes | None:
        return self.value

    def set_state(self, value: bytes) -> None:
        self.value = value

    def start_prefetch(self) -> None:
        pass


class Checkpoints:
    """The latest-N manager and the best-by-validation-accuracy manager of one workdir.

    ``read_only`` (for --eval-only) creates no folders. Saves are asynchronous (orbax copies the arrays
    off the device before ``save`` returns, so the train step may donate them); ``wait`` blocks.
    """

    def __init__(self, workdir: Path, *, keep: int = 2, with_best: bool = True, read_only: bool = False,
                 with_data: bool = False) -> None:
        self.workdir, self.with_data = workdir, with_data
        handlers: dict[str, Any] = {"default": ocp.StandardCheckpointHandler()}
        if with_data:
            import grain.checkpoint  # registers grain's orbax handler and its CheckpointSave/Restore args

            handlers["data"] = grain.checkpoint.CheckpointHandler()
        common: dict[str, Any] = {"create": not read_only, "cleanup_tmp_directories": not read_only}
        # Each manager synchronises the processes of a multi-host run with barriers named after the step.
        # "latest" and "best" often save the same step, so each gets its own barrier prefix: with one
        # shared name, the second save of a step finds the first's barrier still open and every process
        # hangs ("Barrier _async_write_complete.<step> is already ongoing").
        self.latest = ocp.CheckpointManager(
            (workdir / "checkpoints").absolute(), item_handlers=handlers,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, **common, multiprocessing_options=(
                ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="latest"))))
        self.best = None
        if with_best:
            self.best = ocp.CheckpointManager(
                (workdir / "best").absolute(), item_handlers={"default": ocp.StandardCheckpointHandler()},
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1, best_fn=lambda m: m["val_acc"], best_mode="max",
                    keep_checkpoints_without_metrics=False, **common, multiprocessing_options=(
                        ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="best"))))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    @staticmethod
    def _metadata(state: Any) -> dict[str, Any]:
        devices = jax.devices()
        return {"devices": len(devices), "processes": jax.process_count(), "platform": devices[0].platform,
                "crc32": state_checksum(state)}

    def save(self, step: int, state: Any, data: bytes | None = None) -> None:
        """Saves ``state`` (and, in a streaming run, this process's input-pipeline state ``data``) as ``step``."""
        items = {"default": ocp.args.StandardSave(state)}
        if data is not None:
            import grain.checkpoint

            items["data"] = grain.checkpoint.CheckpointSave(_InputState(data))
        self.latest.save(step, args=ocp.args.Composite(**items), force=True, custom_metadata=self._metadata(state))

    def save_best(self, step: int, state: Any, val_acc: float) -> None:
        if self.best is not None:
            self.best.save(step, args=ocp.args.Composite(default=ocp.args.StandardSave(state)),
                           metrics={"val_acc": float(val_acc)},
                           force=True, custom_metadata=self._metadata(state))

    def best_val_acc(self) -> float | None:
        """Validation accuracy of the kept best checkpoint (None without one)."""
        step = None if self.best is None else self.best.best_step()
        if step is None:
            return None
        metrics = self.best.metrics(step)
        return None if not metrics else float(metrics["val_acc"])

    def restore(self, abstract_state: Any, *, which: str = "latest") -> tuple[int, Any]:
        """(step, state) of the latest (or best) checkpoint, restored into ``abstract_state``'s shardings.

        Raises FileNotFoundError without one, CorruptCheckpoint if it is unreadable or fails its checksum.
        """
        mngr = self.best if which == "best" else self.latest
        step = None if mngr is None else (mngr.best_step() if which == "best" else mngr.latest_step())
        if step is None:
            raise FileNotFoundError(f"no {which} checkpoint")
        state, _, _ = self._restore_step(mngr, step, abstract_state)
        return step, state

    def _restore_step(self, mngr: ocp.CheckpointManager, step: int, abstract_state: Any
                      ) -> tuple[Any, dict, bytes | None]:
        path = Path(mngr.directory) / str(step)
        items = {"default": ocp.args.StandardRestore(abstract_state)}
        data = _InputState()
        if mngr is self.latest and self.with_data and (
                path / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json").is_file():
            import grain.checkpoint

            items["data"] = grain.checkpoint.CheckpointRestore(data)
        try:
            meta = dict(mngr.metadata(step).custom_metadata or {})
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(f"{path}: unreadable step metadata ({type(e).__name__}: {e})") from e
        if "crc32" not in meta:
            raise CorruptCheckpoint(f"{path}: no checksum in its step metadata (_CHECKPOINT_METADATA)")
        try:
            state = mngr.restore(step, args=ocp.args.Composite(**items)).default
        except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types for damaged files)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CorruptCheckpoint(f"{path}: restore failed ({type(e).__name__}: {first[:200]})") from e
        if meta["crc32"] is not None and state_checksum(state) != meta["crc32"]:
            raise CorruptCheckpoint(f"{path}: contents do not match the checksum recorded when it was saved")
        return state, meta, data.value

    def restore_latest(self, abstract_state: Any, say: Callable[[str], None] = _warn
                       ) -> tuple[int, Any, dict[str, Any], bytes | None] | None:
        """(step, state, metadata, this process's input state or None) of the newest good step, or None if
        there is no step at all.

        Each corrupt step is reported on one stderr line (``say``) naming its path, moved to
        ``<workdir>/corrupt_checkpoints/<step>`` (so it is never tried or overwritten again) and
        skipped for the next older one. Raises NoGoodCheckpoint when every step is corrupt.
        """
        bad = []
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                state, meta, data = self._restore_step(self.latest, step, abstract_state)
            except CorruptCheckpoint as e:
                bad.append(step)
                moved = self._move_aside(step)
                say(f"corrupt checkpoint step {step} skipped: {e}; moved to {moved}")
                continue
            if bad:
                self.latest.reload()
            return step, state, meta, data
        if bad:
            self.latest.reload()
            raise NoGoodCheckpoint(
                f"no readable checkpoint left in {self.workdir / 'checkpoints'} (corrupt steps "
                f"{', '.join(map(str, bad))} moved to {self.workdir / 'corrupt_checkpoints'}): "
                "rerun the same command to start over from step 0, or use another --workdir")
        return None

    def _move_aside(self, step: int) -> Path:
        dest = self.workdir.absolute() / "corrupt_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(self.latest.directory) / str(step)), str(dest))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"adaresnet_move_corrupt_{step}")
        return dest

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()
