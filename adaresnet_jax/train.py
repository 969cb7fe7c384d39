"""Training runs: ``run(config)`` / ``main(argv)`` (the logic behind the top-level ``train.py``).

A run trains with the step of :mod:`adaresnet_jax.steps` (re-exported here: ``make_mesh``,
``create_state``, ``make_train_step``, ``make_eval_step``, ...) fed by one of two input paths
(:mod:`adaresnet_jax.inputs`, ``--input``): resident (the uint8 training set on every device, each
step gathering its batch inside the compiled update, no per-step host work) or streaming (grain reads,
decodes and augments on the host, two batches ahead on the devices). The loop counts steps: a metrics row
every --log-every-steps (and at every evaluation), evaluation every --eval-every-steps, checkpoints
every --checkpoint-every-steps and after --checkpoint-every-minutes; each defaults to once an epoch.
A row that only logs is fetched one step late, so the host never waits for the device there.
Outputs, checkpoints and resume: see :mod:`adaresnet_jax.metrics` and :mod:`adaresnet_jax.checkpoint`.

Exit codes of ``main``: 0 finished (or stopped by SIGTERM or SIGINT after saving a checkpoint), 1 the loss
became non-finite (nothing saved from the bad state) or a multi-process run failed, 2 bad input (one
line on stderr, before any compile and before the workdir is touched) or a workdir whose every
checkpoint is corrupt (each is reported, by path, on its own
warning line and moved to ``<workdir>/corrupt_checkpoints/``; a corrupt newest step is skipped for
the previous good one). A run killed at any point (SIGKILL, preemption) resumes from its newest
complete checkpoint when the same command is rerun; a checkpoint saved on another device count is
restored onto the current devices, and the run says so. 3: the run had not stopped within
--stop-timeout seconds of a SIGTERM, or a second SIGTERM came (see :mod:`adaresnet_jax.stopping`; SIGINT,
Ctrl-C, counts as SIGTERM there). 130: SIGINT before or after the training loop (one line, nothing saved).
4: ``--compile-only TARGET`` compiled the run for TARGET and it does not fit in the device's memory
(:mod:`adaresnet_jax.aot`; 0 when it fits).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adaresnet_jax import aot, runconfig
from adaresnet_jax import checkpoint as ckpt_lib
from adaresnet_jax.config import RESUME_SAFE_FIELDS, TOTAL_STEP_SCHEDULES, Config, parse_config
from adaresnet_jax.data import DataError, Dataset, fetch
from adaresnet_jax.data.streaming import StreamingData, inspect
from adaresnet_jax.inputs import ResidentInput, StreamingEvaluator, StreamingInput, open_data
from adaresnet_jax.metrics import RunLog, skip_values
from adaresnet_jax.models import create_model, skip_weights
from adaresnet_jax.optim import decay_mask, make_optimizer, make_schedule, skip_mask  # noqa: F401 (re-exported)
from adaresnet_jax.provenance import provenance, versions
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


def _load(cfg: Config) -> tuple[Dataset | StreamingData, tuple[str, ...] | None]:
    """(data, class names): see :func:`adaresnet_jax.inputs.open_data`; in a multi-host run with a download,
    process 0 downloads before the others read it."""
    try:
        if cfg.dataset in ("cifar10", "cifar100") and cfg.data_dir is None and jax.process_count() > 1:
            if jax.process_index() == 0:
                fetch(cfg.dataset)
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("adaresnet_download")
        return open_data(cfg, lambda msg: _say(jax.process_index() == 0, msg))
    except DataError as e:
        raise UsageError(str(e)) from None


def run(cfg: Config) -> dict[str, Any]:
    """Trains (or with ``eval_only`` evaluates) as ``cfg`` says; returns the summary dict.

    Raises UsageError for bad input (before any compile, and before anything in the workdir is created
    or changed) and NonFiniteLoss when training diverges.
    """
    wall0 = time.perf_counter()
    aot.use_compilation_cache(cfg.compilation_cache)
    if cfg.compile_only:  # compile for a target, run nothing (adaresnet_jax/aot.py)
        return aot.compile_run(cfg)
    _init_distributed(cfg)
    workdir = Path(cfg.workdir)
    saved = runconfig.load_config(workdir)
    if cfg.eval_only and saved is not None:
        # --eval-only uses the run's own config; only the harmless flags come from the command line, and
        # the run's own data location unless --data-dir names another.
        given = {k: getattr(cfg, k) for k in RESUME_SAFE_FIELDS if not (k == "data_dir" and cfg.data_dir is None)}
        cfg = dataclasses.replace(Config.from_dict(saved), **given)
    if cfg.eval_only and not any((workdir / "checkpoints").glob("[0-9]*")):
        raise UsageError(f"--eval-only: workdir '{workdir}' has no checkpoints")
    try:
        resuming = runconfig.check_workdir(workdir, cfg)
    except runconfig.IncompatibleWorkdir as e:
        raise UsageError(str(e)) from None
    if not resuming and any((workdir / "checkpoints").glob("[0-9]*")):
        raise UsageError(f"workdir '{workdir}' holds checkpoints but no config.json: use another --workdir")
    ds, classes = _load(cfg)
    streaming = isinstance(ds, StreamingData)
    n_train, n_val, n_test = (len(a) for a in ((ds.train_idx, ds.val_idx, ds.test_idx) if streaming else
                                               (ds.x_train, ds.x_val, ds.x_test)))
    n_dev, bs = jax.device_count(), cfg.batch_size
    if bs % n_dev:
        raise UsageError(f"batch_size {bs} is not divisible by the {n_dev} devices: use a multiple of {n_dev}")
    if bs > n_train:
        raise UsageError(f"batch_size {bs} exceeds the {n_train} training images: lower --batch-size")
    _check_splits(cfg, ds, n_train, n_val)
    if streaming and not cfg.drop_last:
        raise UsageError("--no-drop-last is not supported by the streaming input path: drop it (or --input resident)")
    size = cfg.image_size or 224
    image_shape = (size, size, 3) if streaming else ds.image_shape
    try:  # streaming: statistics and a bad-file check on a sample of decoded training images, before compiling
        stats = inspect(ds, size, cfg.eval_crop, cfg.seed, cfg.max_bad_images) if streaming else (ds.mean, ds.std)
    except DataError as e:
        raise UsageError(str(e)) from None
    _prepare_workdir(workdir)
    proc0 = jax.process_index() == 0
    if resuming and not cfg.eval_only and saved.get("epochs") != cfg.epochs and cfg.schedule in TOTAL_STEP_SCHEDULES:
        _say(proc0, f"train.py: warning: --epochs {cfg.epochs} differs from the run's {saved.get('epochs')}: "
             f"the {cfg.schedule} schedule is recomputed over the new total, so the resumed steps follow a "
             "different learning-rate curve than an uninterrupted run would")

    mesh = make_mesh()
    spe = _steps_per_epoch(cfg, n_train, n_dev)
    try:
        model = create_model(cfg.model, num_classes=ds.num_classes, skip=cfg.skip, **cfg.model_overrides(mesh))
    except ValueError as e:  # a CPU convolution asked for GPU/TPU devices
        raise UsageError(str(e)) from None
    tx, schedule = make_optimizer(cfg, spe)
    channels = image_shape[-1]
    mean, std = stats if cfg.normalize else ((0.0,) * channels, (1.0,) * channels)
    dtype = jnp.bfloat16 if cfg.compute_dtype_for(mesh) == "bfloat16" else jnp.float32
    round_up = lambda n: -(-max(n, 1) // n_dev) * n_dev  # noqa: E731
    eval_bs = min(round_up(cfg.eval_batch_size), round_up(max(n_val, n_test)))

    abstract = abstract_state(model, tx, image_shape, mesh=mesh)
    with_best = cfg.val_split > 0 and (not cfg.eval_only or (workdir / "best").is_dir())
    ckpts = ckpt_lib.Checkpoints(workdir, keep=cfg.keep_checkpoints, with_best=with_best, read_only=cfg.eval_only,
                                 with_data=streaming)
    eval_step = make_eval_step(model, mesh=mesh, mean=mean, std=std, dtype=dtype)
    evaluator = StreamingEvaluator(eval_step, ds, eval_bs, mesh, cfg) if streaming else \
        Evaluator(eval_step, {"val": (ds.x_val, ds.y_val), "test": (ds.x_test, ds.y_test)}, eval_bs, mesh)
    inputs = None
    try:
        if cfg.eval_only:
            return _eval_only(cfg, ckpts, abstract, evaluator, workdir, proc0)
        try:
            restored = ckpts.restore_latest(abstract)
        except ckpt_lib.NoGoodCheckpoint as e:
            raise UsageError(str(e)) from None
        data_state = None
        if restored is not None:
            start_step, state, saved_on, data_state = restored
            n, procs, n_procs = saved_on.get("devices", n_dev), saved_on.get("processes", 1), jax.process_count()
            if (n, procs) != (n_dev, n_procs):  # orbax re-shards onto the current mesh
                _say(proc0, f"train.py: restored a checkpoint saved on {n} device{'s' * (n != 1)}"
                     f"{f' in {procs} processes' if procs != 1 else ''} onto {n_dev} device{'s' * (n_dev != 1)}"
                     f"{f' in {n_procs} processes' if n_procs != 1 else ''} (step {start_step})")
        else:
            start_step, state = 0, _init_from(cfg, model, tx, mesh, image_shape[-1]) if cfg.init_from else \
                create_state(model, tx, image_shape, seed=cfg.seed, mesh=mesh)
            if proc0:  # the initial skip weights: the trajectories' epoch 0 (summary.json "skip_weights_init")
                init = skip_values(jax.device_get(skip_weights(state["params"])))
                (workdir / "skip_weights_init.json").write_text(json.dumps(init) + "\n")
        runconfig.write_config(workdir, cfg)
        if classes is not None and proc0:
            (workdir / "classes.json").write_text(json.dumps(list(classes)) + "\n")  # label i is classes[i]
        if streaming:
            inputs = StreamingInput(cfg, ds, model, tx, mesh, spe, mean, std, dtype, start_step=start_step,
                                    end_step=_end_step(cfg, spe), saved=data_state, say=lambda m: _say(proc0, m))
        else:
            inputs = ResidentInput(cfg, ds, model, tx, mesh, spe, mean, std, dtype)
        ctx = _Context(cfg, inputs, model, tx, schedule, ckpts, evaluator, mesh, spe, mean, std, dtype, proc0,
                       classes)
        return _train(ctx, state, start_step, wall0)
    except DataError as e:  # too many unreadable images while streaming
        raise UsageError(str(e)) from None
    finally:
        if inputs is not None:
            inputs.close()
        ckpts.close()


MIN_VAL_IMAGES = 100  # with fewer (and fewer than a batch), one image moves the validation accuracy by over 1 point


def _check_splits(cfg: Config, ds: Dataset | StreamingData, n_train: int, n_val: int) -> None:
    """Refuses (UsageError, one line) a training set of one class, and a validation split too small to select a
    model by: fewer than MIN_VAL_IMAGES images and fewer than one batch. Refused rather than enlarged: taking
    more images from the training set than --val-split says would change what the run trains on."""
    labels = ds.train_records.labels[ds.train_idx] if isinstance(ds, StreamingData) and hasattr(
        ds.train_records, "labels") else (None if isinstance(ds, StreamingData) else ds.y_train)
    if ds.num_classes < 2 or (labels is not None and np.unique(labels).size < 2):
        raise UsageError(f"the training set of {cfg.dataset} has one class: a classifier needs at least 2 (an image "
                         "folder needs one folder per class: train/<class>/*.jpg and val/<class>/*.jpg)")
    need = min(MIN_VAL_IMAGES, cfg.batch_size)
    if 0 < n_val < need:
        total = n_val / cfg.val_split  # the training images before the split
        fix = (f"raise --val-split to at least {need / total:.2g}, or " if need < total / 2 else "") + \
            "pass --val-split 0 (no validation split; the test split is still evaluated)"
        raise UsageError(f"--val-split {cfg.val_split:g} holds out {n_val} of about {total:.0f} training images: too "
                         f"few for a validation accuracy to mean anything (at least {need}): {fix}")


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def _init_from(cfg: Config, model: Any, tx: Any, mesh: jax.sharding.Mesh, channels: int) -> State:
    """``--init-from``: the initial state from a torchvision state dict (.npz), with a new head (seed ``cfg.seed``)."""
    from adaresnet_jax.torch_weights import from_torchvision

    if not cfg.init_from.endswith(".npz"):
        raise UsageError(f"--init-from {cfg.init_from}: expected an .npz of a torchvision state_dict, written by "
                         "np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})")
    try:
        with np.load(cfg.init_from) as f:
            state_dict = dict(f)
        v = from_torchvision(state_dict, model=model, head="new", rng=jax.random.key(cfg.seed), input_channels=channels)
    except (OSError, ValueError) as e:
        raise UsageError(f"--init-from {cfg.init_from}: {e}") from None
    init = lambda v: {"step": jnp.zeros((), jnp.int32), **v, "opt_state": tx.init(v["params"])}  # noqa: E731
    return jax.jit(init, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))(v)


def _end_step(cfg: Config, spe: int) -> int:
    """The step this command trains to: --epochs, cut by --stop-after-epochs and --stop-after-steps."""
    return min(cfg.epochs * spe, (cfg.stop_after_epochs or cfg.epochs) * spe, cfg.stop_after_steps or cfg.epochs * spe)


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
    inputs: ResidentInput | StreamingInput
    model: Any
    tx: Any
    schedule: Any
    ckpts: ckpt_lib.Checkpoints
    evaluator: Evaluator | StreamingEvaluator
    mesh: Any
    spe: int
    mean: Any
    std: Any
    dtype: Any
    proc0: bool
    classes: tuple[str, ...] | None = None


def _train(c: _Context, state: State, start_step: int, wall0: float) -> dict[str, Any]:
    """The training loop: one flat loop over global steps. After step s: a metrics row when s is a multiple
    of --log-every-steps or --eval-every-steps (evaluating at the latter), a checkpoint at multiples of
    --checkpoint-every-steps or when --checkpoint-every-minutes have passed (decided at row steps, the same
    on every process), and all three at the last step. A row that only logs is fetched after the next step
    is queued (one step late, so the device never waits for the host); before any checkpoint the metrics
    since the last check are fetched and checked finite. SIGTERM ends it at one common step on every
    process with a checkpoint (see :mod:`adaresnet_jax.stopping`)."""
    from tqdm import tqdm

    cfg, spe, inputs = c.cfg, c.spe, c.inputs
    end_step, first_epoch = _end_step(cfg, spe), start_step // spe
    log_every, eval_every = cfg.log_every_steps or spe, cfg.eval_every_steps or spe
    ckpt_every = cfg.checkpoint_every_steps or cfg.checkpoint_every * spe
    say = lambda msg: _say(c.proc0, msg)  # noqa: E731
    if start_step >= end_step:  # rerun of a finished command: keep its outputs as they are
        say(f"nothing to do: {cfg.workdir} already holds step {start_step} (epoch {first_epoch}); "
            "raise --epochs to train on")
        path = Path(cfg.workdir) / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {"step": start_step}
    log = RunLog(Path(cfg.workdir), enabled=c.proc0, resume_step=start_step)

    t0 = time.perf_counter()  # ahead-of-time compile, so no step below is timed with its compile
    inputs.compile(state, start_step)
    c.evaluator.compile(state)
    compile_time = time.perf_counter() - t0
    best_val = c.ckpts.best_val_acc()
    if start_step:
        say(f"resumed from step {start_step} (epoch {first_epoch + 1}, step {start_step - first_epoch * spe} of {spe})")
    bar_off = cfg.quiet or not c.proc0 or not sys.stderr.isatty()  # a log file gets one line per row
    step, window, pending, first_step_time, train_time, images, bar = start_step, [], None, None, 0.0, 0, None
    t_win = last_save = time.perf_counter()

    def row(window: list, step: int, secs: float, bad: int | None, skips: Any, evaluate: State | None = None
            ) -> dict[str, Any]:
        """Fetches ``window``'s metrics (raising NonFiniteLoss) and logs its row, evaluating ``evaluate`` if given."""
        hist = _fetch_finite(c, window, step)
        r = _row(c, step, hist, window, secs, bad, c.evaluator(evaluate) if evaluate is not None else {}, skips)
        log.epoch(r)
        say(_epoch_line(cfg, r))
        return r

    with StopOnSigterm(cfg.stop_timeout) as stop:
        while step < end_step:
            epoch, i = divmod(step, spe)
            if bar is None:
                bar = tqdm(total=spe, initial=i, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                           disable=bar_off, leave=False, file=sys.stderr)
            state, m, n = inputs.step(state, step)
            window.append((m, n))
            step += 1
            if first_step_time is None:
                jax.block_until_ready(m)
                first_step_time = time.perf_counter() - t_win
            if pending is not None:  # the previous row, fetched now that this step is queued behind it
                row(*pending)
                pending = None
            if not bar.disable and len(window) > 1:  # the previous step's loss: the host never waits on this one
                bar.set_postfix(loss=f"{float(window[-2][0]['loss']):.4f}", refresh=False)
            bar.update(1)
            stopping = stop.should_stop(step)
            at_row = step % log_every == 0 or step % eval_every == 0 or step == end_step
            at_ckpt = step % ckpt_every == 0 or step == end_step or stopping
            if not (at_row or at_ckpt):
                continue
            if step % spe == 0 or stopping or step == end_step:
                bar.close()
                bar = None
            bad, since_save = None, time.perf_counter() - last_save
            if at_row:  # a row step (the same on every process): total bad images, process 0's clock
                bad, since_save = _agree(c, since_save)
                at_ckpt |= bool(cfg.checkpoint_every_minutes) and since_save >= 60 * cfg.checkpoint_every_minutes
            if at_row:
                secs = time.perf_counter() - t_win
                train_time, images = train_time + secs, images + sum(k for _, k in window)
                skips = jax.tree.map(jnp.copy, skip_weights(state["params"]))  # copies: the next step donates
                if step % eval_every and step != end_step and not at_ckpt:
                    pending = (window, step, secs, bad, skips)  # logged after the next step is queued
                    r = None
                else:
                    at_eval = step % eval_every == 0 or step == end_step
                    r = row(window, step, secs, bad, skips, evaluate=state if at_eval else None)
                window, t_win = [], time.perf_counter()
            else:
                r = _fetch_finite(c, window, step) and None  # never save a diverged state
            if at_ckpt:
                c.ckpts.save(step, state, inputs.data_state())
                last_save = time.perf_counter()
            if r is not None and r["val_acc"] is not None and (best_val is None or r["val_acc"] > best_val):
                best_val = r["val_acc"]
                c.ckpts.save_best(step, state, best_val)
            if stopping and step < end_step:
                c.ckpts.wait()
                where = f"end of epoch {epoch + 1}" if step % spe == 0 else f"epoch {epoch + 1}, mid-epoch"
                if jax.process_count() == 1:
                    why = f"received {stop.received}"
                else:  # only the process(es) the signal reached know it; every process stops at this step
                    me = f"process {jax.process_index()} of {jax.process_count()}"
                    why = (f"{me} received {stop.received}" if stop.received else
                           f"{me}: another process received SIGTERM or SIGINT") + f"; all processes stop at step {step}"
                _say(True, f"{why}: saved a checkpoint at step {step} ({where}) in {cfg.workdir}; "
                     "rerun the same command to resume")
                log.close()
                return {"interrupted": True, "step": step}
        c.ckpts.wait()
    log.close()
    summary = _summary(c, log.rows(), state, wall0=wall0, compile_time=compile_time, first_step_time=first_step_time,
                       train_time=train_time, images=images, finished=end_step == cfg.epochs * spe)
    log.summary(summary)
    log.plots()
    at_best = summary["test_acc_at_best_val"]
    say(f"final test acc {summary['test_acc']:.4f} (at the best-val epoch: "
        f"{'n/a, no validation split' if at_best is None else f'{at_best:.4f}'}), outputs in {cfg.workdir}")
    return summary


