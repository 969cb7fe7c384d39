"""``train.py`` with faults injected from outside the package (tests only): ``python tests/faulty_train.py
<train.py flags>``. Each fault is off unless its environment variable is set:

- ``FAULT_COMMIT_DELAY="<step>:<seconds>"``: orbax's commit (the rename of the finished temporary folder) of
  step ``<step>`` waits that long first, so a test can SIGKILL a process while that checkpoint is written
  but not committed (patches orbax's ``AtomicRenameTemporaryPath.finalize``, the default on a local disk).
- ``FAULT_FAIL_SAVE="<step>"``: ``Checkpoints.save`` of that step raises OSError in this process.
- ``FAULT_PAUSE="<step>:<marker>"``: after ``Checkpoints.save`` of that step, the process writes the file
  ``<marker>`` and waits there until it has received SIGTERM or SIGINT (``StopOnSigterm.requested``), then
  trains on. So the test's signal always lands mid-run, at a known step: a one-process run stops at
  ``<step> + 1``.
- ``FAULT_SIGNAL_SEEN="<marker>"``: writes the file ``<marker>`` once the run has received its first signal,
  so a test can send a second one knowing the first was counted.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaresnet_jax import checkpoint, stopping, train  # noqa: E402

_stops: list[stopping.StopOnSigterm] = []


def _requested() -> bool:
    return bool(_stops) and _stops[-1].requested


def _install() -> None:
    if spec := os.environ.get("FAULT_COMMIT_DELAY"):
        step, seconds = spec.split(":")
        cls = ocp.path.atomicity.AtomicRenameTemporaryPath
        original = cls.finalize

        async def finalize(self: Any, *args: Any, **kwargs: Any) -> None:
            if self._final_path.name == step:
                await asyncio.sleep(float(seconds))
            await original(self, *args, **kwargs)

        cls.finalize = finalize

    save = checkpoint.Checkpoints.save
    fail, pause = os.environ.get("FAULT_FAIL_SAVE"), os.environ.get("FAULT_PAUSE")

    def faulty_save(self: checkpoint.Checkpoints, step: int, *args: Any, **kwargs: Any) -> None:
        if fail == str(step):
            raise OSError(f"simulated failure saving step {step} (FAULT_FAIL_SAVE)")
        save(self, step, *args, **kwargs)
        if pause and pause.split(":")[0] == str(step):
            Path(pause.split(":", 1)[1]).write_text(str(step))
            while not _requested():
                time.sleep(0.01)

    checkpoint.Checkpoints.save = faulty_save

    enter = stopping.StopOnSigterm.__enter__
    seen = os.environ.get("FAULT_SIGNAL_SEEN")

    def recording_enter(self: stopping.StopOnSigterm) -> stopping.StopOnSigterm:
        _stops.append(self)
        if seen:
            def watch() -> None:
                while not self.requested:
                    time.sleep(0.01)
                Path(seen).write_text("1")

            threading.Thread(target=watch, daemon=True).start()
        return enter(self)

    stopping.StopOnSigterm.__enter__ = recording_enter


if __name__ == "__main__":
    _install()
    sys.exit(train.main(sys.argv[1:]))
