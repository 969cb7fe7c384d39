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

Reading order (the file follows it): :func:`main` parses the command line and calls :func:`run`, which checks
the workdir and the data (:func:`_open_workdir`, :func:`_read_data`), builds the model, optimizer, steps
(:class:`adaresnet_jax.steps.StepOptions`), evaluator and checkpoints, restores or creates the state
(:func:`_restore_or_create`) and opens the training batches (:func:`adaresnet_jax.inputs.open_input`); then
:class:`Loop` trains, with each periodic action a method (:meth:`Loop._row`, :meth:`Loop._checkpoint`,
:meth:`Loop._keep_best`, :meth:`Loop._stopped`) and :class:`Every` saying when each is due; :func:`_train`
compiles, runs the loop and writes the summary (:func:`_summary`).

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
from collections.abc import Callable
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
from adaresnet_jax.inputs import ResidentInput, StreamingInput, open_data, open_eval, open_input
from adaresnet_jax.metrics import RunLog, skip_values
from adaresnet_jax.models import create_model, skip_weights
from adaresnet_jax.optim import decay_mask, make_optimizer, make_schedule, skip_mask  # noqa: F401 (re-exported)
from adaresnet_jax.provenance import provenance, versions
from adaresnet_jax.steps import (  # noqa: F401 (re-exported)
    CompiledStep, Evaluator, State, StepOptions, TrainStep, abstract_state, create_state, make_epoch_batches,
    make_epoch_permutation, make_epoch_tail, make_eval_step, make_mesh, make_train_step, replicate, shard_batch,
    steps_per_epoch)
from adaresnet_jax.stopping import StopOnSigterm


class UsageError(ValueError):
    """Bad input found before any compile: main() prints it on one line and exits with code 2."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/Inf: main() prints it and exits with code 1."""


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


def run(cfg: Config) -> dict[str, Any]:
    """Trains (or with ``eval_only`` evaluates) as ``cfg`` says; returns the summary dict.

    Raises UsageError for bad input (before any compile, and before anything in the workdir is created
    or changed) and NonFiniteLoss when training diverges. Top to bottom: the workdir and the data are checked,
    the model, optimizer, steps, evaluator and checkpoints built, the state restored or created, then the
    training loop (:class:`Loop`) and the summary (:func:`_train`).
    """
    wall0 = time.perf_counter()
    aot.use_compilation_cache(cfg.compilation_cache)
    if cfg.compile_only:  # compile for a target, run nothing (adaresnet_jax/aot.py)
        return aot.compile_run(cfg)
    _init_distributed(cfg)
    cfg, saved, resuming = _open_workdir(cfg)
    data = _read_data(cfg)
    _prepare_workdir(Path(cfg.workdir))
    proc0 = jax.process_index() == 0
    say = lambda msg: _say(proc0, msg)  # noqa: E731
    _warn_if_schedule_changes(cfg, saved, resuming, say)

    mesh = make_mesh()
    spe = steps_per_epoch(cfg, data.n_train, jax.device_count())
    try:
        model = create_model(cfg.model, num_classes=data.ds.num_classes, skip=cfg.skip, **cfg.model_overrides(mesh))
    except ValueError as e:  # a CPU convolution asked for GPU/TPU devices
        raise UsageError(str(e)) from None
    tx, lr = make_optimizer(cfg, spe)
    dtype = jnp.bfloat16 if cfg.compute_dtype_for(mesh) == "bfloat16" else jnp.float32
    opts = StepOptions.for_run(cfg, data.norm(cfg), dtype, steps_per_epoch=spe, streaming=data.streaming)
    train_step = make_train_step(model, tx, opts, mesh=mesh)
    eval_step = make_eval_step(model, mesh=mesh, mean=opts.mean, std=opts.std, dtype=opts.dtype)
    abstract = abstract_state(model, tx, data.image_shape, mesh=mesh)
    with_best = cfg.val_split > 0 and (not cfg.eval_only or (Path(cfg.workdir) / "best").is_dir())
    ckpts = ckpt_lib.Checkpoints(Path(cfg.workdir), keep=cfg.keep_checkpoints, with_best=with_best,
                                 read_only=cfg.eval_only, with_data=data.streaming)
    evaluator = Evaluator(eval_step, open_eval(cfg, data.ds, data.eval_batch_size(cfg), mesh))
    inputs = None
    try:
        if cfg.eval_only:
            return _eval_only(cfg, ckpts, abstract, evaluator)
        start_step, state, data_state = _restore_or_create(cfg, ckpts, abstract, lambda: _new_state(
            cfg, model, tx, mesh, data.image_shape), say)
        _write_run_files(cfg, data.classes)
        end_step = _end_step(cfg, spe)
        inputs = open_input(cfg, data.ds, mesh, steps_per_epoch=spe, steps=range(start_step, end_step),
                            saved=data_state, say=say)
        loop = Loop(cfg, Every.for_run(cfg, spe), train_step, inputs, evaluator, ckpts, lr)
        about = _About("streaming" if data.streaming else "resident", data.classes, opts.mean, opts.std,
                       model.conv_impl)
        return _train(loop, state, start_step, about, wall0)
    except DataError as e:  # too many unreadable images while streaming
        raise UsageError(str(e)) from None
    finally:
        if inputs is not None:
            inputs.close()
        ckpts.close()