def _agree(c: _Context, since_save: float) -> tuple[int | None, float]:
    """(bad images skipped so far, summed over processes, or None for the resident path; process 0's seconds
    since the last save): every process gets the same values, so every process takes the same decision.
    One small all-gather at row steps, only for several processes and only when something needs it."""
    bad = c.inputs.bad_images()
    if bad is not None and isinstance(c.evaluator, StreamingEvaluator):
        bad += c.evaluator.bad
    if jax.process_count() == 1 or (bad is None and not c.cfg.checkpoint_every_minutes):
        return bad, since_save
    from jax.experimental import multihost_utils

    got = np.asarray(multihost_utils.process_allgather(np.array([bad or 0, since_save], np.float32)))
    return (None if bad is None else int(got[:, 0].sum())), float(got[0, 1])


def _fetch_finite(c: _Context, window: list[tuple[Any, int]], step: int) -> list[dict[str, Any]]:
    """The window's metrics on the host; raises NonFiniteLoss naming the first non-finite step."""
    hist = jax.device_get([m for m, _ in window])
    if not all(h["finite"] for h in hist):
        bad = step - len(window) + 1 + [bool(h["finite"]) for h in hist].index(False)
        last = c.ckpts.latest_step()
        where = f"step {last} in {Path(c.cfg.workdir) / 'checkpoints'}" if last is not None else "none"
        raise NonFiniteLoss(f"non-finite loss or update at step {bad} (epoch {(bad - 1) // c.spe + 1}); the state "
                            f"was not saved; last good checkpoint: {where} (lower --lr or set --grad-clip)")
    return hist


