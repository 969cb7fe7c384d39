"""The two input paths behind the training loop of :mod:`adaresnet_jax.train`, with one interface.

* :class:`ResidentInput`: the uint8 training set replicated on every device; each step gathers its batch
  from an on-device permutation inside the compiled update (``TrainStep.on_dataset``). Fast, and every
  batch is a function of (seed, step).
* :class:`StreamingInput`: :class:`adaresnet_jax.data.streaming.TrainStream` reads, decodes and augments
  this process's rows of each global batch on the host (grain); a background thread assembles them into
  global arrays on the "data" mesh (``jax.make_array_from_process_local_data``) two steps ahead, and the
  step is ``TrainStep.on_batch``. :class:`StreamingEvaluator` evaluates the same way.

Both: ``compile(state, start_step)``, ``step(state, step) -> (state, metrics, images)``, ``data_state()``
(bytes for the checkpoint, or None), ``bad_images()`` (None for the resident path) and ``close()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from adaresnet_jax.config import Config
from adaresnet_jax.data import Dataset
from adaresnet_jax.data.streaming import DataError, DevicePrefetch, StreamingData, TrainStream, check_bad, \
    default_threads, eval_batches
from adaresnet_jax.steps import State, TrainStep, make_epoch_permutation, make_epoch_tail, make_train_step, replicate


def train_step_for(cfg: Config, model: Any, tx: Any, mesh: Any, spe: int, mean: Any, std: Any, dtype: Any, *,
                   streaming: bool) -> TrainStep:
    """The train step of a run (also what ``--compile-only`` compiles): augmentation inside the step on the
    resident path; nothing in the step when streaming (the host augments)."""
    if streaming:
        return make_train_step(model, tx, mesh=mesh, mean=mean, std=std, label_smoothing=cfg.label_smoothing,
                               dtype=dtype, seed=cfg.seed)
    return make_train_step(model, tx, mesh=mesh, mean=mean, std=std, crop_pad=cfg.crop_pad if cfg.augment else 0,
                           flip=cfg.augment and cfg.flip, label_smoothing=cfg.label_smoothing, dtype=dtype,
                           seed=cfg.seed, steps_per_epoch=spe)


class ResidentInput:
    """Batches gathered on device from the replicated training set (see the module docstring)."""

    def __init__(self, cfg: Config, ds: Dataset, model: Any, tx: Any, mesh: Any, spe: int, mean: Any, std: Any,
                 dtype: Any) -> None:
        self.spe, self.bs = spe, cfg.batch_size
        self.full = len(ds.x_train) // self.bs  # full batches an epoch; spe is full + 1 with a partial last one
        self.x_all, self.y_all = replicate(ds.x_train, mesh), replicate(ds.y_train.astype(np.int32), mesh)
        self.steps = train_step_for(cfg, model, tx, mesh, spe, mean, std, dtype, streaming=False)
        self.epoch_perm = make_epoch_permutation(cfg.seed, len(ds.x_train), self.bs, mesh)
        self.epoch_tail = make_epoch_tail(cfg.seed, len(ds.x_train), self.bs, mesh, multiple=jax.device_count())
        self.epoch = -1

    def _set_epoch(self, epoch: int) -> None:
        self.perm = self.epoch_perm(epoch)
        self.tail = self.epoch_tail(epoch) if self.spe > self.full else None
        self.epoch = epoch

    def compile(self, state: State, start_step: int) -> None:
        self._set_epoch(start_step // self.spe)
        self.step_fn = self.steps.on_dataset.lower(state, self.x_all, self.y_all, self.perm).compile()
        self.tail_fn = None if self.tail is None else \
            self.steps.on_indices.lower(state, self.x_all, self.y_all, self.tail).compile()

    def step(self, state: State, step: int) -> tuple[State, dict[str, jax.Array], int]:
        epoch, i = divmod(step, self.spe)
        if epoch != self.epoch:
            self._set_epoch(epoch)
        if i == self.full:
            return *self.tail_fn(state, self.x_all, self.y_all, self.tail), int(self.tail.shape[0])
        return *self.step_fn(state, self.x_all, self.y_all, self.perm), self.bs

    def data_state(self) -> bytes | None:
        return None

    def bad_images(self) -> int | None:
        return None

    def close(self) -> None:
        pass


def _global(sharding: NamedSharding, local: np.ndarray, rows: int) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local, (rows, *local.shape[1:]))


class StreamingInput:
    """Batches streamed from the host (see the module docstring). ``saved``: this process's input state
    from the checkpoint being resumed (or None)."""

    def __init__(self, cfg: Config, sd: StreamingData, model: Any, tx: Any, mesh: Any, spe: int, mean: Any,
                 std: Any, dtype: Any, *, start_step: int, end_step: int, saved: bytes | None,
                 say: Callable[[str], None]) -> None:
        self.cfg, self.sd, self.bs = cfg, sd, cfg.batch_size
        self.size = cfg.image_size or 224
        self.data = NamedSharding(mesh, P("data"))
        self.steps = train_step_for(cfg, model, tx, mesh, spe, mean, std, dtype, streaming=True)
        self.key = jax.jit(lambda: jax.random.key(0), out_shardings=NamedSharding(mesh, P()))()  # unused by it
        workers = default_threads() if cfg.input_workers is None else cfg.input_workers
        self.stream = TrainStream(sd, batch=self.bs, steps_per_epoch=spe, end_step=end_step, start_step=start_step,
                                  size=self.size, seed=cfg.seed, augment=cfg.augment, flip=cfg.flip,
                                  min_area=cfg.min_crop_area, crop=cfg.eval_crop, workers=workers, saved=saved,
                                  say=say)
        self.prefetch = DevicePrefetch(self.stream, self._place, size=2)
        self.state_bytes, self.bad, self.distinct = saved, 0, set()

    def _place(self, item: dict[str, Any]) -> tuple[jax.Array, jax.Array, list[int], bytes]:
        return (_global(self.data, item["image"], self.bs), _global(self.data, item["label"], self.bs),
                item["bad"], item["state"])

    def compile(self, state: State, start_step: int) -> None:
        x = jax.ShapeDtypeStruct((self.bs, self.size, self.size, 3), jnp.uint8, sharding=self.data)
        y = jax.ShapeDtypeStruct((self.bs,), jnp.int32, sharding=self.data)
        self.step_fn = self.steps.on_batch.lower(state, x, y, self.key).compile()

    def step(self, state: State, step: int) -> tuple[State, dict[str, jax.Array], int]:
        x, y, bad, self.state_bytes = next(self.prefetch)
        if bad:
            self.bad += len(bad)
            self.distinct.update(bad)
            limit = len(self.sd.train_idx) // jax.process_count()
            check_bad(self.sd, len(self.distinct), limit, self.cfg.max_bad_images, sorted(self.distinct),
                      what=f"of the {limit} training images this process reads")
        return *self.step_fn(state, x, y, self.key), self.bs

    def data_state(self) -> bytes | None:
        return self.state_bytes

    def bad_images(self) -> int | None:
        return self.bad

    def close(self) -> None:
        self.prefetch.close()


class StreamingEvaluator:
    """Every image of each evaluation split once, streamed like training batches (evaluation transform);
    the same interface as :class:`adaresnet_jax.steps.Evaluator`. ``bad``: images that did not decode
    (left out of the metrics)."""

    def __init__(self, eval_step: Callable[..., Any], sd: StreamingData, batch: int, mesh: Any, cfg: Config) -> None:
        named = [("val", sd.train_records, sd.val_idx), ("test", sd.test_records, sd.test_idx)]
        self.names, self.records, self.splits = zip(*[(n, r, i) for n, r, i in named if len(i)])
        self.eval_step, self.batch, self.bad = eval_step, batch, 0
        self.data = NamedSharding(mesh, P("data"))
        self.size, self.crop = cfg.image_size or 224, cfg.eval_crop
        self.workers = default_threads() if cfg.input_workers is None else cfg.input_workers

    def compile(self, state: State) -> None:
        shape = lambda *s, dt: jax.ShapeDtypeStruct((self.batch, *s), dt, sharding=self.data)  # noqa: E731
        self.eval_step = self.eval_step.lower(state, shape(self.size, self.size, 3, dt=jnp.uint8),
                                              shape(dt=jnp.int32), shape(dt=jnp.bool_)).compile()

    def _place(self, item: dict[str, Any]) -> tuple[Any, ...]:
        return (*(_global(self.data, item[k], self.batch) for k in ("image", "label", "mask")),
                int(item["split"][0]), len(item["bad"]))

    def __call__(self, state: State) -> dict[str, float | None]:
        sums: list[Any] = [None] * len(self.names)
        batches = DevicePrefetch(eval_batches(self.records, self.splits, batch=self.batch, size=self.size,
                                              crop=self.crop, workers=self.workers), self._place)
        try:
            for x, y, mask, split, bad in batches:
                out = self.eval_step(state, x, y, mask)
                sums[split] = out if sums[split] is None else jax.tree.map(jnp.add, sums[split], out)
                self.bad += bad
        finally:
            batches.close()
        result: dict[str, float | None] = {}
        for name, tot in zip(self.names, jax.device_get(sums)):
            count = max(int(tot["count"]), 1)
            result[f"{name}_loss"], result[f"{name}_acc"] = float(tot["loss"]) / count, float(tot["correct"]) / count
        return result


# ----------------------------------------------------------------------------- which path

def open_data(cfg: Config, say: Callable[[str], None]) -> tuple[Dataset | StreamingData, tuple[str, ...] | None]:
    """(data, class names or None): a :class:`Dataset` for the resident path or a :class:`StreamingData` for
    the streaming one, as ``--input`` says (auto: resident when the decoded training set fits
    ``--resident-budget-mb``). Image folders and TFDS sets that go resident are decoded here, at
    ``image_size`` with the evaluation transform. Raises DataError (one line) for bad input."""
    from adaresnet_jax.data import load_dataset
    from adaresnet_jax.data.sources import channel_stats, validate
    from adaresnet_jax.data.streaming import decode_many, open_streaming

    kw = dict(val_split=cfg.val_split, seed=cfg.seed, max_train=cfg.max_train, max_test=cfg.max_test)
    sd = open_streaming(cfg.dataset, cfg.data_dir, **kw)
    if sd is None:
        if cfg.input == "streaming":
            raise DataError(f"--input streaming reads an image folder (--data-dir with train/<class>/) or a TFDS "
                            f"data set prepared as ArrayRecord; --dataset {cfg.dataset} is read into memory: use "
                            "--input resident (or auto)")
        return load_dataset(cfg.dataset, cfg.data_dir, **kw), None
    size = cfg.image_size or 224
    mb, budget = sd.decoded_mb(size), cfg.resident_budget_mb
    if cfg.input == "streaming" or (cfg.input == "auto" and mb > budget):
        if cfg.input == "auto":
            say(f"train.py: {cfg.dataset}: the decoded training set ({mb:.0f} MB) exceeds --resident-budget-mb "
                f"{budget:g}: streaming it from the host")
        return sd, sd.classes
    if mb > budget:
        raise DataError(f"the decoded training set of {cfg.dataset} ({mb:.0f} MB at {size} px) exceeds "
                        f"--resident-budget-mb {budget:g}: use --input streaming (or auto), or raise the budget")
    if sd.kind == "tfds" and sd.image_shape is not None:  # a fixed-size TFDS set: the resident loader as before
        return load_dataset(cfg.dataset, cfg.data_dir, **kw), sd.classes
    splits, bad = {}, 0
    for name, records, idx in (("train", sd.train_records, sd.train_idx), ("val", sd.train_records, sd.val_idx),
                               ("test", sd.test_records, sd.test_idx)):
        x, y, skipped = decode_many(records, idx, size, cfg.eval_crop)
        splits[name], bad = (x, y), bad + len(skipped)
        check_bad(sd, len(skipped), len(idx), cfg.max_bad_images, skipped, what=f"of the {len(idx)} {name} images")
    if bad:
        say(f"train.py: warning: {bad} images of {cfg.dataset} could not be decoded and were left out")
    ds = Dataset(cfg.dataset, *splits["train"], *splits["val"], *splits["test"], sd.num_classes,
                 *channel_stats(splits["train"][0]))
    validate(ds)
    return ds, sd.classes
