"""Training runs: ``run(config)`` / ``main(argv)`` (the logic behind the top-level ``train.py``).

A run loads the data set once on the host, puts the uint8 training set on every device, and trains
with the step of :mod:`adaresnet_jax.steps` (re-exported here: ``make_mesh``, ``create_state``,
``make_train_step``, ``make_eval_step``, ...) with no per-step host work: each epoch's permutation is
computed on device and every step gathers its batch inside the compiled update. Metrics are fetched
once per epoch (the progress bar reads the previous step's loss). Outputs, checkpoints and resume:
see :mod:`adaresnet_jax.metrics` and :mod:`adaresnet_jax.checkpoint`.

Exit codes of ``main``: 0 finished (or stopped by SIGTERM after saving a checkpoint), 1 the loss
became non-finite (nothing saved from the bad state) or a multi-process run failed, 2 bad input (one
line on stderr, before any compile and before the workdir is touched) or a workdir whose every
checkpoint is corrupt (each is reported, by path, on its own
warning line and moved to ``<workdir>/corrupt_checkpoints/``; a corrupt newest step is skipped for
the previous good one). A run killed at any point (SIGKILL, preemption) resumes from its newest
complete checkpoint when the same command is rerun; a checkpoint saved on another device count is
restored onto the current devices, and the run says so. 3: the run had not stopped within
--stop-timeout seconds of a SIGTERM, or a second SIGTERM came (see :mod:`adaresnet_jax.stopping`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adaresnet_jax import checkpoint as ckpt_lib
from adaresnet_jax.config import RESUME_SAFE_FIELDS, TOTAL_STEP_SCHEDULES, Config, parse_config
from adaresnet_jax.data import DataError, Dataset, fetch, load_dataset
from adaresnet_jax.metrics import RunLog, skip_values
from adaresnet_jax.models import create_model, skip_weights
from adaresnet_jax.optim import decay_mask, make_optimizer, make_schedule, skip_mask  # noqa: F401 (re-exported)
from adaresnet_jax.steps import (  # noqa: F401 (re-exported)
    Evaluator, State, TrainStep, abstract_state, create_state, make_epoch_permutation, make_epoch_tail,
    make_eval_step, make_mesh, make_train_step, replicate, shard_batch)
from adaresnet_jax.stopping import StopOnSigterm


class UsageError(ValueError):
    """Bad input found before any compile: main() prints it on one line and exits with code 2."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/Inf: main() prints it and exits with code 1."""


# ----------------------------------------------------------------------------- the run

