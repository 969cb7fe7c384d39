"""The trainer: config/CLI, optimizer masks, the step, full runs, resume, SIGTERM, bad input, 8 devices.

All runs are tiny (model "tiny", a few hundred digits, a couple of epochs); the quick-preset accuracy
test is the one ~1 min test (marked slow, still run by default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from adaresnet_jax import train as T
from adaresnet_jax.config import PRESETS, Config, build_parser, parse_config
from adaresnet_jax.metrics import EPOCH_KEYS
from adaresnet_jax.models import create_model
from helpers import (  # noqa: F401 (autouse fixture)
    assert_trees_equal, compilation_cache, count_compiles, final_params, free_port, run_processes, xla_flags)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--model", "tiny", "--width", "4", "--max-train", "256", "--max-test", "100", "--batch-size", "32",
        "--quiet", "--eval-batch-size", "128"]


@contextlib.contextmanager
def tfds_mock(num_examples: int):
    """tfds.testing.mock_data for tfds.data_source, with tests/test_data.py's patch for batched reads."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mocking, "_getitems", lambda record_keys, generator, serialized=False:
                   [generator[k] for k in record_keys])
        with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
            yield


# ----------------------------------------------------------------------------- config and CLI

def test_presets_and_flags_override() -> None:
    paper = parse_config(["--preset", "paper"])
    assert paper == Config(preset="paper", **PRESETS["paper"])
    assert (paper.model, paper.skip, paper.optimizer, paper.peak_lr, paper.batch_size, paper.epochs) == \
        ("paper", "learned", "adam", 1e-3, 32, 10)
    assert (paper.schedule, paper.normalize, paper.augment, paper.weight_decay, paper.label_smoothing) == \
        ("constant", False, False, 0.0, 0.0)
    assert (paper.adam_eps, paper.drop_last, paper.val_split) == (1e-7, False, 0.0)  # Keras' Adam and fit
    cifar = Config(**PRESETS["cifar"])
    assert (cifar.optimizer, cifar.nesterov, cifar.schedule, cifar.augment, cifar.crop_pad, cifar.flip) == \
        ("sgd", True, "cosine", True, 4, True)
    c = parse_config(["--preset", "cifar", "--skip", "identity", "--batch-size", "256", "--no-augment",
                      "--max-train", "none", "--skip-init", "0.5", "--dtype", "bfloat16"])
    assert (c.skip, c.batch_size, c.augment, c.model, c.skip_init, c.dtype, c.preset) == \
        ("identity", 256, False, "resnet18_cifar", 0.5, "bfloat16", "cifar")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        Config("quick")  # type: ignore[misc]  # keyword-only


def test_unset_flags_are_neutral_not_a_preset() -> None:
    """Without --preset, an unset flag is the network's or optimizer's own value, not the quick preset's."""
    assert parse_config([]) == Config() and Config().preset is None
    r18 = parse_config(["--model", "resnet18_cifar"])
    assert r18.width is None and r18.epochs != PRESETS["quick"]["epochs"]
    model = create_model(r18.model, num_classes=10, **r18.model_overrides())
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))
    assert n == 11_173_962 + 8  # torchvision-style ResNet-18 (CIFAR stem) + one skip weight per block
    assert (r18.optimizer, r18.peak_lr) == ("sgd", 0.1)
    adam = parse_config(["--optimizer", "adam"])
    assert adam.peak_lr == 1e-3 and adam.adam_eps == 1e-8  # Adam's own defaults (Kingma & Ba)
    assert parse_config(["--preset", "quick", "--lr", "0.5"]).peak_lr == 0.5


def test_help_documents_every_field() -> None:
    text = build_parser().format_help()
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text
    for action in build_parser()._actions:
        assert action.help, action.dest
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "--batch-size" in out.stdout and "--no-normalize" in out.stdout
    # each flag's help names the neutral default and what each preset sets
    lr_help = " ".join(next(a.help for a in build_parser()._actions if a.dest == "lr").split())
    assert "default: None" in lr_help and "quick: 0.003" in lr_help and "paper: 0.001" in lr_help
    assert "cifar: 0.1" in lr_help