# ----------------------------------------------------------------------------- the workdir and the data

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


def _open_workdir(cfg: Config) -> tuple[Config, dict[str, Any] | None, bool]:
    """(the config to run, the workdir's saved config or None, whether the run resumes): with --eval-only the
    run's own config, only the harmless flags from the command line. UsageError for a workdir this config
    cannot use."""
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
    return cfg, saved, resuming


def _read_data(cfg: Config) -> _Data:
    """The data set, opened and checked against the batch size and splits (UsageError, one line); streaming:
    statistics and a bad-file check on a sample of decoded training images, before compiling."""
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
    size = cfg.image_px
    try:
        stats = inspect(ds, size, cfg.eval_crop, cfg.seed, cfg.max_bad_images) if streaming else (ds.mean, ds.std)
    except DataError as e:
        raise UsageError(str(e)) from None
    return _Data(ds, classes, n_train, n_val, n_test, (size, size, 3) if streaming else ds.image_shape, stats)


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


@dataclasses.dataclass(frozen=True)
class _Data:
    """The run's data, checked: ``ds`` (resident :class:`Dataset` or :class:`StreamingData`), class names (image
    folders), split sizes, the image shape a step sees, and the training set's per-channel (mean, std)."""

    ds: Dataset | StreamingData
    classes: tuple[str, ...] | None
    n_train: int
    n_val: int
    n_test: int
    image_shape: tuple[int, ...]
    stats: tuple[Any, Any]

    @property
    def streaming(self) -> bool:
        return isinstance(self.ds, StreamingData)

    def norm(self, cfg: Config) -> tuple[Any, Any]:
        """(mean, std) the steps normalise with: the data's statistics, or none (0, 1) with --no-normalize."""
        channels = self.image_shape[-1]
        return self.stats if cfg.normalize else ((0.0,) * channels, (1.0,) * channels)

    def eval_batch_size(self, cfg: Config) -> int:
        """--eval-batch-size, cut to the larger evaluation split, rounded up to a multiple of the device count."""
        n_dev = jax.device_count()
        round_up = lambda n: -(-max(n, 1) // n_dev) * n_dev  # noqa: E731
        return min(round_up(cfg.eval_batch_size), round_up(max(self.n_val, self.n_test)))


def _prepare_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"workdir '{workdir}' is not writable ({e.strerror or e}): pass a writable --workdir") from None


def _warn_if_schedule_changes(cfg: Config, saved: dict[str, Any] | None, resuming: bool,
                              say: Callable[[str], None]) -> None:
    if resuming and not cfg.eval_only and saved.get("epochs") != cfg.epochs and cfg.schedule in TOTAL_STEP_SCHEDULES:
        say(f"train.py: warning: --epochs {cfg.epochs} differs from the run's {saved.get('epochs')}: "
            f"the {cfg.schedule} schedule is recomputed over the new total, so the resumed steps follow a "
            "different learning-rate curve than an uninterrupted run would")


