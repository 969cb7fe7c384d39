"""Helpers shared by the training tests (test_train.py, test_faults.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A persistent compilation cache per test module (its train.py subprocesses get it through
    JAX_COMPILATION_CACHE_DIR): the many tiny runs share their compiled steps."""
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    yield
    jax.config.update("jax_compilation_cache_dir", old)


def final_params(workdir: Path) -> tuple[int, dict]:
    """(step, params) of the latest checkpoint of a workdir (saved on any device count), as numpy."""
    mngr = ocp.CheckpointManager((workdir / "checkpoints").absolute(), item_handlers=ocp.StandardCheckpointHandler())
    step = mngr.latest_step()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), mngr.item_metadata(step))
    state = mngr.restore(step, args=ocp.args.StandardRestore(target))
    mngr.close()
    return step, jax.tree.map(np.asarray, state["params"])


def assert_trees_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@contextlib.contextmanager
def count_compiles() -> Iterator[list[int]]:
    """Counts XLA compilations (jax.monitoring events) inside the block: [n]."""
    n = [0]

    def listener(event: str, duration: float, **kw) -> None:
        if "backend_compile" in event:
            n[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield n
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with ``devices`` CPU devices, keeping the caller's other XLA flags (such as
    ``--xla_cpu_max_isa=AVX2``, which the whole suite can run under to imitate an older CPU)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def free_port() -> int:
    """A localhost port that is free now (for a jax.distributed coordinator)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Processes started at once (the processes of one distributed run), each writing stdout and stderr
    to its own temporary file: a pipe that nobody reads would fill up and block a chatty process, and
    with it every peer waiting in a collective."""

    def __init__(self, cmds: list[list[str]], cwd: Path, env: dict[str, str] | list[dict[str, str]]) -> None:
        envs = env if isinstance(env, list) else [env] * len(cmds)
        self.logs = [tempfile.TemporaryFile("w+") for _ in cmds]
        self.procs = [subprocess.Popen(c, cwd=cwd, env=e, stdout=log, stderr=subprocess.STDOUT, text=True)
                      for c, e, log in zip(cmds, envs, self.logs)]

    def wait(self, timeout: float, only: list[int] | None = None) -> list[tuple[int | None, str, float]]:
        """(return code, output, seconds to exit) of the processes ``only`` (default: all), waiting at most
        ``timeout`` s in all; every process still running after that is killed (after SIGCONT)."""
        t0, out = time.monotonic(), []
        try:
            for i in only if only is not None else range(len(self.procs)):
                p = self.procs[i]
                try:
                    p.wait(timeout=max(t0 + timeout - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    pass
                out.append((p.returncode, time.monotonic() - t0, i))
        finally:
            self.kill()
        return [(rc, self.output(i), waited) for rc, waited, i in out]

    def output(self, i: int) -> str:
        self.logs[i].seek(0)
        return self.logs[i].read()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()


def run_processes(cmds: list[list[str]], cwd: Path, env: dict[str, str], timeout: float) -> list[str]:
    """Runs the commands at once, kills any left after ``timeout``, asserts that every one exited 0;
    their outputs (stdout and stderr)."""
    results = Processes(cmds, cwd, env).wait(timeout)
    assert [rc for rc, _, _ in results] == [0] * len(cmds), (
        f"return codes {[rc for rc, _, _ in results]} (timeout {timeout} s): "
        + "".join(f"\n--- process {i}:\n{out[-2500:]}" for i, (_, out, _) in enumerate(results)))
    return [out for _, out, _ in results]