def _init_distributed(cfg: Config) -> None:
    """jax.distributed.initialize from --coordinator/--num-processes/--process-id, else from the
    environment variables JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, or with
    auto-detection (TPU pods, SLURM) under --distributed. Nothing when none is given. A process that
    misses heartbeats for --heartbeat-timeout seconds is declared dead and every process exits."""
    coord = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    nproc = cfg.num_processes or (int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None)
    pid = cfg.process_id if cfg.process_id is not None else (
        int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    if coord or nproc or pid is not None or cfg.distributed:
        if not jax.distributed.is_initialized():
            explicit = coord is not None and nproc is not None and pid is not None
            jax.distributed.initialize(coordinator_address=coord, num_processes=nproc, process_id=pid,
                                       cluster_detection_method="deactivate" if explicit else None,
                                       heartbeat_timeout_seconds=cfg.heartbeat_timeout)


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


def _load(cfg: Config) -> Dataset:
    """The data set; in a multi-host run with a download, process 0 downloads before the others read it."""
    try:
        if cfg.dataset in ("cifar10", "cifar100") and cfg.data_dir is None and jax.process_count() > 1:
            if jax.process_index() == 0:
                fetch(cfg.dataset)
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("adaresnet_download")
        return load_dataset(cfg.dataset, cfg.data_dir, val_split=cfg.val_split, seed=cfg.seed,
                            max_train=cfg.max_train, max_test=cfg.max_test)
    except DataError as e:
        raise UsageError(str(e)) from None


def run(cfg: Config) -> dict[str, Any]:
    """Trains (or with ``eval_only`` evaluates) as ``cfg`` says; returns the summary dict.

    Raises UsageError for bad input (before any compile, and before anything in the workdir is created
    or changed) and NonFiniteLoss when training diverges.
    """
    wall0 = time.perf_counter()
    _init_distributed(cfg)
    workdir = Path(cfg.workdir)
    saved = ckpt_lib.load_config(workdir)
    if cfg.eval_only and saved is not None:
        # --eval-only uses the run's own config; only the harmless flags come from the command line.
        cfg = dataclasses.replace(Config.from_dict(saved), **{k: getattr(cfg, k) for k in RESUME_SAFE_FIELDS})
    if cfg.eval_only and not any((workdir / "checkpoints").glob("[0-9]*")):
        raise UsageError(f"--eval-only: workdir '{workdir}' has no checkpoints")
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
    _prepare_workdir(workdir)
    proc0 = jax.process_index() == 0
    if resuming and not cfg.eval_only and saved.get("epochs") != cfg.epochs and cfg.schedule in TOTAL_STEP_SCHEDULES:
        _say(proc0, f"train.py: warning: --epochs {cfg.epochs} differs from the run's {saved.get('epochs')}: "
             f"the {cfg.schedule} schedule is recomputed over the new total, so the resumed steps follow a "
             "different learning-rate curve than an uninterrupted run would")

    mesh = make_mesh()
    spe = _steps_per_epoch(cfg, len(ds.x_train), n_dev)
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
            if (n, procs) != (n_dev, n_procs):  # orbax re-shards onto the current mesh
                _say(proc0, f"train.py: restored a checkpoint saved on {n} device{'s' * (n != 1)}"
                     f"{f' in {procs} processes' if procs != 1 else ''} onto {n_dev} device{'s' * (n_dev != 1)}"
                     f"{f' in {n_procs} processes' if n_procs != 1 else ''} (step {start_step})")
        else:
            start_step, state = 0, create_state(model, tx, ds.image_shape, seed=cfg.seed, mesh=mesh)
            if proc0:  # the initial skip weights: the trajectories' epoch 0 (summary.json "skip_weights_init")
                init = skip_values(jax.device_get(skip_weights(state["params"])))
                (workdir / "skip_weights_init.json").write_text(json.dumps(init) + "\n")
        ckpt_lib.write_config(workdir, cfg)
        ctx = _Context(cfg, ds, model, tx, schedule, ckpts, evaluator, mesh, spe, mean, std, dtype, proc0)
        return _train(ctx, state, start_step, wall0)
    finally:
        ckpts.close()


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def _steps_per_epoch(cfg: Config, n: int, n_dev: int) -> int:
    """Full batches per epoch, plus one for the last partial batch with --no-drop-last (cut to a multiple
    of the device count; none if that leaves nothing)."""
    return n // cfg.batch_size + (0 if cfg.drop_last or n % cfg.batch_size < n_dev else 1)


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


@dataclasses.dataclass(frozen=True)
class _Context:
    """What the training loop needs besides the state (built once by :func:`run`)."""

    cfg: Config
    ds: Dataset
    model: Any
    tx: Any
    schedule: Any
    ckpts: ckpt_lib.Checkpoints
    evaluator: Evaluator
    mesh: Any
    spe: int
    mean: Any
    std: Any
    dtype: Any
    proc0: bool


def _train(c: _Context, state: State, start_step: int, wall0: float) -> dict[str, Any]:
    """The training loop: one flat loop over global steps; epochs end with evaluation, a log line and
    (every --checkpoint-every epochs) a checkpoint. SIGTERM ends it at one common step on every process
    with a checkpoint (see :mod:`adaresnet_jax.stopping`)."""
    from tqdm import tqdm

    cfg, spe, bs = c.cfg, c.spe, c.cfg.batch_size
    full = len(c.ds.x_train) // bs  # full batches per epoch; spe is full + 1 with a partial last batch
    end_epoch = min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs)
    end_step, first_epoch = end_epoch * spe, start_step // spe
    say = lambda msg: _say(c.proc0, msg)  # noqa: E731
    if start_step >= end_step:  # rerun of a finished command: keep its outputs as they are
        say(f"nothing to do: {cfg.workdir} already holds step {start_step} (epoch {first_epoch}); "
            "raise --epochs to train on")
        path = Path(cfg.workdir) / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {"step": start_step}
    log = RunLog(Path(cfg.workdir), enabled=c.proc0, resume_epoch=first_epoch)
    x_all, y_all = replicate(c.ds.x_train, c.mesh), replicate(c.ds.y_train.astype(np.int32), c.mesh)
    steps = make_train_step(c.model, c.tx, mesh=c.mesh, mean=c.mean, std=c.std,
                            crop_pad=cfg.crop_pad if cfg.augment else 0, flip=cfg.augment and cfg.flip,
                            label_smoothing=cfg.label_smoothing, dtype=c.dtype, seed=cfg.seed, steps_per_epoch=spe)
    epoch_perm = make_epoch_permutation(cfg.seed, len(c.ds.x_train), bs, c.mesh)
    epoch_tail = make_epoch_tail(cfg.seed, len(c.ds.x_train), bs, c.mesh, multiple=jax.device_count())

    t0 = time.perf_counter()  # ahead-of-time compile, so no step below is timed with its compile
    perm, tail = epoch_perm(first_epoch), epoch_tail(first_epoch) if spe > full else None
    step_fn = steps.on_dataset.lower(state, x_all, y_all, perm).compile()
    tail_fn = steps.on_indices.lower(state, x_all, y_all, tail).compile() if tail is not None else None
    c.evaluator.compile(state)
    compile_time = time.perf_counter() - t0
    best_val = c.ckpts.best_val_acc()
    if start_step:
        say(f"resumed from step {start_step} (epoch {first_epoch + 1}, step {start_step - first_epoch * spe} of {spe})")
    bar_off = cfg.quiet or not c.proc0 or not sys.stderr.isatty()  # a log file gets one line per epoch
    step, mets, first_step_time, train_time, images, bar = start_step, [], None, 0.0, 0, None
    t_ep = time.perf_counter()

    with StopOnSigterm(cfg.stop_timeout) as stop:
        while step < end_step:
            epoch, i = divmod(step, spe)
            if i == 0 and step != start_step:
                perm, tail = epoch_perm(epoch), epoch_tail(epoch) if tail_fn else None
            if bar is None:
                bar = tqdm(total=spe, initial=i, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                           disable=bar_off, leave=False, file=sys.stderr)
            state, m = tail_fn(state, x_all, y_all, tail) if i == full else step_fn(state, x_all, y_all, perm)
            mets.append((m, bs if i < full else int(tail.shape[0])))
            step += 1
            if first_step_time is None:
                jax.block_until_ready(m)
                first_step_time = time.perf_counter() - t_ep
            if not bar.disable and len(mets) > 1:  # the previous step's loss: the host never waits on this one
                bar.set_postfix(loss=f"{float(mets[-2][0]['loss']):.4f}", refresh=False)
            bar.update(1)
            stopping = stop.should_stop(step)
            if step % spe and not stopping:
                continue
            # the end of an epoch, or a stop: fetch the metrics (the epoch's one host sync), save
            bar.close()
            hist = jax.device_get([m for m, _ in mets])
            bar, ep_time = None, time.perf_counter() - t_ep
            n_img = sum(n for _, n in mets)
            train_time, images = train_time + ep_time, images + n_img
            if not all(h["finite"] for h in hist):
                bad = step - len(mets) + 1 + [bool(h["finite"]) for h in hist].index(False)
                last = c.ckpts.latest_step()
                where = f"step {last} in {Path(cfg.workdir) / 'checkpoints'}" if last is not None else "none"
                raise NonFiniteLoss(f"non-finite loss or update at step {bad} (epoch {epoch + 1}); the state was "
                                    f"not saved; last good checkpoint: {where} (lower --lr or set --grad-clip)")
            if step % spe == 0:
                row = _epoch_row(c, state, epoch, step, hist, mets, n_img, ep_time)
                log.epoch(row)
                if (epoch + 1) % cfg.checkpoint_every == 0 or step == end_step or stopping:
                    c.ckpts.save(step, state)  # never a diverged state: checked above
                if row["val_acc"] is not None and (best_val is None or row["val_acc"] > best_val):
                    best_val = row["val_acc"]
                    c.ckpts.save_best(step, state, best_val)
                say(_epoch_line(cfg, row))
            elif stopping:
                c.ckpts.save(step, state)
            if stopping and step < end_step:
                c.ckpts.wait()
                where = f"end of epoch {epoch + 1}" if step % spe == 0 else f"epoch {epoch + 1}, mid-epoch"
                who = f"process {jax.process_index()} of {jax.process_count()}: " if jax.process_count() > 1 else ""
                _say(True, f"{who}received SIGTERM: saved a checkpoint at step {step} ({where}) in {cfg.workdir}; "
                     "rerun the same command to resume")
                log.close()
                return {"interrupted": True, "step": step}
            mets, t_ep = [], time.perf_counter()
        c.ckpts.wait()
    log.close()
    summary = _summary(cfg, log.rows(), state, wall0=wall0, compile_time=compile_time,
                       first_step_time=first_step_time, train_time=train_time, images=images, end_epoch=end_epoch)
    log.summary(summary)
    log.plots()
    at_best = summary["test_acc_at_best_val"]
    say(f"final test acc {summary['test_acc']:.4f} (at the best-val epoch: "
        f"{'n/a, no validation split' if at_best is None else f'{at_best:.4f}'}), outputs in {cfg.workdir}")
    return summary


