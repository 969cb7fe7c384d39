"""The train and eval steps: one jit-compiled data-parallel update over a 1-D "data" mesh.

Public API (``adaresnet_jax.train`` re-exports it; ``benchmarks/`` time ``on_batch``/``on_dataset``)::

    from adaresnet_jax.optim import make_optimizer
    mesh = make_mesh()                        # 1-D mesh "data" over every device of every process
    tx, schedule = make_optimizer(cfg, steps_per_epoch)
    state = create_state(model, tx, (H, W, C), seed=0, mesh=mesh)   # {"step", "params", "batch_stats", "opt_state"}
    opts = StepOptions(mean=(...), std=(...), dtype=jnp.float32, crop_pad=4, flip=True, label_smoothing=0.1,
                       seed=0)                # or StepOptions.for_run(cfg, (mean, std), dtype, ...)
    steps = make_train_step(model, tx, opts, mesh=mesh)
    state, m = steps.on_batch(state, images_uint8, labels, key)   # a given global batch (B, H, W, C)
    perm, tail = make_epoch_batches(seed, N, B, mesh)(epoch)      # (N // B, B) int32 on device; the N % B left
    state, m = steps.on_dataset(state, x_all, y_all, perm)        # batch perm[step % (N // B)], gathered inside
    state, m = steps.on_indices(state, x_all, y_all, tail)        # a batch of given indices, gathered inside
    ev = make_eval_step(model, mesh=mesh, mean=(...), std=(...), dtype=jnp.float32)
    sums = ev(state, images_uint8, labels, mask)                  # {"loss", "correct", "count"}, summed
    Evaluator(ev, batches)(state)                                 # {"val_loss", "val_acc", ...} (batches: inputs.py)

``m`` is ``{"loss": mean loss, "correct": count, "finite": loss and update finite}``; both steps
donate ``state``. ``B`` must be a multiple of the device count. Under ``on_dataset`` everything depends only
on (seed, global step): the permutation of epoch ``e`` comes from ``fold_in(fold_in(key(seed), 1), e)``,
the augmentation of step ``s`` from ``fold_in(fold_in(key(seed), 2), s)``, the initialisation from
``key(seed, impl="rbg")``; so a resumed run on CPU ends with the parameters of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from adaresnet_jax.data import augment, normalize

if TYPE_CHECKING:
    from adaresnet_jax.config import Config

State = dict[str, Any]


# ----------------------------------------------------------------------------- mesh and arrays

def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis "data" over ``devices`` (default: all devices of all processes), Auto axes."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicate(x: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """A host array (the same on every process) as a global array replicated on every device of ``mesh``."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


def shard_batch(x: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """A host array (the same global batch on every process) split along axis 0 over the "data" axis."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("data")), lambda idx: x[idx])


# ----------------------------------------------------------------------------- state and steps

def _key(seed: int, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), stream)


def create_state(model: Any, tx: optax.GradientTransformation, image_shape: tuple[int, ...], *,
                 seed: int, mesh: jax.sharding.Mesh) -> State:
    """{"step": int32, "params", "batch_stats", "opt_state"}, created replicated on ``mesh``.

    The initialisation key is an RBG key (``jax.random.key(seed, impl="rbg")``): with threefry, XLA on
    CPU takes ~45 s to compile a ResNet-20's initialisation (one unrolled threefry per kernel), with
    RBG ~3 s. Same seed, same parameters on the same backend.
    """
    return jax.jit(_init_fn(model, tx, image_shape, seed), out_shardings=NamedSharding(mesh, P()))()


def abstract_state(model: Any, tx: optax.GradientTransformation, image_shape: tuple[int, ...], *,
                   mesh: jax.sharding.Mesh) -> State:
    """create_state's shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves), computing nothing."""
    repl = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                        jax.eval_shape(_init_fn(model, tx, image_shape, 0)))


