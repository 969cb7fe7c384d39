"""Training runs: ``run(config)`` / ``main(argv)`` (the logic behind the top-level ``train.py``).

A run loads the data set once on the host, puts the uint8 training set on every device, and trains
with the step of :mod:`adaresnet_jax.steps` (re-exported here: ``make_mesh``, ``create_state``,
``make_train_step``, ``make_eval_step``, ...) with no per-step host work: each epoch's permutation is
computed on device and every step gathers its batch inside the compiled update. Metrics are fetched
once per epoch (the progress bar reads the previous step's loss). Outputs, checkpoints and resume:
see :mod:`adaresnet_jax.metrics` and :mod:`adaresnet_jax.checkpoint`.

Exit codes of ``main``: 0 finished (or stopped by SIGTERM after saving a checkpoint), 1 the loss
became non-finite (nothing saved from the bad state), 2 bad input (one line on stderr, before any
compile) or a workdir whose every checkpoint is corrupt (each is reported, by path, on its own
warning line and moved to ``<workdir>/corrupt_checkpoints/``; a corrupt newest step is skipped for
the previous good one). A run killed at any point (SIGKILL, preemption) resumes from its newest
complete checkpoint when the same command is rerun; a checkpoint saved on another device count is
restored onto the current devices, and the run says so.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adaresnet_jax import checkpoint as ckpt_lib
from adaresnet_jax.config import RESUME_SAFE_FIELDS, Config, parse_config
from adaresnet_jax.data import DataError, Dataset, load_dataset
from adaresnet_jax.metrics import RunLog, skip_values
from adaresnet_jax.models import create_model, skip_weights
from adaresnet_jax.optim import decay_mask, make_optimizer, make_schedule, skip_mask  # noqa: F401 (re-exported)
from adaresnet_jax.steps import (  # noqa: F401 (re-exported)
    Evaluator, State, TrainStep, abstract_state, create_state, make_epoch_permutation, make_eval_step, make_mesh,
    make_train_step, replicate, shard_batch)


class UsageError(ValueError):
    """Bad input found before any compile: main() prints it on one line and exits with code 2."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/Inf: main() prints it and exits with code 1."""


# ----------------------------------------------------------------------------- the run

def _init_distributed(cfg: Config) -> None:
    """jax.distributed.initialize from --coordinator/--num-processes/--process-id, else from the
    environment variables JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, or with
    auto-detection (TPU pods, SLURM) under --distributed. Nothing when none is given."""
    import os

    coord = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    nproc = cfg.num_processes or (int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None)
    pid = cfg.process_id if cfg.process_id is not None else (
        int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    if coord or nproc or pid is not None or cfg.distributed:
        if not jax.distributed.is_initialized():
            explicit = coord is not None and nproc is not None and pid is not None
            jax.distributed.initialize(coordinator_address=coord, num_processes=nproc, process_id=pid,
                                       cluster_detection_method="deactivate" if explicit else None)


def _prepare_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"workdir '{workdir}' is not writable ({e.strerror or e}): pass a writable --workdir") from None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class _Stop:
    """SIGTERM sets a flag; the loop finishes the current step, checkpoints and exits cleanly."""

    def __init__(self) -> None:
        self.requested, self._old = False, None

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _load(cfg: Config) -> Dataset:
    try:
        return load_dataset(cfg.dataset, cfg.data_dir, val_split=cfg.val_split, seed=cfg.seed,
                            max_train=cfg.max_train, max_test=cfg.max_test)
    except DataError as e:
        raise UsageError(str(e)) from None


