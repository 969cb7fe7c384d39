"""Stopping a run on SIGTERM or SIGINT (Ctrl-C): at one common step on every process, within a bounded time.

:class:`StopOnSigterm` is entered around the training loop; the loop asks ``should_stop(step)`` after
every step and, when it answers True, saves a checkpoint at that step and exits 0. SIGINT is treated
exactly as SIGTERM (below, "SIGTERM" means either): no ``KeyboardInterrupt`` is raised inside the loop,
so the checkpoint being written is finished and kept. ``received`` names the signal this process got
(None if it got none: in a multi-process run, another process may have).

* One process: the first SIGTERM makes ``should_stop`` answer True at the next step.
* Several processes (``jax.distributed``): SIGTERM may reach only one of them (a preempted host). The
  signal is handed to JAX's preemption service, which ``jax.distributed.initialize`` sets up, and
  ``should_stop`` is ``multihost_utils.reached_preemption_sync_point(step)``: every process answers
  True at the same step (the largest step any of them has reached, plus one), so all save one
  consistent checkpoint.
* Bounded: from the first SIGTERM on, a timer runs; if the run has not left the ``with`` block after
  ``timeout`` seconds (a peer stuck in a collective, a save that never completes), or if a second
  SIGTERM (or SIGINT) arrives, the process prints one line and exits with code 3 at once (``os._exit``), without
  saving. Signals are read by a watcher thread through ``signal.set_wakeup_fd``, so this works even
  while the main thread is blocked inside a device computation.

JAX's preemption service installs its SIGTERM handler in C (``std::signal``), which Python cannot see
or call. On entry, this class takes that handler with libc's ``signal()``, installs its own, forwards
the first SIGTERM (or SIGINT, as a SIGTERM) to it, and puts it back on exit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
from typing import Any

EXIT_STOP_TIMEOUT = 3
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)


def _libc_signal(signum: int, handler: int) -> int:
    """libc ``signal(signum, handler)``: installs ``handler`` (an address) and returns the previous one."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype, libc.signal.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_void_p]
    return libc.signal(signum, handler) or 0


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _preemption_service() -> bool:
    """Whether jax.distributed runs with more than one process and its preemption sync manager: public API
    only. ``jax.distributed.initialize`` starts the manager exactly when the ``jax_enable_preemption_service``
    option (default True) is on."""
    import jax

    return (jax.process_count() > 1 and jax.distributed.is_initialized()
            and bool(jax.config.jax_enable_preemption_service))


class StopOnSigterm:
    """Context manager: SIGTERM or SIGINT -> ``should_stop(step)`` True at one common step; bounded exit (see
    module doc)."""

    def __init__(self, timeout: float, *, prog: str = "train.py") -> None:
        self.timeout, self.prog = timeout, prog
        self.requested = False
        self.received: str | None = None  # "SIGTERM" / "SIGINT": the first signal this process got
        self._signals = 0
        self._active = False
        self._forward: Any = None
        self._c_handler = 0
        self._timer: threading.Timer | None = None

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach only the main thread's handlers: nothing to install
        self._multi = _preemption_service()
        if self._multi:
            self._c_handler = _libc_signal(signal.SIGTERM, signal.SIG_DFL)
            if self._c_handler not in (0, 1):  # a real handler, not SIG_DFL / SIG_IGN
                self._forward = _HANDLER(self._c_handler)
        self._old_handlers = {s: signal.signal(s, lambda *_: None) for s in _SIGNALS}  # the watcher thread acts
        self._recv, send = socket.socketpair()
        send.setblocking(False)
        self._send = send
        self._old_fd = signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        self._active = True
        threading.Thread(target=self._watch, name="sigterm-watcher", daemon=True).start()
        return self

    def _watch(self) -> None:
        while True:
            try:
                data = self._recv.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in _SIGNALS:
                    self._on_signal(signal.Signals(signum).name)

    def _on_signal(self, name: str) -> None:
        self._signals += 1
        if self._signals > 1:
            self._die(f"a second {name} arrived before the run had stopped")
        self.received = name
        self.requested = True
        if self._forward is not None:
            self._forward(signal.SIGTERM)
        self._timer = threading.Timer(self.timeout, self._die, args=(
            f"the run did not stop within --stop-timeout {self.timeout:g} s of {name}",))
        self._timer.daemon = True
        self._timer.start()

    def _die(self, why: str) -> None:
        print(f"{self.prog}: error: {why}: exiting (code {EXIT_STOP_TIMEOUT}) without saving", file=sys.stderr,
              flush=True)
        os._exit(EXIT_STOP_TIMEOUT)

    def should_stop(self, step: int) -> bool:
        """True when the run should save at ``step`` and stop; call it after every step, on every process."""
        if self._active and self._multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc: Any) -> None:
        if not self._active:
            return
        if self._timer is not None:
            self._timer.cancel()
        signal.set_wakeup_fd(self._old_fd)
        for s, old in self._old_handlers.items():
            signal.signal(s, old)
        if self._forward is not None:
            _libc_signal(signal.SIGTERM, self._c_handler)  # JAX's preemption notifier, as it was
        self._send.close()
        self._recv.close()
        self._active = False
