"""Helpers shared by the training tests (test_train.py, test_faults.py)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
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


def free_port() -> int:
    """A localhost port that is free now (for a jax.distributed coordinator)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(cmds: list[list[str]], cwd: Path, env: dict[str, str], timeout: float) -> list[str]:
    """Run the commands at once (the processes of one distributed run), kill any left after ``timeout``,
    assert that every one exited 0; their stderr."""
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), "".join(err[-2000:] for _, err in outs)
    return [err for _, err in outs]