def _end_step(cfg: Config, spe: int) -> int:
    """The step this command trains to: --epochs, cut by --stop-after-epochs and --stop-after-steps."""
    return min(cfg.epochs * spe, (cfg.stop_after_epochs or cfg.epochs) * spe, cfg.stop_after_steps or cfg.epochs * spe)


# ----------------------------------------------------------------------------- the state

def _restore_or_create(cfg: Config, ckpts: ckpt_lib.Checkpoints, abstract: State, create: Callable[[], State],
                       say: Callable[[str], None]) -> tuple[int, State, bytes | None]:
    """(start step, state, this process's saved input state or None): the newest good checkpoint, else a new
    state from ``create()`` (whose skip weights are written to skip_weights_init.json)."""
    try:
        restored = ckpts.restore_latest(abstract)
    except ckpt_lib.NoGoodCheckpoint as e:
        raise UsageError(str(e)) from None
    if restored is None:
        state = create()
        if jax.process_index() == 0:  # the initial skip weights: the trajectories' epoch 0 ("skip_weights_init")
            init = _skip_values(state)
            (Path(cfg.workdir) / "skip_weights_init.json").write_text(json.dumps(init) + "\n")
        return 0, state, None
    start_step, state, saved_on, data_state = restored
    n_dev, n, procs, n_procs = jax.device_count(), saved_on.get("devices", jax.device_count()), \
        saved_on.get("processes", 1), jax.process_count()
    if (n, procs) != (n_dev, n_procs):  # orbax re-shards onto the current mesh
        say(f"train.py: restored a checkpoint saved on {n} device{'s' * (n != 1)}"
            f"{f' in {procs} processes' if procs != 1 else ''} onto {n_dev} device{'s' * (n_dev != 1)}"
            f"{f' in {n_procs} processes' if n_procs != 1 else ''} (step {start_step})")
    return start_step, state, data_state


def _new_state(cfg: Config, model: Any, tx: Any, mesh: jax.sharding.Mesh, image_shape: tuple[int, ...]) -> State:
    """A fresh state: from --init-from's weights, else initialised from --seed."""
    if cfg.init_from:
        return _init_from(cfg, model, tx, mesh, image_shape[-1])
    return create_state(model, tx, image_shape, seed=cfg.seed, mesh=mesh)


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


def _write_run_files(cfg: Config, classes: tuple[str, ...] | None) -> None:
    """config.json (what a rerun checks and resumes with) and classes.json (label i is classes[i])."""
    runconfig.write_config(Path(cfg.workdir), cfg)
    if classes is not None and jax.process_index() == 0:
        (Path(cfg.workdir) / "classes.json").write_text(json.dumps(list(classes)) + "\n")


def _skip_values(state: State) -> dict[str, float | list[float]]:
    """The state's skip weights as JSON values."""
    return skip_values(jax.device_get(skip_weights(state["params"])))