def _epoch_row(c: _Context, state: State, epoch: int, step: int, hist: list[dict[str, Any]],
               mets: list[tuple[Any, int]], n_img: int, ep_time: float) -> dict[str, Any]:
    """One metrics.jsonl row: train loss (weighted by batch size) and accuracy, evaluation, lr, skip weights."""
    loss = sum(float(h["loss"]) * n for h, (_, n) in zip(hist, mets)) / n_img
    return {"epoch": epoch + 1, "step": step, "train_loss": loss,
            "train_acc": sum(int(h["correct"]) for h in hist) / n_img, "val_loss": None, "val_acc": None,
            **c.evaluator(state), "lr": float(c.schedule(step - 1)), "images_per_sec": n_img / ep_time,
            "epoch_time": ep_time, "skip_weights": skip_values(jax.device_get(skip_weights(state["params"])))}


def _epoch_line(cfg: Config, row: dict[str, Any]) -> str:
    val = f", val acc {row['val_acc']:.4f}" if row["val_acc"] is not None else ""
    return (f"epoch {row['epoch']}/{cfg.epochs} step {row['step']}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}{val}, test acc {row['test_acc']:.4f}, "
            f"{row['images_per_sec']:.0f} img/s, {row['epoch_time']:.1f}s")


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
        "skip_weights_init": json.loads(init.read_text()) if (init := Path(cfg.workdir) / "skip_weights_init.json").exists()
        else None,
        "num_params": int(sum(np.size(a) for a in jax.tree.leaves(state["params"]))),
        "wall_time_s": time.perf_counter() - wall0, "compile_time_s": compile_time,
        "first_step_time_s": first_step_time, "train_time_s": train_time,
        "images_per_sec": images / train_time if train_time else None,
        "devices": {"count": len(devices), "processes": jax.process_count(), "platform": devices[0].platform,
                    "kind": devices[0].device_kind},
        "versions": _versions(), "config": dataclasses.asdict(cfg),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry: 0 done (or stopped by SIGTERM with a checkpoint), 1 diverged or failed,
    2 bad input, 3 no clean stop within --stop-timeout of SIGTERM.

    In a multi-process run every failure ends the process at once with ``os._exit`` after its message:
    a normal exit would wait at jax.distributed's shutdown barrier for peers that may be stuck in a
    collective with it; the coordination service then ends the other processes within
    --heartbeat-timeout seconds.
    """
    cfg = parse_config(argv)
    try:
        run(cfg)
        return 0
    except UsageError as e:
        code, msg = 2, str(e)
    except NonFiniteLoss as e:
        code, msg = 1, str(e)
    except Exception as e:  # noqa: BLE001
        if jax.process_count() == 1:
            raise
        traceback.print_exc()
        code, msg = 1, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    print(f"train.py: error: {msg}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
        sys.stdout.flush()
        os._exit(code)
    return code