def _row(c: _Context, step: int, hist: list[dict[str, Any]], window: list[tuple[Any, int]], secs: float,
         bad: int | None, evals: dict[str, Any], skips: Any) -> dict[str, Any]:
    """One metrics.jsonl row: train loss (weighted by batch size) and accuracy over the window, the evaluation
    ``evals`` (none at this row: {}), lr, images/s, bad images, skip weights (device arrays)."""
    n_img = sum(n for _, n in window)
    loss = sum(float(h["loss"]) * n for h, (_, n) in zip(hist, window)) / n_img
    epoch = step // c.spe if step % c.spe == 0 else round(step / c.spe, 4)
    return {"epoch": epoch, "step": step, "train_loss": loss,
            "train_acc": sum(int(h["correct"]) for h in hist) / n_img, "val_loss": None, "val_acc": None,
            "test_loss": None, "test_acc": None, **evals, "lr": float(c.schedule(step - 1)),
            "images_per_sec": n_img / secs, "epoch_time": secs, "bad_images": bad,
            "skip_weights": skip_values(jax.device_get(skips))}


def _epoch_line(cfg: Config, row: dict[str, Any]) -> str:
    val = f", val acc {row['val_acc']:.4f}" if row["val_acc"] is not None else ""
    test = f", test acc {row['test_acc']:.4f}" if row["test_acc"] is not None else ""
    bad = f", {row['bad_images']} bad images skipped" if row["bad_images"] else ""
    return (f"epoch {row['epoch']}/{cfg.epochs} step {row['step']}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}{val}{test}{bad}, {row['images_per_sec']:.0f} img/s, {row['epoch_time']:.1f}s")