def _eval_only(cfg: Config, ckpts: ckpt_lib.Checkpoints, abstract: State, evaluator: Evaluator) -> dict[str, Any]:
    """--eval-only: evaluates the --eval-from checkpoint; writes eval_<which>.json and prints it."""
    workdir = Path(cfg.workdir)
    try:
        step, state = ckpts.restore(abstract, which=cfg.eval_from)
    except FileNotFoundError:
        raise UsageError(f"--eval-only: workdir '{workdir}' has no {cfg.eval_from} checkpoint") from None
    except ckpt_lib.CorruptCheckpoint as e:
        raise UsageError(f"--eval-only: corrupt {cfg.eval_from} checkpoint {e}") from None
    result = {"checkpoint": cfg.eval_from, "step": int(step), **evaluator(state), "skip_weights": _skip_values(state)}
    if jax.process_index() == 0:
        (workdir / f"eval_{cfg.eval_from}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------- the training loop

@dataclasses.dataclass(frozen=True)
class Every:
    """When the loop's periodic actions happen, after global step ``s`` (``spe`` steps an epoch, ``end`` the last
    step of this command): a metrics row every ``log`` steps, an evaluation (with its row) every ``eval``, a
    checkpoint every ``ckpt`` (or after --checkpoint-every-minutes, decided at row steps); all three at ``end``."""

    spe: int
    end: int
    log: int
    eval: int
    ckpt: int

    @classmethod
    def for_run(cls, cfg: Config, spe: int) -> Every:
        """Each defaults to once an epoch."""
        return cls(spe, _end_step(cfg, spe), cfg.log_every_steps or spe, cfg.eval_every_steps or spe,
                   cfg.checkpoint_every_steps or cfg.checkpoint_every * spe)

    def row(self, s: int) -> bool:
        return s % self.log == 0 or s % self.eval == 0 or s == self.end

    def evaluation(self, s: int) -> bool:
        return s % self.eval == 0 or s == self.end

    def checkpoint(self, s: int) -> bool:
        return s % self.ckpt == 0 or s == self.end

    def epoch_end(self, s: int) -> bool:
        return s % self.spe == 0 or s == self.end


class _Bar:
    """The current epoch's progress bar (tqdm; disabled with --quiet, off process 0 and when stderr is not a
    terminal: a log file gets one line per row)."""

    def __init__(self, cfg: Config, spe: int) -> None:
        self.cfg, self.spe, self.bar = cfg, spe, None
        self.off = cfg.quiet or jax.process_index() != 0 or not sys.stderr.isatty()

    def open(self, step: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            epoch, i = divmod(step, self.spe)
            self.bar = tqdm(total=self.spe, initial=i, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="step",
                            disable=self.off, leave=False, file=sys.stderr)

    def advance(self, window: list[tuple[Any, int]]) -> None:
        if not self.bar.disable and len(window) > 1:  # the previous step's loss: the host never waits on this one
            self.bar.set_postfix(loss=f"{float(window[-2][0]['loss']):.4f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None


@dataclasses.dataclass
class _Clock:
    """Where the run's time went (the summary's timings): seconds since ``wall0``, compiling, the first step,
    and training (rows' windows), with the images trained on."""

    wall0: float
    compile_time: float = 0.0
    first_step_time: float | None = None
    train_time: float = 0.0
    images: int = 0


class Loop:
    """The training loop: :meth:`run` trains one step at a time; after each, :meth:`_periodic` takes the actions
    that are due (see :class:`Every`): :meth:`_row` (log a metrics row, evaluating at evaluation steps),
    :meth:`_checkpoint`, :meth:`_keep_best`, and :meth:`_stopped` on SIGTERM/SIGINT.

    A row that only logs is fetched after the next step is queued (one step late, so the device never waits
    for the host); before any checkpoint the metrics since the last check are fetched and checked finite.
    A stop signal ends the loop at one common step on every process with a checkpoint
    (:mod:`adaresnet_jax.stopping`).
    """

    def __init__(self, cfg: Config, every: Every, train_step: TrainStep, inputs: ResidentInput | StreamingInput,
                 evaluator: Evaluator, ckpts: ckpt_lib.Checkpoints, lr: Callable[[int], Any]) -> None:
        self.cfg, self.every, self.train_step, self.inputs = cfg, every, train_step, inputs
        self.evaluator, self.ckpts, self.lr = evaluator, ckpts, lr
        self.state: State = {}
        self.step = 0
        self.log: RunLog | None = None
        self.window: list[tuple[Any, int]] = []  # (metrics on device, images) of each step since the last row
        self.pending: tuple[Any, ...] | None = None  # a row to log once the next step is queued
        self.bar, self.best_val = _Bar(cfg, every.spe), None
        self.clock = _Clock(0.0)
        self.t_win = self.last_save = time.perf_counter()

    def compile(self, state: State, step: int) -> None:
        """Starts at ``state`` after global step ``step``: compiles the train and eval steps ahead of time, so no
        step below is timed with its compile."""
        self.state, self.step = state, step
        self.compiled = CompiledStep(self.train_step, self.state, self.inputs.examples(self.step))
        self.evaluator.compile(self.state)

    def run(self, log: RunLog) -> bool:
        """Trains to ``every.end``; True when a stop signal ended the loop early (after saving a checkpoint)."""
        self.log, self.best_val = log, self.ckpts.best_val_acc()
        self.t_win = self.last_save = time.perf_counter()
        with StopOnSigterm(self.cfg.stop_timeout) as stop:
            while self.step < self.every.end:
                self._train_one()
                stopping = stop.should_stop(self.step)
                self._periodic(stopping)
                if stopping and self.step < self.every.end:
                    self._stopped(stop)
                    return True
            self.ckpts.wait()
        return False

    def _train_one(self) -> None:
        self.bar.open(self.step)
        batch = self.inputs.batch(self.step)
        self.state, m = self.compiled(self.state, batch)
        self.window.append((m, batch.images))
        self.step += 1
        if self.clock.first_step_time is None:
            jax.block_until_ready(m)
            self.clock.first_step_time = time.perf_counter() - self.t_win
        if self.pending is not None:  # the previous row, fetched now that this step is queued behind it
            self._log_row(*self.pending)
            self.pending = None
        self.bar.advance(self.window)

    def _periodic(self, stopping: bool) -> None:
        """The actions due after this step: a row, a checkpoint (always when stopping), a new best checkpoint."""
        s = self.step
        at_row, at_ckpt = self.every.row(s), self.every.checkpoint(s) or stopping
        if not (at_row or at_ckpt):
            return
        if self.every.epoch_end(s) or stopping:
            self.bar.close()
        row = None
        if at_row:
            at_ckpt, row = self._row(at_ckpt)
        else:
            self._fetch_finite(self.window, s)  # never save a diverged state
        if at_ckpt:
            self._checkpoint()
        self._keep_best(row)

    def _row(self, at_ckpt: bool) -> tuple[bool, dict[str, Any] | None]:
        """A row step (the same on every process): (whether to checkpoint, now also after
        --checkpoint-every-minutes; the row if logged now, None if it waits for the next step)."""
        bad, since_save = self._agree(time.perf_counter() - self.last_save)
        minutes = self.cfg.checkpoint_every_minutes
        at_ckpt |= bool(minutes) and since_save >= 60 * minutes
        skips = jax.tree.map(jnp.copy, skip_weights(self.state["params"]))  # copies: the next step donates
        row = None
        if self.every.evaluation(self.step) or at_ckpt:
            row = self._log_row(self.window, self.step, self.t_win, bad, skips, evaluate=self.every.evaluation(self.step))
        else:
            self.pending = (self.window, self.step, self.t_win, bad, skips)  # logged after the next step is queued
        self.window, self.t_win = [], time.perf_counter()
        return at_ckpt, row

    def _checkpoint(self) -> None:
        self.ckpts.save(self.step, self.state, self.inputs.data_state())
        self.last_save = time.perf_counter()

    def _keep_best(self, row: dict[str, Any] | None) -> None:
        """Saves the best-validation checkpoint when ``row`` improves on it."""
        if row is not None and row["val_acc"] is not None and (self.best_val is None or row["val_acc"] > self.best_val):
            self.best_val = row["val_acc"]
            self.ckpts.save_best(self.step, self.state, self.best_val)

    def _stopped(self, stop: StopOnSigterm) -> None:
        """After the stop checkpoint: waits for it and says which process got the signal."""
        self.ckpts.wait()
        step, spe = self.step, self.every.spe
        epoch = (step - 1) // spe
        where = f"end of epoch {epoch + 1}" if step % spe == 0 else f"epoch {epoch + 1}, mid-epoch"
        if jax.process_count() == 1:
            why = f"received {stop.received}"
        else:  # only the process(es) the signal reached know it; every process stops at this step
            me = f"process {jax.process_index()} of {jax.process_count()}"
            why = (f"{me} received {stop.received}" if stop.received else
                   f"{me}: another process received SIGTERM or SIGINT") + f"; all processes stop at step {step}"
        _say(True, f"{why}: saved a checkpoint at step {step} ({where}) in {self.cfg.workdir}; "
             "rerun the same command to resume")

    def _log_row(self, window: list[tuple[Any, int]], step: int, t_start: float, bad: int | None, skips: Any,
                 evaluate: bool = False) -> dict[str, Any]:
        """Fetches ``window``'s metrics (raising NonFiniteLoss) and logs its row (metrics.jsonl and a line),
        evaluating the current state if ``evaluate``: train loss (weighted by batch size) and accuracy over the
        window, the evaluation, lr, images/s, bad images, skip weights (``skips``, device arrays).

        The window's seconds run from ``t_start`` until its metrics are on the host, i.e. until its steps have
        run, not only been queued (dispatch is asynchronous: the loop can queue a whole epoch long before it has run).
        A row fetched one step late (``pending``) ends where the next window's steps start running."""
        hist = self._fetch_finite(window, step)
        done = time.perf_counter()
        secs, n_img, spe = done - t_start, sum(n for _, n in window), self.every.spe
        self.clock.train_time += secs
        self.clock.images += n_img
        self.t_win = max(self.t_win, done)  # a pending row: the next window's first step runs from here
        evals = self.evaluator(self.state) if evaluate else {}
        row = {"epoch": step // spe if step % spe == 0 else round(step / spe, 4), "step": step,
               "train_loss": sum(float(h["loss"]) * n for h, (_, n) in zip(hist, window)) / n_img,
               "train_acc": sum(int(h["correct"]) for h in hist) / n_img, "val_loss": None, "val_acc": None,
               "test_loss": None, "test_acc": None, **evals, "lr": float(self.lr(step - 1)),
               "images_per_sec": n_img / secs, "epoch_time": secs, "bad_images": bad,
               "skip_weights": skip_values(jax.device_get(skips))}
        self.log.epoch(row)
        _say(jax.process_index() == 0, _epoch_line(self.cfg, row))
        return row

    def _agree(self, since_save: float) -> tuple[int | None, float]:
        """(bad images skipped so far, summed over processes, or None for the resident path; process 0's seconds
        since the last save): every process gets the same values, so every process takes the same decision.
        One small all-gather at row steps, only for several processes and only when something needs it."""
        bad = self.inputs.bad_images()
        if bad is not None:
            bad += self.evaluator.bad
        if jax.process_count() == 1 or (bad is None and not self.cfg.checkpoint_every_minutes):
            return bad, since_save
        from jax.experimental import multihost_utils

        got = np.asarray(multihost_utils.process_allgather(np.array([bad or 0, since_save], np.float32)))
        return (None if bad is None else int(got[:, 0].sum())), float(got[0, 1])

    def _fetch_finite(self, window: list[tuple[Any, int]], step: int) -> list[dict[str, Any]]:
        """The window's metrics on the host; raises NonFiniteLoss naming the first non-finite step."""
        hist = jax.device_get([m for m, _ in window])
        if not all(h["finite"] for h in hist):
            bad = step - len(window) + 1 + [bool(h["finite"]) for h in hist].index(False)
            last = self.ckpts.latest_step()
            where = f"step {last} in {Path(self.cfg.workdir) / 'checkpoints'}" if last is not None else "none"
            raise NonFiniteLoss(f"non-finite loss or update at step {bad} (epoch {(bad - 1) // self.every.spe + 1}); "
                                f"the state was not saved; last good checkpoint: {where} (lower --lr or set --grad-clip)")
        return hist


def _epoch_line(cfg: Config, row: dict[str, Any]) -> str:
    val = f", val acc {row['val_acc']:.4f}" if row["val_acc"] is not None else ""
    test = f", test acc {row['test_acc']:.4f}" if row["test_acc"] is not None else ""
    bad = f", {row['bad_images']} bad images skipped" if row["bad_images"] else ""
    return (f"epoch {row['epoch']}/{cfg.epochs} step {row['step']}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}{val}{test}{bad}, {row['images_per_sec']:.0f} img/s, {row['epoch_time']:.1f}s")


# ----------------------------------------------------------------------------- compile, run the loop, summarise

@dataclasses.dataclass(frozen=True)
class _About:
    """What the summary says about the run's setup: the input path, class names, normalisation, convolution."""

    input: str
    classes: tuple[str, ...] | None
    mean: Any
    std: Any
    conv_impl: str


def _train(loop: Loop, state: State, start_step: int, about: _About, wall0: float) -> dict[str, Any]:
    """Compiles, runs ``loop`` from ``state`` after global step ``start_step`` and writes the summary
    (summary.json, plots, a last line); a rerun of a finished command keeps its outputs. Returns the summary,
    or {"interrupted": True, "step"} after a stop signal."""
    cfg, spe = loop.cfg, loop.every.spe
    say = lambda msg: _say(jax.process_index() == 0, msg)  # noqa: E731
    if start_step >= loop.every.end:  # rerun of a finished command: keep its outputs as they are
        say(f"nothing to do: {cfg.workdir} already holds step {start_step} (epoch {start_step // spe}); "
            "raise --epochs to train on")
        path = Path(cfg.workdir) / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {"step": start_step}
    log = RunLog(Path(cfg.workdir), enabled=jax.process_index() == 0, resume_step=start_step)
    t0 = time.perf_counter()
    loop.compile(state, start_step)
    loop.clock = _Clock(wall0, compile_time=time.perf_counter() - t0)
    if start_step:
        say(f"resumed from step {start_step} (epoch {start_step // spe + 1}, step {start_step % spe} of {spe})")
    interrupted = loop.run(log)
    log.close()
    if interrupted:
        return {"interrupted": True, "step": loop.step}
    summary = _summary(cfg, log.rows(), loop.state, loop.clock, about, finished=loop.every.end == cfg.epochs * spe)
    log.summary(summary)
    log.plots()
    at_best = summary["test_acc_at_best_val"]
    say(f"final test acc {summary['test_acc']:.4f} (at the best-val epoch: "
        f"{'n/a, no validation split' if at_best is None else f'{at_best:.4f}'}), outputs in {cfg.workdir}")
    return summary


def _summary(cfg: Config, rows: list[dict[str, Any]], state: State, clock: _Clock, about: _About, *,
             finished: bool) -> dict[str, Any]:
    """summary.json: the final and best-validation metrics, skip weights, timings, setup and provenance;
    ``finished``: the run has trained all --epochs (no --stop-after-*)."""
    final = rows[-1] if rows else {}
    with_val = [r for r in rows if r.get("val_acc") is not None]
    best = max(with_val, key=lambda r: r["val_acc"]) if with_val else None  # first row of the max
    devices = jax.devices()
    init = Path(cfg.workdir) / "skip_weights_init.json"
    return {
        "test_acc": final.get("test_acc"), "test_loss": final.get("test_loss"), "val_acc": final.get("val_acc"),
        "epoch": final.get("epoch"), "step": final.get("step"), "finished": finished,
        "test_acc_at_best_val": best["test_acc"] if best else None,
        "best_val_acc": best["val_acc"] if best else None, "best_val_epoch": best["epoch"] if best else None,
        "skip_weights": _skip_values(state),
        "skip_weights_init": json.loads(init.read_text()) if init.exists() else None,
        "num_params": int(sum(np.size(a) for a in jax.tree.leaves(state["params"]))),
        "wall_time_s": time.perf_counter() - clock.wall0, "compile_time_s": clock.compile_time,
        "first_step_time_s": clock.first_step_time, "train_time_s": clock.train_time,
        "images_per_sec": clock.images / clock.train_time if clock.train_time else None,
        "input": about.input, "bad_images": final.get("bad_images"),
        "classes": list(about.classes) if about.classes is not None else None,
        "normalization": {"mean": list(about.mean), "std": list(about.std)},
        "devices": {"count": len(devices), "processes": jax.process_count(), "platform": devices[0].platform,
                    "kind": devices[0].device_kind},
        "versions": versions(), "config": dataclasses.asdict(cfg),
        "compilation_cache": aot.cache_stats(),
        "provenance": provenance(conv_impl=about.conv_impl),
    }


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)
