"""Faults and scale-out through train.py: SIGKILL mid-epoch and mid-checkpoint-write, corrupt checkpoints,
restoring on another device count (8 -> 1, 1 -> 8), two processes stopped and restarted, and bad data files.

Every run is tiny (model "tiny" at width 4, a few hundred digits); subprocesses share this module's
persistent compilation cache. Final parameters are compared with an uninterrupted run: bit for bit where
the device count is the same, to float32 round-off where it differs (the gradient sum order changes).
The kill time of the mid-epoch SIGKILL is random; its seed is printed (set FAULTS_SEED to replay one).
Faults that need the run's cooperation (a held or failing checkpoint save, a pause until a signal has
arrived) are injected from outside the package by ``tests/faulty_train.py``, which patches orbax and
``adaresnet_jax.checkpoint`` and then calls ``train.main``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from adaresnet_jax import train as T
from helpers import (  # noqa: F401 (autouse fixture)
    Processes, compilation_cache, count_compiles, final_params, free_port, run_processes, xla_flags)

REPO = Path(__file__).resolve().parents[1]
# 256 training digits, batch 32: 8 steps an epoch, 3 epochs, cosine schedule.
FLAGS = ["--dataset", "digits", "--model", "tiny", "--width", "4", "--max-train", "256", "--max-test", "100", "--batch-size", "32",
         "--quiet", "--eval-batch-size", "128", "--augment", "--seed", "3", "--epochs", "3", "--schedule", "cosine"]
# Across device counts: SGD, whose update is linear in the gradient, so the float32 round-off of a
# different gradient sum order stays round-off (Adam's m / sqrt(v) blows it up for near-zero gradients:
# after 24 steps an uninterrupted 8-device Adam run differs from the 1-device one by 7e-4).
SGD_FLAGS = FLAGS + ["--optimizer", "sgd", "--lr", "0.05"]
# For the SIGKILL tests: longer epochs (64 steps of 8), so a random kill time mostly lands inside one.
KILL_FLAGS = ["--dataset", "digits", "--model", "tiny", "--width", "4", "--max-train", "512", "--max-test", "100", "--batch-size", "8",
              "--quiet", "--eval-batch-size", "128", "--augment", "--seed", "4", "--epochs", "6"]


def env_for(devices: int = 1, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("FAULT_")}
    env.update({"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
                "XLA_FLAGS": xla_flags(devices), **extra})
    return env


def train_cmd(flags: list[str], workdir: Path, *more: str, script: str = "train.py") -> list[str]:
    return [sys.executable, script, *flags, "--workdir", str(workdir), *more]


FAULTY = "tests/faulty_train.py"  # train.py with the faults its FAULT_* environment variables ask for


def run_train(flags: list[str], workdir: Path, *more: str, devices: int = 1, timeout: float = 300
              ) -> subprocess.CompletedProcess:
    out = subprocess.run(train_cmd(flags, workdir, *more), cwd=REPO, env=env_for(devices), capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def complete_steps(workdir: Path) -> list[int]:
    """Committed checkpoint steps (orbax renames a finished write to the bare step number)."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def assert_same_params(workdir: Path, reference: tuple[int, dict], *, exact: bool = True) -> None:
    step, params = final_params(workdir)
    assert step == reference[0]
    assert jax.tree.structure(params) == jax.tree.structure(reference[1])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference[1])):
        if exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict]:
    """(step, params) of an uninterrupted 1-device run with FLAGS (in this process)."""
    wd = tmp_path_factory.mktemp("reference")
    assert T.main(FLAGS + ["--workdir", str(wd)]) == 0
    return final_params(wd)