def run(cfg: Config) -> dict[str, Any]:
    """Trains (or with ``eval_only`` evaluates) as ``cfg`` says; returns the summary dict.

    Raises UsageError for bad input (before any compile) and NonFiniteLoss when training diverges.
    """
    wall0 = time.perf_counter()
    _init_distributed(cfg)
    workdir = Path(cfg.workdir)
    if cfg.eval_only and (saved := ckpt_lib.load_config(workdir)) is not None:
        # --eval-only uses the run's own config; only the harmless flags come from the command line.
        cfg = dataclasses.replace(Config.from_dict(saved),
                                  **{k: getattr(cfg, k) for k in RESUME_SAFE_FIELDS})
    if cfg.eval_only and not any((workdir / "checkpoints").glob("[0-9]*")):
        raise UsageError(f"--eval-only: workdir '{workdir}' has no checkpoints")
    _prepare_workdir(workdir)
    try:
        resuming = ckpt_lib.check_workdir(workdir, cfg)
    except ckpt_lib.IncompatibleWorkdir as e:
        raise UsageError(str(e)) from None
    if not resuming and any((workdir / "checkpoints").glob("[0-9]*")):
        raise UsageError(f"workdir '{workdir}' holds checkpoints but no config.json: use another --workdir")
    ds = _load(cfg)
    n_dev, bs = jax.device_count(), cfg.batch_size
    if bs % n_dev:
        raise UsageError(f"batch_size {bs} is not divisible by the {n_dev} devices: use a multiple of {n_dev}")
    if bs > len(ds.x_train):
        raise UsageError(f"batch_size {bs} exceeds the {len(ds.x_train)} training images: lower --batch-size")

    proc0 = jax.process_index() == 0
    mesh = make_mesh()
    spe = len(ds.x_train) // bs
    model = create_model(cfg.model, num_classes=ds.num_classes, skip=cfg.skip, **cfg.model_overrides())
    tx, schedule = make_optimizer(cfg, spe)
    channels = ds.image_shape[-1]
    mean, std = (ds.mean, ds.std) if cfg.normalize else ((0.0,) * channels, (1.0,) * channels)
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    round_up = lambda n: -(-max(n, 1) // n_dev) * n_dev  # noqa: E731
    eval_bs = min(round_up(cfg.eval_batch_size), round_up(max(len(ds.x_val), len(ds.x_test))))

    abstract = abstract_state(model, tx, ds.image_shape, mesh=mesh)
    with_best = cfg.val_split > 0 and (not cfg.eval_only or (workdir / "best").is_dir())
    ckpts = ckpt_lib.Checkpoints(workdir, keep=cfg.keep_checkpoints, with_best=with_best, read_only=cfg.eval_only)
    eval_step = make_eval_step(model, mesh=mesh, mean=mean, std=std, dtype=dtype)
    evaluator = Evaluator(eval_step, {"val": (ds.x_val, ds.y_val), "test": (ds.x_test, ds.y_test)}, eval_bs, mesh)
    try:
        if cfg.eval_only:
            return _eval_only(cfg, ckpts, abstract, evaluator, workdir, proc0)
        try:
            restored = ckpts.restore_latest(abstract)
        except ckpt_lib.NoGoodCheckpoint as e:
            raise UsageError(str(e)) from None
        if restored is not None:
            start_step, state, saved_on = restored
            n, procs, n_procs = saved_on.get("devices", n_dev), saved_on.get("processes", 1), jax.process_count()
            if proc0 and (n, procs) != (n_dev, n_procs):  # orbax re-shards onto the current mesh
                print(f"train.py: restored a checkpoint saved on {n} device{'s' * (n != 1)}"
                      f"{f' in {procs} processes' if procs != 1 else ''} onto {n_dev} device{'s' * (n_dev != 1)}"
                      f"{f' in {n_procs} processes' if n_procs != 1 else ''} (step {start_step})",
                      file=sys.stderr, flush=True)
        else:
            start_step, state = 0, create_state(model, tx, ds.image_shape, seed=cfg.seed, mesh=mesh)
        ckpt_lib.write_config(workdir, cfg)
        return _train(cfg, ds, model, state, tx, schedule, ckpts, evaluator, mesh, start_step, wall0,
                      mean=mean, std=std, dtype=dtype, proc0=proc0)
    finally:
        ckpts.close()


def _eval_only(cfg: Config, ckpts: ckpt_lib.Checkpoints, abstract: State, evaluator: Evaluator,
               workdir: Path, proc0: bool) -> dict[str, Any]:
    try:
        step, state = ckpts.restore(abstract, which=cfg.eval_from)
    except FileNotFoundError:
        raise UsageError(f"--eval-only: workdir '{workdir}' has no {cfg.eval_from} checkpoint") from None
    except ckpt_lib.CorruptCheckpoint as e:
        raise UsageError(f"--eval-only: corrupt {cfg.eval_from} checkpoint {e}") from None
    result = {"checkpoint": cfg.eval_from, "step": int(step), **evaluator(state),
              "skip_weights": skip_values(jax.device_get(skip_weights(state["params"])))}
    if proc0:
        (workdir / f"eval_{cfg.eval_from}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
    return result


def _train(cfg: Config, ds: Dataset, model: Any, state: State, tx: Any, schedule: Any,
           ckpts: ckpt_lib.Checkpoints, evaluator: Evaluator, mesh: Any, start_step: int, wall0: float,
           *, mean: Any, std: Any, dtype: Any, proc0: bool) -> dict[str, Any]:
    from tqdm import tqdm

    bs = cfg.batch_size
    spe = len(ds.x_train) // bs
    end_epoch = min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs)
    first_epoch = start_step // spe
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if proc0 else (lambda msg: None)
    if first_epoch >= end_epoch:  # rerun of a finished command: keep its outputs as they are
        say(f"nothing to do: {cfg.workdir} already holds step {start_step} (epoch {first_epoch}); "
            "raise --epochs to train on")
        path = Path(cfg.workdir) / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {"step": start_step}
    log = RunLog(Path(cfg.workdir), enabled=proc0, resume_epoch=first_epoch)
    x_all, y_all = replicate(ds.x_train, mesh), replicate(ds.y_train.astype(np.int32), mesh)
    steps = make_train_step(model, tx, mesh=mesh, mean=mean, std=std, crop_pad=cfg.crop_pad if cfg.augment else 0,
                            flip=cfg.augment and cfg.flip, label_smoothing=cfg.label_smoothing, dtype=dtype,
                            seed=cfg.seed)
    epoch_perm = make_epoch_permutation(cfg.seed, len(ds.x_train), bs, mesh)

    t0 = time.perf_counter()  # ahead-of-time compile, so no step below is timed with its compile
    perm = epoch_perm(first_epoch)
    step_fn = steps.on_dataset.lower(state, x_all, y_all, perm).compile()
    evaluator.compile(state)
    compile_time = time.perf_counter() - t0
    best_val = ckpts.best_val_acc()
    host_step, first_step_time, train_time, images = start_step, None, 0.0, 0
    if start_step:
        say(f"resumed from step {start_step} (epoch {first_epoch + 1}, step {start_step - first_epoch * spe} of {spe})")

    with _Stop() as stop:
        for epoch in range(first_epoch, end_epoch):
            if epoch != first_epoch:
                perm = epoch_perm(epoch)
            begin = host_step - epoch * spe
            bar = tqdm(total=spe, initial=begin, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                       disable=cfg.quiet or not proc0, leave=False, file=sys.stderr)
            mets, t_ep, t_show = [], time.perf_counter(), 0.0
            for i in range(begin, spe):
                state, m = step_fn(state, x_all, y_all, perm)
                mets.append(m)
                host_step += 1
                if first_step_time is None:
                    jax.block_until_ready(m)
                    first_step_time = time.perf_counter() - t_ep
                if not bar.disable and len(mets) > 1 and time.perf_counter() - t_show > 0.25:
                    t_show = time.perf_counter()  # the previous step's loss: the host never waits on this one
                    rate = (len(mets) - 1) * bs / (t_show - t_ep)
                    bar.set_postfix(loss=f"{float(mets[-2]['loss']):.4f}", img_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
                if stop.requested:
                    break
            bar.close()
            hist = jax.device_get(jax.tree.map(lambda *a: jnp.stack(a), *mets))  # the epoch's one fetch
            ep_time = time.perf_counter() - t_ep
            train_time, images = train_time + ep_time, images + len(mets) * bs
            if not hist["finite"].all():
                bad = host_step - len(mets) + 1 + int(np.argmin(hist["finite"]))
                last = ckpts.latest_step()
                where = f"step {last} in {Path(cfg.workdir) / 'checkpoints'}" if last is not None else "none"
                raise NonFiniteLoss(f"non-finite loss or update at step {bad} (epoch {epoch + 1}); the state was "
                                    f"not saved; last good checkpoint: {where} (lower --lr or set --grad-clip)")
            if stop.requested and host_step < (epoch + 1) * spe:
                ckpts.save(host_step, state)
                ckpts.wait()
                say(f"received SIGTERM: saved a checkpoint at step {host_step} (epoch {epoch + 1}, mid-epoch) "
                    f"in {cfg.workdir}; rerun the same command to resume")
                log.close()
                return {"interrupted": True, "step": host_step}
            row = {"epoch": epoch + 1, "step": host_step, "train_loss": float(hist["loss"].mean()),
                   "train_acc": float(hist["correct"].sum()) / (len(mets) * bs), "val_loss": None, "val_acc": None,
                   **evaluator(state), "lr": float(schedule(host_step - 1)),
                   "images_per_sec": len(mets) * bs / ep_time, "epoch_time": ep_time,
                   "skip_weights": skip_values(jax.device_get(skip_weights(state["params"])))}
            log.epoch(row)
            done = epoch + 1 == end_epoch
            if (epoch + 1) % cfg.checkpoint_every == 0 or done or stop.requested:  # never a diverged state
                ckpts.save(host_step, state)
            if row["val_acc"] is not None and (best_val is None or row["val_acc"] > best_val):
                best_val = row["val_acc"]
                ckpts.save_best(host_step, state, best_val)
            msg = (f"epoch {epoch + 1}/{cfg.epochs} step {host_step}: train loss {row['train_loss']:.4f} "
                   f"acc {row['train_acc']:.4f}" + (f", val acc {row['val_acc']:.4f}" if row["val_acc"] is not None
                                                     else "") + f", test acc {row['test_acc']:.4f}, "
                   f"{row['images_per_sec']:.0f} img/s, {ep_time:.1f}s")
            say(msg)
            if stop.requested and not done:
                ckpts.wait()
                say(f"received SIGTERM: saved a checkpoint at step {host_step} (end of epoch {epoch + 1}) in "
                    f"{cfg.workdir}; rerun the same command to resume")
                log.close()
                return {"interrupted": True, "step": host_step}
    ckpts.wait()
    log.close()
    summary = _summary(cfg, log.rows(), state, wall0=wall0, compile_time=compile_time,
                       first_step_time=first_step_time, train_time=train_time, images=images, end_epoch=end_epoch)
    log.summary(summary)
    log.plots()
    say(f"final test acc {summary['test_acc']:.4f} (at the best-val epoch: {summary['test_acc_at_best_val']}), "
        f"outputs in {cfg.workdir}")
    return summary


def _summary(cfg: Config, rows: list[dict[str, Any]], state: State, *, wall0: float, compile_time: float,
             first_step_time: float | None, train_time: float, images: int, end_epoch: int) -> dict[str, Any]:
    final = rows[-1] if rows else {}
    with_val = [r for r in rows if r.get("val_acc") is not None]
    best = max(with_val, key=lambda r: r["val_acc"]) if with_val else None  # first epoch of the max
    devices = jax.devices()
    return {
        "test_acc": final.get("test_acc"), "test_loss": final.get("test_loss"), "val_acc": final.get("val_acc"),
        "epoch": final.get("epoch"), "step": final.get("step"), "finished": end_epoch == cfg.epochs,
        "test_acc_at_best_val": best["test_acc"] if best else None,
        "best_val_acc": best["val_acc"] if best else None, "best_val_epoch": best["epoch"] if best else None,
        "skip_weights": skip_values(jax.device_get(skip_weights(state["params"]))),
        "num_params": int(sum(np.size(a) for a in jax.tree.leaves(state["params"]))),
        "wall_time_s": time.perf_counter() - wall0, "compile_time_s": compile_time,
        "first_step_time_s": first_step_time, "train_time_s": train_time,
        "images_per_sec": images / train_time if train_time else None,
        "devices": {"count": len(devices), "processes": jax.process_count(), "platform": devices[0].platform,
                    "kind": devices[0].device_kind},
        "versions": _versions(), "config": dataclasses.asdict(cfg),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry: 0 done (or stopped by SIGTERM with a checkpoint), 1 diverged, 2 bad input."""
    cfg = parse_config(argv)
    try:
        run(cfg)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 0