def _init_fn(model: Any, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
             seed: int) -> Callable[[], State]:
    def init() -> State:
        key = jax.random.key(seed, impl="rbg")
        v = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        return {"step": jnp.zeros((), jnp.int32), "params": v["params"], "batch_stats": v["batch_stats"],
                "opt_state": tx.init(v["params"])}
    return init


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The entry points of one update (all jitted, state donated, same computation).

    on_batch(state, images_uint8 (B, H, W, C), labels (B,), key) -> (state, metrics)
    on_dataset(state, x_all uint8 (N, H, W, C), y_all (N,), perm int32 (S, B)) -> (state, metrics):
      gathers batch ``perm[state["step"] % steps_per_epoch]`` on device (``steps_per_epoch`` defaults
      to S); augmentation key from (seed, step).
    on_indices(state, x_all, y_all, idx int32 (b,)) -> (state, metrics): gathers the given indices (the
      last partial batch of an epoch); the same augmentation key rule.
    """

    on_batch: Callable[..., tuple[State, dict[str, jax.Array]]]
    on_dataset: Callable[..., tuple[State, dict[str, jax.Array]]]
    on_indices: Callable[..., tuple[State, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What a train step does to a batch besides the model and optimizer.

    ``mean``/``std``: per-channel normalisation of the uint8 images (inside the step); ``dtype``: the compute
    dtype; ``crop_pad``/``flip``: augmentation inside the step (``0``/``False`` disable it: the streaming path
    augments on the host); ``label_smoothing``; ``seed``: of the augmentation keys; ``steps_per_epoch``: what
    ``on_dataset`` counts steps modulo (None: the rows of ``perm``; S + 1 when each epoch ends with a partial
    batch).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: Any = jnp.float32
    crop_pad: int = 0
    flip: bool = False
    label_smoothing: float = 0.0
    seed: int = 0
    steps_per_epoch: int | None = None

    @classmethod
    def for_run(cls, cfg: Config, norm: tuple[tuple[float, ...], tuple[float, ...]], dtype: Any, *,
                steps_per_epoch: int, streaming: bool) -> StepOptions:
        """A run's options (also what ``--compile-only`` compiles): augmentation inside the step on the resident
        path; none when streaming (the host augments). ``norm``: (mean, std)."""
        common = dict(mean=norm[0], std=norm[1], dtype=dtype, label_smoothing=cfg.label_smoothing,
                      seed=cfg.seed)
        if streaming:
            return cls(**common)
        return cls(**common, crop_pad=cfg.crop_pad if cfg.augment else 0, flip=cfg.augment and cfg.flip,
                   steps_per_epoch=steps_per_epoch)


def make_train_step(model: Any, tx: optax.GradientTransformation, opts: StepOptions, *,
                    mesh: jax.sharding.Mesh) -> TrainStep:
    """The train step: augment + normalise (in the step), forward, backward, optimizer, BN statistics.

    The batch is constrained to the "data" axis, so BatchNorm statistics and the loss are over the
    global batch whatever the device count. See :class:`StepOptions` for ``opts``.
    """
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    num_classes, crop_pad, flip, seed = model.num_classes, opts.crop_pad, opts.flip, opts.seed

    def update(state: State, images: jax.Array, labels: jax.Array, key: jax.Array):
        images = jax.lax.with_sharding_constraint(images, data)
        labels = jax.lax.with_sharding_constraint(labels, data)
        if crop_pad or flip:
            images = augment(key, images, crop_pad=crop_pad, flip=flip)
        x = normalize(images, opts.mean, opts.std, opts.dtype)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), opts.label_smoothing)

        def loss_fn(params):
            logits, new = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x,
                                      train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy(logits, targets).mean(), (logits, new["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                     "batch_stats": batch_stats, "opt_state": opt_state}
        correct = jnp.sum(jnp.argmax(logits, -1) == labels, dtype=jnp.int32)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(updates))
        return new_state, {"loss": loss, "correct": correct, "finite": finite}

    def from_indices(state: State, x_all: jax.Array, y_all: jax.Array, idx: jax.Array):
        idx = jax.lax.with_sharding_constraint(idx, data)  # each device gathers its own slice
        images, labels = jnp.take(x_all, idx, axis=0, mode="clip"), jnp.take(y_all, idx, axis=0, mode="clip")
        return update(state, images, labels, jax.random.fold_in(_key(seed, 2), state["step"]))

    def from_dataset(state: State, x_all: jax.Array, y_all: jax.Array, perm: jax.Array):
        row = state["step"] % (opts.steps_per_epoch or perm.shape[0])
        return from_indices(state, x_all, y_all, jax.lax.dynamic_index_in_dim(perm, row, keepdims=False))

    def jit(fn: Callable[..., Any], in_shardings: tuple[NamedSharding, ...]) -> Callable[..., Any]:
        return jax.jit(fn, in_shardings=in_shardings, out_shardings=(repl, repl), donate_argnums=(0,))

    return TrainStep(on_batch=jit(update, (repl, data, data, repl)), on_dataset=jit(from_dataset, (repl,) * 4),
                     on_indices=jit(from_indices, (repl,) * 4))


def steps_per_epoch(cfg: Config, n: int, n_dev: int) -> int:
    """Steps an epoch of ``n`` training images: full batches, plus one for the last partial batch with
    --no-drop-last (cut to a multiple of the device count ``n_dev``; none if that leaves nothing)."""
    return n // cfg.batch_size + (0 if cfg.drop_last or n % cfg.batch_size < n_dev else 1)


class Batch(NamedTuple):
    """One training batch as an input yields it (:mod:`adaresnet_jax.inputs`): ``entry``, the :class:`TrainStep`
    entry point that takes it ("on_batch", "on_dataset" or "on_indices"); ``args``, its arguments after the
    state; ``images``, how many images it holds."""

    entry: str
    args: tuple[Any, ...]
    images: int


class CompiledStep:
    """``train_step`` compiled ahead of time for ``state`` and the batches like ``examples`` (one per entry point
    used), so no step is timed with its compile: ``compiled(state, batch) -> (state, metrics)``."""

    def __init__(self, train_step: TrainStep, state: State, examples: list[Batch]) -> None:
        self.fns = {b.entry: getattr(train_step, b.entry).lower(state, *b.args).compile() for b in examples}

    def __call__(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        return self.fns[batch.entry](state, *batch.args)


def make_eval_step(model: Any, *, mesh: jax.sharding.Mesh, mean: tuple[float, ...], std: tuple[float, ...],
                   dtype: Any = jnp.float32) -> Callable[..., dict[str, jax.Array]]:
    """eval(state, images_uint8 (B, ...), labels (B,), mask (B,) bool) -> summed {"loss", "correct", "count"}."""
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def ev(state: State, images: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        x = normalize(images, mean, std, dtype)
        logits = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        m = mask.astype(jnp.float32)
        return {"loss": jnp.sum(loss * m), "correct": jnp.sum((jnp.argmax(logits, -1) == labels) & mask),
                "count": jnp.sum(mask, dtype=jnp.int32)}

    return jax.jit(ev, in_shardings=(repl, data, data, data), out_shardings=repl)


def make_epoch_batches(seed: int, n: int, batch_size: int, mesh: jax.sharding.Mesh,
                       multiple: int = 1) -> Callable[[int], tuple[jax.Array, jax.Array | None]]:
    """epoch -> (perm, tail) from one permutation of epoch ``e``, int32 replicated: ``perm`` (n // batch_size,
    batch_size) the shuffled full batches; ``tail`` the ``n % batch_size`` indices left over, cut to a multiple
    of ``multiple`` (the device count), or None when there are none."""
    steps, size = n // batch_size, n % batch_size // multiple * multiple
    start = steps * batch_size

    @jax.jit
    def split(epoch: jax.Array) -> tuple[jax.Array, jax.Array]:
        p = jax.random.permutation(jax.random.fold_in(_key(seed, 1), epoch), n).astype(jnp.int32)
        return p[:start].reshape(steps, batch_size), p[start:start + size]

    def batches(epoch: int) -> tuple[jax.Array, jax.Array | None]:
        perm, tail = split(replicate(np.int32(epoch), mesh))
        return perm, tail if size else None

    return batches


def make_epoch_permutation(seed: int, n: int, batch_size: int, mesh: jax.sharding.Mesh) -> Callable[[int], jax.Array]:
    """epoch -> (n // batch_size, batch_size) int32 replicated: epoch ``e``'s shuffled batches (the rest dropped)."""
    batches = make_epoch_batches(seed, n, batch_size, mesh)
    return lambda epoch: batches(epoch)[0]


def make_epoch_tail(seed: int, n: int, batch_size: int, mesh: jax.sharding.Mesh,
                    multiple: int = 1) -> Callable[[int], jax.Array | None]:
    """epoch -> the indices that :func:`make_epoch_permutation` leaves over (see :func:`make_epoch_batches`)."""
    batches = make_epoch_batches(seed, n, batch_size, mesh, multiple)
    return lambda epoch: batches(epoch)[1]


class EvalBatches(Protocol):
    """Where an :class:`Evaluator` gets its batches (:mod:`adaresnet_jax.inputs`): ``names`` of the splits,
    ``example()`` one batch's (images, labels, mask) or their ShapeDtypeStructs, ``__iter__`` -> (split
    index, images, labels, mask) for every batch of every split, ``bad``: images that did not decode so far."""

    names: tuple[str, ...]
    bad: int

    def example(self) -> tuple[Any, Any, Any]: ...

    def __iter__(self) -> Iterator[tuple[int, jax.Array, jax.Array, jax.Array]]: ...


class Evaluator:
    """Loss and accuracy over every example of each split of ``batches`` exactly once (padded rows masked):
    ``evaluator(state) -> {"<split>_loss", "<split>_acc", ...}``. ``bad``: images the batches could not decode."""

    def __init__(self, eval_step: Callable[..., Any], batches: EvalBatches) -> None:
        self.eval_step, self.batches = eval_step, batches

    @property
    def bad(self) -> int:
        return self.batches.bad

    def compile(self, state: State) -> None:
        """Compiles the eval step ahead of time for ``state``'s shardings (so no evaluation is timed with it)."""
        if self.batches.names:  # every batch has the same shape
            self.eval_step = self.eval_step.lower(state, *self.batches.example()).compile()

    def __call__(self, state: State) -> dict[str, float | None]:
        sums: list[Any] = [None] * len(self.batches.names)
        for split, x, y, mask in self.batches:
            out = self.eval_step(state, x, y, mask)
            sums[split] = out if sums[split] is None else jax.tree.map(jnp.add, sums[split], out)
        result: dict[str, float | None] = {}
        for name, tot in zip(self.batches.names, jax.device_get(sums)):
            count = max(int(tot["count"]), 1)
            result[f"{name}_loss"], result[f"{name}_acc"] = float(tot["loss"]) / count, float(tot["correct"]) / count
        return result