@pytest.fixture(scope="module")
def sgd_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict]:
    """(step, params) of an uninterrupted 1-device run with SGD_FLAGS (in this process)."""
    wd = tmp_path_factory.mktemp("sgd_reference")
    assert T.main(SGD_FLAGS + ["--workdir", str(wd)]) == 0
    return final_params(wd)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir of FLAGS stopped after epoch 2: checkpoints 8 and 16 (each test corrupts a copy)."""
    wd = tmp_path_factory.mktemp("two_epochs") / "run"
    assert T.main(FLAGS + ["--workdir", str(wd), "--stop-after-epochs", "2"]) == 0
    assert complete_steps(wd) == [8, 16]
    return wd


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict]:
    """(step, params) of an uninterrupted 1-device run with KILL_FLAGS (in this process)."""
    wd = tmp_path_factory.mktemp("kill_reference")
    assert T.main(KILL_FLAGS + ["--workdir", str(wd)]) == 0
    return final_params(wd)


def wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.returncode}) before {what}: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.005)


# ----------------------------------------------------------------------------- SIGKILL

@pytest.mark.slow
def test_sigkill_during_epoch_resumes_from_last_complete_checkpoint(tmp_path: Path, kill_reference) -> None:
    """SIGKILL at a seeded random time after the first checkpoint, uniform over the next 3 epoch
    times (the training steps take ~60% of that time, evaluation and saving the rest): the same
    command resumes from the newest complete checkpoint and ends bit-equal to an uninterrupted run."""
    seed = int(os.environ.get("FAULTS_SEED", random.SystemRandom().randrange(2**31)))
    fraction = random.Random(seed).uniform(0.02, 3.0)
    wd = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(KILL_FLAGS, wd), cwd=REPO, env=env_for(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(proc, lambda: (wd / "checkpoints").is_dir() and complete_steps(wd), "a first checkpoint")
        epoch_time = json.loads((wd / "metrics.jsonl").read_text().splitlines()[0])["epoch_time"]
        delay = fraction * epoch_time  # relative to this machine's pace: 5 epochs are still to run
        print(f"FAULTS_SEED={seed}: SIGKILL {delay:.3f} s ({fraction:.2f} epoch times) after the first checkpoint")
        time.sleep(delay)
        assert proc.poll() is None, f"FAULTS_SEED={seed}: the run finished before the kill"
        proc.kill()  # SIGKILL
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    steps = complete_steps(wd)
    logged = [json.loads(line)["epoch"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
    print(f"killed with complete checkpoints {steps}, epochs logged {logged}")
    assert steps, f"FAULTS_SEED={seed}"
    out = run_train(KILL_FLAGS, wd)  # the same command
    assert f"resumed from step {steps[-1]} " in out.stderr, (seed, out.stderr[-2000:])
    assert "corrupt" not in out.stderr and not list((wd / "checkpoints").glob("*tmp*"))
    assert_same_params(wd, kill_reference)
    assert [json.loads(line)["epoch"] for line in (wd / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_never_loads_it(tmp_path: Path, kill_reference) -> None:
    """The save of step 128 (end of epoch 2) is held between writing its files and committing them
    (FAULT_COMMIT_DELAY); SIGKILL lands there. The half-written step is never used: the rerun
    cleans it up, resumes from step 64 and ends bit-equal to an uninterrupted run."""
    wd = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(KILL_FLAGS, wd, script=FAULTY), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env_for(1, FAULT_COMMIT_DELAY="128:120"), text=True)

    def tmp_dirs() -> list[Path]:  # orbax's uncommitted folder: 128.orbax-checkpoint-tmp-<n>
        return list((wd / "checkpoints").glob("128.*tmp*")) if (wd / "checkpoints").is_dir() else []

    try:
        wait_for(proc, tmp_dirs, "temporary folder of checkpoint 128")
        time.sleep(random.Random(0).uniform(0.0, 0.5))
        proc.kill()  # SIGKILL, while step 128 is written but not committed
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert complete_steps(wd) == [64] and tmp_dirs(), sorted(p.name for p in (wd / "checkpoints").iterdir())
    out = run_train(KILL_FLAGS, wd)  # the same command (the hook off)
    assert "resumed from step 64 " in out.stderr and "corrupt" not in out.stderr, out.stderr[-2000:]
    assert not list((wd / "checkpoints").glob("*tmp*")), "the half-written step should have been cleaned up"
    assert_same_params(wd, kill_reference)


# ----------------------------------------------------------------------------- corrupt checkpoints

def corrupt(step_dir: Path, how: str) -> None:
    if how == "truncated":  # every array data file cut to 16 bytes
        files = [p for p in step_dir.rglob("*") if p.is_file() and "ocdbt.process_" in str(p) and p.parent.name == "d"]
        assert files
        for p in files:
            with open(p, "r+b") as f:
                f.truncate(16)
    elif how == "no_metadata":  # the item's tree metadata deleted
        (step_dir / "default" / "_METADATA").unlink()
    elif how == "bad_checksum":  # readable, but not what was saved (stands for silent bit rot)
        meta = step_dir / "_CHECKPOINT_METADATA"
        d = json.loads(meta.read_text())
        d["custom_metadata"]["crc32"] ^= 1
        meta.write_text(json.dumps(d))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "no_metadata", "bad_checksum"])
def test_corrupt_checkpoint_is_reported_and_skipped(how: str, tmp_path: Path, reference, two_epochs: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    wd = tmp_path / "run"
    shutil.copytree(two_epochs, wd)
    corrupt(wd / "checkpoints" / "16", how)
    capsys.readouterr()
    assert T.main(FLAGS + ["--workdir", str(wd)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "corrupt checkpoint" in line]
    assert len(warnings) == 1 and "step 16" in warnings[0] and str(wd / "checkpoints" / "16") in warnings[0], err
    assert "resumed from step 8 " in err
    assert list((wd / "corrupt_checkpoints").iterdir())[0].name.startswith("16-")  # moved aside, kept
    assert_same_params(wd, reference)


def test_no_good_checkpoint_exits_2(tmp_path: Path, two_epochs: Path, capsys: pytest.CaptureFixture) -> None:
    wd = tmp_path / "run"
    shutil.copytree(two_epochs, wd)
    corrupt(wd / "checkpoints" / "16", "truncated")
    corrupt(wd / "checkpoints" / "8", "bad_checksum")
    capsys.readouterr()
    assert T.main(FLAGS + ["--workdir", str(wd)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if "corrupt checkpoint step" in line][:2] == [
        line for line in lines if "step 16" in line or "step 8" in line][:2]
    assert "train.py: error: no readable checkpoint left" in lines[-1] and "start over from step 0" in lines[-1]
    assert complete_steps(wd) == []  # both moved aside: a rerun starts over explicitly, never from a bad one


# ----------------------------------------------------------------------------- another device count

@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(8, 1), (1, 8)])
def test_restore_on_another_device_count(first: int, second: int, tmp_path: Path, sgd_reference,
                                         capsys: pytest.CaptureFixture) -> None:
    """Epoch 1 on ``first`` devices, epochs 2-3 on ``second``: the run says so and matches 1 device.

    (The restore itself is bit-exact: train.py checks each restored state against the CRC-32 recorded
    at save time.)"""
    wd = tmp_path / "run"
    if first == 1:
        assert T.main(SGD_FLAGS + ["--workdir", str(wd), "--stop-after-epochs", "1"]) == 0
        err = run_train(SGD_FLAGS, wd, devices=second).stderr
    else:
        run_train(SGD_FLAGS, wd, "--stop-after-epochs", "1", devices=first)
        capsys.readouterr()
        assert T.main(SGD_FLAGS + ["--workdir", str(wd)]) == 0
        err = capsys.readouterr().err
    noun = lambda n: f"{n} device{'s' * (n != 1)}"  # noqa: E731
    assert f"restored a checkpoint saved on {noun(first)} onto {noun(second)}" in err, err[-2000:]
    assert "resumed from step 8 " in err
    assert_same_params(wd, sgd_reference, exact=False)


# ----------------------------------------------------------------------------- two processes

@pytest.mark.slow
def test_two_processes_stop_resume_match_four_devices(tmp_path: Path) -> None:
    """2 processes x 2 CPU devices (coordinator 127.0.0.1, gloo): stopped after epoch 1 with a
    checkpoint, restarted to finish; equal (to round-off) to one process with 4 devices."""
    port = free_port()
    wd = tmp_path / "multi"

    def launch(*more: str) -> list[str]:
        return run_processes([train_cmd(SGD_FLAGS, wd, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                        "--process-id", str(i), *more) for i in range(2)],
                             cwd=REPO, env=env_for(2, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"), timeout=300)

    launch("--stop-after-epochs", "1")
    assert complete_steps(wd) == [8]
    errs = launch()
    assert "resumed from step 8 " in errs[0] and "restored a checkpoint" not in errs[0]
    run_train(SGD_FLAGS, tmp_path / "single", devices=4)
    assert_same_params(wd, final_params(tmp_path / "single"), exact=False)
    multi, single = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                     for d in ("multi", "single"))
    assert [r["epoch"] for r in multi] == [1, 2, 3]
    for m, s in zip(multi, single, strict=True):
        for key in ("train_loss", "val_loss", "test_loss"):
            assert m[key] == pytest.approx(s[key], rel=1e-5), key
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["devices"]["processes"] == 2 and summary["devices"]["count"] == 4


# ----------------------------------------------------------------------------- preemption on many hosts

def launch_two(flags: list[str], workdir: Path, *more: str, env: tuple[dict[str, str], ...] = ({}, {}),
               script: str = "train.py") -> Processes:
    """Starts the 2 processes (x 2 CPU devices, gloo) of one run, with extra environment per process."""
    port = free_port()
    return Processes([train_cmd(flags, workdir, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                "--process-id", str(i), *more, script=script) for i in range(2)], cwd=REPO,
                     env=[env_for(2, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **e) for e in env])


def first_checkpoint(workdir: Path) -> bool:
    return (workdir / "checkpoints").is_dir() and bool(complete_steps(workdir))


# 64 steps an epoch of batch 8, SGD: long enough that a signal lands inside training.
LONG_SGD = KILL_FLAGS + ["--optimizer", "sgd", "--lr", "0.05", "--schedule", "cosine", "--heartbeat-timeout", "30"]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path: Path) -> None:
    """SIGTERM reaches only process 1 of 2 (a preempted host). Both stop at the same step, save one
    checkpoint there and exit 0, each saying which process got the signal; the same commands resume, and
    the run ends bit-equal to an uninterrupted run of the same two processes. (Not to one process with 4
    devices: over 384 SGD steps on batches of 8, the float32 round-off of another all-reduce order grows to
    visible differences.)

    No timer: process 1 holds after saving step 64 until the signal has reached it (FAULT_PAUSE), so the
    signal always lands mid-run. The common step is JAX's (the largest step any process has reached, plus
    one); process 0 cannot get past step 128 (its next metrics fetch needs process 1's steps), so it lies
    in 65..129."""
    wd, marker = tmp_path / "multi", tmp_path / "paused"
    run = launch_two(LONG_SGD, wd, env=({}, {"FAULT_PAUSE": f"64:{marker}"}), script=FAULTY)
    wait_for(run.procs[1], marker.exists, "process 1 holding after its save of step 64")
    run.procs[1].send_signal(signal.SIGTERM)
    results = run.wait(timeout=240)
    assert [rc for rc, _, _ in results] == [0, 0], "".join(out[-2000:] for _, out, _ in results)
    lines = [re.search(r"^(process \d of 2.*); all processes stop at step (\d+): saved a checkpoint at step \2 ", out, re.M)
             for _, out, _ in results]
    assert all(lines), [out[-2000:] for _, out, _ in results]
    assert lines[0][1] == "process 0 of 2: another process received SIGTERM or SIGINT", lines[0][0]
    assert lines[1][1] == "process 1 of 2 received SIGTERM", lines[1][0]
    stopped = [int(m[2]) for m in lines]
    assert stopped[0] == stopped[1] and 64 < stopped[0] <= 2 * 64 + 1, stopped
    assert complete_steps(wd)[-1] == stopped[0]
    results = launch_two(LONG_SGD, wd).wait(timeout=300)
    assert [rc for rc, _, _ in results] == [0, 0], "".join(out[-2000:] for _, out, _ in results)
    assert f"resumed from step {stopped[0]} " in results[0][1]
    results = launch_two(LONG_SGD, tmp_path / "uninterrupted").wait(timeout=300)
    assert [rc for rc, _, _ in results] == [0, 0], "".join(out[-2000:] for _, out, _ in results)
    assert_same_params(wd, final_params(tmp_path / "uninterrupted"))


@pytest.mark.slow
def test_stuck_peer_or_second_sigterm_exit_3_in_bounded_time(tmp_path: Path) -> None:
    """Process 1 is frozen (SIGSTOP), so process 0 blocks in a collective; a SIGTERM to process 0 must still
    end it, with code 3, by its --stop-timeout timer. Then, on one process whose checkpoint save hangs
    (FAULT_COMMIT_DELAY), a second SIGTERM, sent once the first was counted (FAULT_SIGNAL_SEEN), ends it at
    once with code 3. No timed assertion: each exit is told apart by its message, and a process that did
    not exit within the wait (60 s, against the default --stop-timeout of 300 s in the second case) is
    killed and fails the return-code check."""
    wd = tmp_path / "multi"
    run = launch_two(LONG_SGD, wd, "--stop-timeout", "5")
    try:
        wait_for(run.procs[0], lambda: first_checkpoint(wd), "a first checkpoint")
        run.procs[1].send_signal(signal.SIGSTOP)  # process 0 now blocks in its next collective, whenever it sends one
        run.procs[0].send_signal(signal.SIGTERM)
        rc, out, _ = run.wait(timeout=60, only=[0])[0]
    finally:
        run.kill()
    assert rc == 3, (rc, out[-2000:])
    assert "did not stop within --stop-timeout 5 s of SIGTERM" in out.strip().splitlines()[-1]

    wd, seen = tmp_path / "single", tmp_path / "seen"
    run = Processes([train_cmd(KILL_FLAGS, wd, script=FAULTY)], cwd=REPO,
                    env=env_for(1, FAULT_COMMIT_DELAY="64:300", FAULT_SIGNAL_SEEN=str(seen)))
    wait_for(run.procs[0], lambda: list((wd / "checkpoints").glob("64.*tmp*")) if (wd / "checkpoints").is_dir() else [],
             "the (held) save of step 64")
    run.procs[0].send_signal(signal.SIGTERM)
    wait_for(run.procs[0], seen.exists, "the first SIGTERM counted")
    run.procs[0].send_signal(signal.SIGTERM)
    rc, out, _ = run.wait(timeout=60)[0]
    assert rc == 3, (rc, out[-2000:])
    assert "a second SIGTERM arrived" in out.strip().splitlines()[-1]


@pytest.mark.slow
def test_failed_save_on_one_process_ends_every_process(tmp_path: Path) -> None:
    """The save of step 64 fails on process 1 only (FAULT_FAIL_SAVE): process 1 reports it and
    exits 1, and process 0, left waiting for it, is ended by the coordination service within
    --heartbeat-timeout; neither hangs."""
    run = launch_two(LONG_SGD, tmp_path / "multi", "--heartbeat-timeout", "10",
                     env=({}, {"FAULT_FAIL_SAVE": "64"}), script=FAULTY)
    (rc0, out0, waited0), (rc1, out1, _) = run.wait(timeout=150)
    assert rc1 == 1 and "simulated failure saving step 64" in out1.strip().splitlines()[-1], out1[-2000:]
    assert rc0 not in (0, None), out0[-2000:]


# ----------------------------------------------------------------------------- bad data files

def _digits_like(n: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), "y_train": rng.integers(0, 10, n),
            "x_test": rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), "y_test": rng.integers(0, 10, 16)}


@pytest.mark.parametrize("case, match", [
    ("label_out_of_range", "labels outside [0"),
    ("wrong_rank", "has shape (64, 64)"),
    ("nan_images", "NaN/Inf"),
    ("empty_test", "test split is empty"),
])
def test_bad_data_file_exits_2_before_compile(case: str, match: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    d = _digits_like()
    if case == "label_out_of_range":
        d["y_train"][5] = 10
        d["y_test"][0] = -1
    elif case == "wrong_rank":
        d["x_train"] = d["x_train"].reshape(64, 64)
    elif case == "nan_images":
        d["x_train"] = d["x_train"].astype(np.float32) / 255
        d["x_train"][3, 2, 2, 0] = np.nan
    elif case == "empty_test":
        d["x_test"], d["y_test"] = d["x_test"][:0], d["y_test"][:0]
    np.savez(tmp_path / "data.npz", **d)
    capsys.readouterr()
    with count_compiles() as n:
        rc = T.main(["--model", "tiny", "--dataset", "npz", "--data-dir", str(tmp_path / "data.npz"), "--quiet",
                     "--batch-size", "16", "--epochs", "1", "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("train.py: error:") and "\n" not in err and match in err, err
    assert n[0] == 0, "bad data must be reported before any compile"
    assert not (tmp_path / "run" / "checkpoints").exists() or not complete_steps(tmp_path / "run")