# ----------------------------------------------------------------------------- optimizer

def test_weight_decay_and_skip_lr_masks() -> None:
    model = create_model("tiny", num_classes=3)
    params = model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
    decayed = {"/".join(str(k.key) for k in p) for p, v in jax.tree_util.tree_leaves_with_path(T.decay_mask(params))
               if v}
    assert decayed and all(name.endswith("kernel") for name in decayed)
    cfg = Config(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.5, skip_lr_mult=10.0, schedule="constant")
    tx, _ = T.make_optimizer(cfg, 10)
    grads = jax.tree.map(jnp.zeros_like, params)  # zero gradient: only weight decay moves anything
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        name = path[-1].key
        p = params
        for k in path:
            p = p[k.key]
        expected = -0.1 * 0.5 * p if name == "kernel" else jnp.zeros_like(p)
        np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=name)
    grads = jax.tree.map(jnp.ones_like, params)
    tx, _ = T.make_optimizer(dataclasses.replace(cfg, weight_decay=0.0), 10)
    updates, _ = tx.update(grads, tx.init(params))
    np.testing.assert_allclose(updates["stage1_block1"]["skip"]["skip_weight"], [-1.0], rtol=1e-6)  # 0.1 * 10
    np.testing.assert_allclose(updates["head"]["bias"], -0.1 * np.ones(3), rtol=1e-6)