def _summary(c: _Context, rows: list[dict[str, Any]], state: State, *, wall0: float, compile_time: float,
             first_step_time: float | None, train_time: float, images: int, finished: bool) -> dict[str, Any]:
    final = rows[-1] if rows else {}
    with_val = [r for r in rows if r.get("val_acc") is not None]
    best = max(with_val, key=lambda r: r["val_acc"]) if with_val else None  # first row of the max
    devices = jax.devices()
    return {
        "test_acc": final.get("test_acc"), "test_loss": final.get("test_loss"), "val_acc": final.get("val_acc"),
        "epoch": final.get("epoch"), "step": final.get("step"), "finished": finished,
        "test_acc_at_best_val": best["test_acc"] if best else None,
        "best_val_acc": best["val_acc"] if best else None, "best_val_epoch": best["epoch"] if best else None,
        "skip_weights": skip_values(jax.device_get(skip_weights(state["params"]))),
        "skip_weights_init": json.loads(init.read_text()) if (init := Path(c.cfg.workdir) / "skip_weights_init.json").exists()
        else None,
        "num_params": int(sum(np.size(a) for a in jax.tree.leaves(state["params"]))),
        "wall_time_s": time.perf_counter() - wall0, "compile_time_s": compile_time,
        "first_step_time_s": first_step_time, "train_time_s": train_time,
        "images_per_sec": images / train_time if train_time else None,
        "input": "streaming" if isinstance(c.inputs, StreamingInput) else "resident",
        "bad_images": final.get("bad_images"), "classes": list(c.classes) if c.classes is not None else None,
        "normalization": {"mean": list(c.mean), "std": list(c.std)},
        "devices": {"count": len(devices), "processes": jax.process_count(), "platform": devices[0].platform,
                    "kind": devices[0].device_kind},
        "versions": versions(), "config": dataclasses.asdict(c.cfg),
        "compilation_cache": aot.cache_stats(),
        "provenance": provenance(conv_impl=c.model.conv_impl),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry: 0 done (or stopped by SIGTERM with a checkpoint; --compile-only: it fits), 1 diverged or
    failed, 2 bad input, 3 no clean stop within --stop-timeout of SIGTERM, 4 --compile-only: it does not fit.

    In a multi-process run every failure ends the process at once with ``os._exit`` after its message:
    a normal exit would wait at jax.distributed's shutdown barrier for peers that may be stuck in a
    collective with it; the coordination service then ends the other processes within
    --heartbeat-timeout seconds.
    """
    cfg = parse_config(argv)
    try:
        summary = run(cfg)
        return 4 if cfg.compile_only and not summary["fits"] else 0  # aot.EXIT_DOES_NOT_FIT
    except KeyboardInterrupt:  # Ctrl-C before the training loop (inside it, SIGINT stops like SIGTERM)
        code, msg = 130, "interrupted (SIGINT) outside the training loop: no checkpoint was saved for it"
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