def test_schedules() -> None:
    lr = lambda **kw: T.make_schedule(Config(lr=1.0, epochs=4, **kw), 10)  # noqa: E731  (40 steps)
    cos = lr(schedule="cosine", warmup_epochs=1)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0) and float(cos(40)) == pytest.approx(0.0)
    step = lr(schedule="step")
    assert [float(step(s)) for s in (19, 20, 29, 30)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    assert float(lr(schedule="constant")(33)) == 1.0
    one = lr(schedule="onecycle")
    assert max(float(one(s)) for s in range(40)) == pytest.approx(1.0, rel=1e-2) and float(one(0)) < 0.1


# ----------------------------------------------------------------------------- the step

def test_step_deterministic_and_gather_matches_given_batch() -> None:
    mesh = T.make_mesh()
    model = create_model("tiny", num_classes=10)
    cfg = Config(model="tiny", schedule="constant")
    tx, _ = T.make_optimizer(cfg, 4)
    rng = np.random.default_rng(0)
    x_all = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    y_all = rng.integers(0, 10, 40).astype(np.int32)
    steps = T.make_train_step(model, tx, T.StepOptions(mean=(0.3,), std=(0.2,), seed=3), mesh=mesh)
    perm = T.make_epoch_permutation(3, 40, 8, mesh)(0)
    assert perm.shape == (5, 8) and len(np.unique(np.asarray(perm))) == 40
    key, state0 = jax.random.key(1), T.create_state(model, tx, (8, 8, 1), seed=0, mesh=mesh)
    fresh = lambda: jax.tree.map(jnp.copy, state0)  # noqa: E731  (the steps donate their state)
    a, ma = steps.on_batch(fresh(), x_all[np.asarray(perm[0])], y_all[np.asarray(perm[0])], key)
    b, mb = steps.on_batch(fresh(), x_all[np.asarray(perm[0])], y_all[np.asarray(perm[0])], key)
    c, mc = steps.on_dataset(fresh(), T.replicate(x_all, mesh), T.replicate(y_all, mesh), perm)
    assert int(a["step"]) == 1 and bool(ma["finite"])
    for other, m in ((b, mb), (c, mc)):  # no augmentation: the same batch gives the same update
        assert float(m["loss"]) == float(ma["loss"])
        assert_trees_equal(jax.device_get(other["params"]), jax.device_get(a["params"]))


# ----------------------------------------------------------------------------- full runs

@pytest.fixture(scope="module")
def mocked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch bf16 run on mocked TFDS cifar10 (random 32x32x3 images), with a validation split."""
    wd = tmp_path_factory.mktemp("mocked")
    (wd / "tfds").mkdir()
    with tfds_mock(num_examples=96):
        rc = T.main(["--model", "tiny", "--dataset", "cifar10", "--data-dir", str(wd / "tfds"), "--epochs", "2",
                     "--batch-size", "16", "--val-split", "0.25", "--augment", "--dtype", "bfloat16", "--quiet",
                     "--workdir", str(wd)])
    assert rc == 0
    return wd


def test_run_outputs(mocked_run: Path) -> None:
    rows = [json.loads(line) for line in (mocked_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [4, 8]  # 72 // 16 steps
    for r in rows:
        assert set(r) == set(EPOCH_KEYS)
        assert set(r["skip_weights"]) == {"stage1/block1", "stage2/block1"}
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1 and r["images_per_sec"] > 0
    s = json.loads((mocked_run / "summary.json").read_text())
    for key in ("test_acc", "test_acc_at_best_val", "best_val_acc", "best_val_epoch", "config", "versions",
                "devices", "wall_time_s", "compile_time_s", "first_step_time_s", "images_per_sec", "skip_weights"):
        assert key in s, key
    assert s["test_acc"] == rows[-1]["test_acc"] and s["finished"]
    best = max(rows, key=lambda r: r["val_acc"])
    assert s["test_acc_at_best_val"] == best["test_acc"] and s["best_val_epoch"] == best["epoch"]
    assert {"jax", "flax", "optax", "orbax-checkpoint", "python"} <= set(s["versions"])
    assert s["config"]["dataset"] == "cifar10" and s["config"]["dtype"] == "bfloat16"
    assert s["devices"]["count"] == jax.device_count()
    for png in ("curves.png", "skip_weights.png"):
        assert (mocked_run / png).read_bytes()[:4] == b"\x89PNG"
    assert list((mocked_run / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((mocked_run / "config.json").read_text())["model"] == "tiny"
    assert [p.name for p in (mocked_run / "checkpoints").iterdir()] and [p.name for p in (mocked_run / "best").iterdir()]


def test_eval_only_reproduces_summary(mocked_run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    with tfds_mock(num_examples=96):  # only --workdir (and --data-dir): the run's config comes from the workdir
        assert T.main(["--eval-only", "--workdir", str(mocked_run), "--data-dir", str(mocked_run / "tfds")]) == 0
    result = json.loads((mocked_run / "eval_latest.json").read_text())
    summary = json.loads((mocked_run / "summary.json").read_text())
    assert result["step"] == summary["step"] and result["test_acc"] == summary["test_acc"]
    assert result["val_acc"] == summary["val_acc"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test_acc"] == summary["test_acc"]
    with tfds_mock(num_examples=96):  # no --data-dir: the run's own data location
        assert T.main(["--eval-only", "--eval-from", "best", "--workdir", str(mocked_run)]) == 0
    best = json.loads((mocked_run / "eval_best.json").read_text())
    assert best["step"] == 4 * summary["best_val_epoch"] and best["val_acc"] == summary["best_val_acc"]
    assert best["test_acc"] == summary["test_acc_at_best_val"]


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """2 epochs in A; in B 1 epoch, then the same command with --epochs 2 (constant schedule, so the
    first epoch is the same run), and in C --stop-after-epochs 1 then the plain command (cosine)."""
    flags = TINY + ["--augment", "--schedule", "constant", "--seed", "5"]
    assert T.main(flags + ["--epochs", "2", "--workdir", str(tmp_path / "a")]) == 0
    assert T.main(flags + ["--epochs", "1", "--workdir", str(tmp_path / "b")]) == 0
    assert final_params(tmp_path / "b")[0] == 8
    assert T.main(flags + ["--epochs", "2", "--workdir", str(tmp_path / "b")]) == 0
    step_a, pa = final_params(tmp_path / "a")
    step_b, pb = final_params(tmp_path / "b")
    assert step_a == step_b == 16
    assert_trees_equal(pa, pb)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = (tmp_path / "b" / "summary.json").read_text()
    assert T.main(flags + ["--epochs", "2", "--workdir", str(tmp_path / "b")]) == 0  # finished: nothing to do
    assert (tmp_path / "b" / "summary.json").read_text() == summary and final_params(tmp_path / "b")[0] == 16


def _faulty_train(flags: list[str], wd: Path, **faults: str) -> subprocess.Popen:
    """train.py with faults injected from outside the package (tests/faulty_train.py), in a subprocess."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir, **faults}
    return subprocess.Popen([sys.executable, "tests/faulty_train.py", *flags, "--workdir", str(wd)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_file(proc: subprocess.Popen, path: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {path.name} within {timeout} s"
        time.sleep(0.02)


def _signal_after_step_16(flags: list[str], wd: Path, marker: Path, sig: int) -> tuple[int, str]:
    """Runs train.py holding after it saved step 16 (FAULT_PAUSE) until ``sig`` has reached it; (exit code, stderr)."""
    proc = _faulty_train(flags, wd, FAULT_PAUSE=f"16:{marker}")
    try:
        _wait_for_file(proc, marker)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_sigterm_saves_and_resume_matches(tmp_path: Path) -> None:
    """The run holds after saving step 16 until SIGTERM has reached it (FAULT_PAUSE: no race with the run's
    end), so it stops at exactly step 17 with a checkpoint there; the same command resumes and ends
    bit-equal to an uninterrupted run."""
    flags = TINY + ["--augment", "--schedule", "cosine", "--epochs", "15", "--batch-size", "8",
                    "--max-train", "128", "--seed", "2"]
    wd = tmp_path / "run"
    code, err = _signal_after_step_16(flags, wd, tmp_path / "paused", signal.SIGTERM)
    assert code == 0, err
    assert "received SIGTERM: saved a checkpoint at step 17 " in err and "rerun the same command" in err
    step, _ = final_params(wd)
    assert step == 17
    assert T.main(flags + ["--workdir", str(wd)]) == 0  # the same command resumes and completes
    assert T.main(flags + ["--workdir", str(tmp_path / "ref")]) == 0
    (s1, p1), (s2, p2) = final_params(wd), final_params(tmp_path / "ref")
    assert s1 == s2 == 15 * 16
    assert_trees_equal(p1, p2)


def test_sigint_stops_like_sigterm(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) during training: the first saves a checkpoint at the next step, keeps it (the write in
    progress is finished) and exits 0 with one line, no traceback; a second one, while the stop's save is
    held (FAULT_COMMIT_DELAY), exits at once with code 3."""
    flags = TINY + ["--epochs", "15", "--batch-size", "8", "--max-train", "128"]
    wd, marker = tmp_path / "once", tmp_path / "paused"
    code, err = _signal_after_step_16(flags, wd, marker, signal.SIGINT)
    assert code == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("received SIGINT: saved a checkpoint at step 17 "), err
    assert final_params(wd)[0] == 17 and not list((wd / "checkpoints").glob("*tmp*"))

    wd, seen = tmp_path / "twice", tmp_path / "seen"
    marker.unlink()
    proc = _faulty_train(flags, wd, FAULT_PAUSE=f"16:{marker}", FAULT_COMMIT_DELAY="17:300",
                         FAULT_SIGNAL_SEEN=str(seen))
    try:
        _wait_for_file(proc, marker)
        proc.send_signal(signal.SIGINT)
        _wait_for_file(proc, seen)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3 and "Traceback" not in err, err
    assert "a second SIGINT arrived before the run had stopped" in err.strip().splitlines()[-1], err


def test_non_finite_loss_stops_without_saving(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = T.main(TINY + ["--optimizer", "sgd", "--lr", "1e30", "--epochs", "2", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "non-finite" in err and "step" in err and "last good checkpoint: none" in err
    assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").glob("*"))


def test_step_cadence_and_time_based_checkpoints(tmp_path: Path) -> None:
    """8 steps an epoch, 2 epochs. Rows every 3 steps and at each evaluation (every epoch, by default) and the
    end; checkpoints every 5 steps and at the end. Then --checkpoint-every-minutes (tiny): a checkpoint at
    every row step, the time decided there."""
    flags = TINY + ["--epochs", "2", "--keep-checkpoints", "20"]
    wd = tmp_path / "steps"
    assert T.main(flags + ["--log-every-steps", "3", "--checkpoint-every-steps", "5", "--workdir", str(wd)]) == 0
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in rows] == [(3, 0.375), (6, 0.75), (8, 1), (9, 1.125), (12, 1.5),
                                                       (15, 1.875), (16, 2)]
    assert [r["step"] for r in rows if r["test_acc"] is not None] == [8, 16]
    assert all(r["bad_images"] is None and set(r) == set(EPOCH_KEYS) for r in rows)
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir()) == [5, 10, 15, 16]
    wd = tmp_path / "minutes"
    assert T.main(flags + ["--log-every-steps", "2", "--checkpoint-every", "9", "--checkpoint-every-minutes", "1e-9",
                           "--workdir", str(wd)]) == 0
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir()) == [2, 4, 6, 8, 10, 12, 14, 16]


def test_row_seconds_cover_running_the_steps_not_only_queueing_them(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Dispatch is asynchronous, so the loop can queue an epoch's steps long before they have run. A row's
    epoch_time (and the summary's train time) must last until its steps have run: here each step first runs
    a device computation on the state that takes ``t_slow`` and costs the host nothing to queue."""
    @jax.jit
    def slow(state: T.State) -> T.State:
        a = jnp.full((256, 256), 1e-3, jnp.float32)
        zero = 0 * jax.lax.fori_loop(0, 200, lambda i, a: jnp.tanh(a @ a), a)[0, 0]
        return jax.tree.map(lambda x: x + zero.astype(x.dtype), state)

    class SlowStep(T.CompiledStep):
        def __call__(self, state: T.State, batch: Any) -> tuple[T.State, dict[str, jax.Array]]:
            return super().__call__(slow(state), batch)

    monkeypatch.setattr(T, "CompiledStep", SlowStep)
    assert T.main(TINY + ["--epochs", "2", "--workdir", str(tmp_path)]) == 0  # 8 steps an epoch
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    state = {"w": jnp.ones((64, 64))}
    slow(state)["w"].block_until_ready()
    t_slow = min(_seconds(lambda: slow(state)["w"].block_until_ready()) for _ in range(3))
    assert [r["step"] for r in rows] == [8, 16]
    floor = 0.6 * 8 * t_slow  # most of the device time of an epoch's 8 slow steps; queueing them takes far less
    times = [r["epoch_time"] for r in rows]
    assert min(times) >= floor and summary["train_time_s"] >= 2 * floor, f"epoch_time {times}, t_slow {t_slow}"


def _seconds(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, match", [
    (["--preset", "nope"], "invalid choice"),
    (["--model", "resnet9000"], "invalid choice"),
    (["--optimizer", "rmsprop"], "invalid choice"),
    (["--no-such-flag"], "unrecognized"),
    (["--epochs", "0"], "epochs"),
    (["--lr", "abc"], "--lr"),
    (["--val-split", "1.5"], "val_split"),
])
def test_bad_flags_exit_2(argv: list[str], match: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and match in err and "\n" not in err


@pytest.mark.parametrize("case", ["dataset", "data_dir", "batch_too_big", "unwritable", "other_config"])
def test_bad_input_exit_2_before_compile(case: str, tmp_path: Path, mocked_run: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    argv = {
        "dataset": TINY + ["--dataset", "no_such_dataset_xyz", "--workdir", str(tmp_path)],
        "data_dir": TINY + ["--dataset", "cifar10", "--data-dir", str(tmp_path / "missing"), "--workdir", str(tmp_path)],
        "batch_too_big": TINY + ["--max-train", "16", "--workdir", str(tmp_path)],
        "unwritable": TINY + ["--workdir", str(tmp_path / "file" / "sub")],
        "other_config": ["--model", "resnet20", "--dataset", "cifar10", "--workdir", str(mocked_run)],
    }[case]
    (tmp_path / "file").write_text("not a folder")
    before = {p: p.stat().st_mtime_ns for p in mocked_run.rglob("*") if p.is_file()}
    capsys.readouterr()
    with count_compiles() as n:
        rc = T.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("train.py: error:") and "\n" not in err, err
    assert n[0] == 0, "bad input must be reported before any compile"
    assert before == {p: p.stat().st_mtime_ns for p in mocked_run.rglob("*") if p.is_file()}  # nothing overwritten
    if case == "other_config":
        assert "another config" in err and "model" in err


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    """A truncated .npz and one of random bytes, next to a good one."""
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    np.savez(good, x_train=rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8), y_train=np.arange(64) % 10,
             x_test=rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), y_test=np.arange(16) % 10)
    data = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.npz").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {"truncated": tmp_path / "truncated.npz", "random": tmp_path / "random.npz"}


@pytest.mark.parametrize("case, expected", [
    ("truncated_npz", "train.py: error: cannot read '{truncated}' as .npz, it is truncated or damaged (File is not "
                      "a zip file): copy or write the file again"),
    ("random_npz", "train.py: error: '{random}' is not an .npz file (it does not start with a zip header): pass an "
                   ".npz written by numpy.savez with arrays x_train, y_train, x_test, y_test"),
    ("path_as_dataset", "train.py: error: --dataset '{truncated}' looks like a path: pass the file or folder with "
                        "--data-dir, and the data set's name with --dataset (cifar10, cifar100, npz or a TFDS name) "
                        "(see --help)"),
    ("data_dir_with_digits", "train.py: error: --data-dir '{truncated}' would be ignored by --dataset digits "
                             "(scikit-learn's embedded digits): drop --data-dir, or name the data set it holds with "
                             "--dataset (npz, cifar10, cifar100 or a TFDS name) (see --help)"),
])
def test_careless_input_gets_one_exact_line(case: str, expected: str, tmp_path: Path) -> None:
    """Each careless input: exactly this one line on stderr, exit 2, nothing compiled, no workdir created
    (checked in a subprocess, as a user runs it)."""
    files = _bad_files(tmp_path)
    wd = tmp_path / "run"
    argv = {"truncated_npz": ["--dataset", "npz", "--data-dir", str(files["truncated"])],
            "random_npz": ["--dataset", "npz", "--data-dir", str(files["random"])],
            "path_as_dataset": ["--dataset", str(files["truncated"])],
            "data_dir_with_digits": ["--dataset", "digits", "--data-dir", str(files["truncated"])]}[case]
    out = subprocess.run([sys.executable, "train.py", *argv, "--model", "tiny", "--workdir", str(wd)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr == expected.format(**files) + "\n", out.stderr
    assert not wd.exists()


def test_extending_epochs_under_a_total_step_schedule_warns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flags = TINY + ["--schedule", "cosine", "--workdir", str(tmp_path)]
    assert T.main(flags + ["--epochs", "1"]) == 0
    capsys.readouterr()
    assert T.main(flags + ["--epochs", "2"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--epochs 2 differs from the run's 1" in warnings[0] and "cosine" in warnings[0]
    assert T.main(TINY + ["--schedule", "constant", "--workdir", str(tmp_path / "c"), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert T.main(TINY + ["--schedule", "constant", "--workdir", str(tmp_path / "c"), "--epochs", "2"]) == 0
    assert "warning" not in capsys.readouterr().err  # a constant schedule does not depend on the total


def test_log_in_a_file_has_one_line_per_epoch(tmp_path: Path) -> None:
    """stderr not a terminal (a log file): no progress bar, no carriage returns; one line per epoch and
    a final line that formats both accuracies alike."""
    out = subprocess.run([sys.executable, "train.py", *[f for f in TINY if f != "--quiet"], "--epochs", "2",
                          "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "\r" not in out.stderr, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert [line.split(" step ")[0] for line in lines[:-1]] == ["epoch 1/2", "epoch 2/2"], lines
    assert re.fullmatch(r"final test acc 0\.\d{4} \(at the best-val epoch: 0\.\d{4}\), outputs in .*", lines[-1])


# ----------------------------------------------------------------------------- 8 devices

EIGHT_DEVICES = r"""
import json, jax, jax.numpy as jnp, numpy as np
from adaresnet_jax import train as T
from adaresnet_jax.config import Config
from adaresnet_jax.models import create_model
assert jax.device_count() == 8
model = create_model("tiny", num_classes=10)
tx, _ = T.make_optimizer(Config(optimizer="sgd", lr=0.1), 10)
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8); y = rng.integers(0, 10, 32).astype(np.int32)
out = {}
for n in (1, 8):
    mesh = T.make_mesh(jax.devices()[:n])
    steps = T.make_train_step(model, tx, T.StepOptions(mean=(0.3,), std=(0.2,), crop_pad=2, flip=True), mesh=mesh)
    state = T.create_state(model, tx, (8, 8, 1), seed=0, mesh=mesh)
    losses = []
    for i in range(2):
        state, m = steps.on_batch(state, x, y, jax.random.key(i))
        losses.append(float(m["loss"]))
    out[n] = {"losses": losses, "params": [np.asarray(a).tolist() for a in jax.tree.leaves(state["params"])],
              "stats": [np.asarray(a).tolist() for a in jax.tree.leaves(state["batch_stats"])]}
out["bad_batch_rc"] = T.main(["--dataset", "digits", "--model", "tiny", "--batch-size", "12", "--quiet", "--workdir", WORKDIR])
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path: Path) -> None:
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    code = f"WORKDIR = {str(tmp_path)!r}\n" + EIGHT_DEVICES
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.split("RESULT", 1)[1])
    np.testing.assert_allclose(res["8"]["losses"], res["1"]["losses"], rtol=1e-5)
    for a, b in zip(res["8"]["params"] + res["8"]["stats"], res["1"]["params"] + res["1"]["stats"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert res["bad_batch_rc"] == 2 and "not divisible by the 8 devices" in out.stderr


# ----------------------------------------------------------------------------- the quick preset

@pytest.mark.slow
def test_quick_preset_reaches_90_percent_on_digits(tmp_path: Path) -> None:
    assert T.main(["--preset", "quick", "--workdir", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["config"]["dataset"] == "digits" and s["finished"]
    assert s["test_acc"] >= 0.90, s["test_acc"]


# ----------------------------------------------------------------------------- 2 processes

def readme_two_process_commands() -> tuple[dict[str, str], list[list[str]]]:
    """The environment and the two commands of the README's "Several processes on one machine" block."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"\*\*Several processes on one machine\*\*.*?```bash\n(.*?)```", text, re.S)[1]
    lines = block.strip().splitlines()
    env = dict(kv.split("=", 1) for kv in shlex.split(lines[0].removeprefix("export ")))
    return env, [shlex.split(line.rstrip(" &")) for line in lines[1:]]


@pytest.mark.slow
def test_readme_two_process_command_under_load(tmp_path: Path) -> None:
    """The README's two-process commands as written, with a free port, a temporary workdir, 2 epochs, the
    tiny model and SGD, while two busy loops keep both cores busy: both finish, and their metrics equal one
    process with the same 4 devices. Tiny and SGD, because only there float32 round-off stays round-off:
    the README's ResNet-20 with Adam (and even with SGD) amplifies the round-off of another all-reduce
    order, or of another CPU's instruction set on one device, into several points of epoch-1 accuracy.
    The latest and best checkpoints save the same steps here, the case that used to hang on a shared
    barrier."""
    env, cmds = readme_two_process_commands()
    assert env["JAX_NUM_CPU_DEVICES"] == "2" and [c[:2] for c in cmds] == [["python", "train.py"]] * 2
    port, wd = free_port(), tmp_path / "multi"
    sgd = ["--epochs", "2", "--model", "tiny", "--width", "4", "--optimizer", "sgd", "--lr", "0.05"]
    cmds = [[sys.executable, *c[1:], *sgd] for c in cmds]
    for c in cmds:
        c[c.index("--workdir") + 1], c[c.index("--coordinator") + 1] = str(wd), f"127.0.0.1:{port}"
    env = {**os.environ, **env, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    load = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]
    try:
        run_processes(cmds, cwd=REPO, env=env, timeout=600)
    finally:
        for p in load:
            p.kill()
            p.wait()
    single = tmp_path / "single"
    out = subprocess.run([sys.executable, "train.py", "--preset", "quick", *sgd, "--workdir", str(single)],
                         cwd=REPO, env={**env, "JAX_NUM_CPU_DEVICES": "4"}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    multi, one = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (wd, single))
    assert [r["epoch"] for r in multi] == [r["epoch"] for r in one] == [1, 2]
    for m, o in zip(multi, one):
        for key in ("train_loss", "val_loss", "test_loss"):
            assert m[key] == pytest.approx(o[key], rel=1e-4), (key, m, o)
        assert abs(m["test_acc"] - o["test_acc"]) <= 0.01 and abs(m["val_acc"] - o["val_acc"]) <= 0.01, (m, o)
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["devices"]["processes"] == 2 and summary["devices"]["count"] == 4
    assert sorted(p.name for p in (wd / "best").iterdir() if p.name.isdigit())  # both managers saved


def test_package_metadata_builds_without_deprecation_warnings(tmp_path: Path) -> None:
    """pyproject.toml in today's form (an SPDX licence string): setuptools builds its metadata without a
    SetuptoolsDeprecationWarning, so `make setup` prints none."""
    code = ("import sys, warnings\nfrom setuptools import build_meta\n"
            "from setuptools.warnings import SetuptoolsDeprecationWarning\n"
            "warnings.simplefilter('error', SetuptoolsDeprecationWarning)\n"
            f"build_meta.prepare_metadata_for_build_wheel({str(tmp_path)!r})\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(tmp_path.glob("adaresnet_jax-*.dist-info"))


def test_last_partial_batch_is_trained_like_keras_fit(tmp_path: Path) -> None:
    """--no-drop-last (preset paper, as Keras' fit): 100 images at batch 32 make 3 full batches and one of
    4 every epoch; each epoch's permutation covers every image once; resume inside an epoch is exact."""
    mesh = T.make_mesh()
    full = T.make_epoch_permutation(7, 100, 32, mesh)(3)
    tail = T.make_epoch_tail(7, 100, 32, mesh)(3)
    assert full.shape == (3, 32) and tail.shape == (4,)
    assert sorted(np.concatenate([np.asarray(full).ravel(), np.asarray(tail)]).tolist()) == list(range(100))
    assert T.make_epoch_tail(7, 96, 32, mesh)(0) is None and T.make_epoch_tail(7, 101, 32, mesh, multiple=2)(0).shape == (4,)
    base = [f for f in TINY if f not in ("256", "--max-train")] + ["--max-train", "100", "--schedule", "constant",
                                                                   "--augment"]
    flags = base + ["--no-drop-last"]
    assert T.main(flags + ["--epochs", "2", "--workdir", str(tmp_path / "a")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8]
    assert T.main(flags + ["--epochs", "2", "--stop-after-steps", "6", "--workdir", str(tmp_path / "b")]) == 0
    assert final_params(tmp_path / "b")[0] == 6
    assert T.main(flags + ["--epochs", "2", "--workdir", str(tmp_path / "b")]) == 0
    assert_trees_equal(final_params(tmp_path / "a")[1], final_params(tmp_path / "b")[1])
    assert T.main(base + ["--epochs", "2", "--workdir", str(tmp_path / "dropped")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "dropped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]  # the default drops the 4 left over
