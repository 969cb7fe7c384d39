"""The two input paths behind the training loop of :mod:`adaresnet_jax.train`: they only yield batches.

* :class:`ResidentInput`: the uint8 training set replicated on every device; each step gathers its batch
  from an on-device permutation inside the compiled update, so a batch is the arguments of
  ``TrainStep.on_dataset`` (or ``on_indices`` for an epoch's last partial batch). Fast, and every batch is a
  function of (seed, step).
* :class:`StreamingInput`: :class:`adaresnet_jax.data.streaming.TrainStream` reads, decodes and augments
  this process's rows of each global batch on the host (grain); :class:`DevicePrefetch` (a background
  thread) assembles them into global arrays on the "data" mesh (``jax.make_array_from_process_local_data``)
  two steps ahead: a batch is the arguments of ``TrainStep.on_batch``.

Both (made by :func:`open_input`): ``examples(start_step)`` (one :class:`adaresnet_jax.steps.Batch` per entry
point used, to compile), ``batch(step) -> Batch``, ``data_state()`` (bytes for the checkpoint, or None),
``bad_images()`` (None for the resident path) and ``close()``. The evaluation batches of both paths
(:func:`open_eval`: :class:`ResidentEval`, :class:`StreamingEval`) feed :class:`adaresnet_jax.steps.Evaluator`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from adaresnet_jax.config import Config
from adaresnet_jax.data import Dataset
from adaresnet_jax.data.streaming import DataError, StreamingData, TrainImages, TrainStream, check_bad, \
    default_threads, eval_batches
from adaresnet_jax.steps import Batch, make_epoch_batches, replicate, shard_batch


# ----------------------------------------------------------------------------- training batches

class ResidentInput:
    """Batches gathered on device from the replicated training set (see the module docstring)."""

    def __init__(self, ds: Dataset, mesh: Any, *, batch_size: int, seed: int, steps_per_epoch: int) -> None:
        self.spe, self.bs = steps_per_epoch, batch_size
        self.full = len(ds.x_train) // self.bs  # full batches an epoch; spe is full + 1 with a partial last one
        self.x_all, self.y_all = replicate(ds.x_train, mesh), replicate(ds.y_train.astype(np.int32), mesh)
        self.epoch_batches = make_epoch_batches(seed, len(ds.x_train), self.bs, mesh, multiple=jax.device_count())
        self.epoch = -1

    def _set_epoch(self, epoch: int) -> None:
        self.perm, tail = self.epoch_batches(epoch)
        self.tail = tail if self.spe > self.full else None
        self.epoch = epoch

    def examples(self, start_step: int) -> list[Batch]:
        self._set_epoch(start_step // self.spe)
        full = Batch("on_dataset", (self.x_all, self.y_all, self.perm), self.bs)
        return [full] if self.tail is None else [full, Batch("on_indices", (self.x_all, self.y_all, self.tail), 0)]

    def batch(self, step: int) -> Batch:
        epoch, i = divmod(step, self.spe)
        if epoch != self.epoch:
            self._set_epoch(epoch)
        if i == self.full:
            return Batch("on_indices", (self.x_all, self.y_all, self.tail), int(self.tail.shape[0]))
        return Batch("on_dataset", (self.x_all, self.y_all, self.perm), self.bs)

    def data_state(self) -> bytes | None:
        return None

    def bad_images(self) -> int | None:
        return None

    def close(self) -> None:
        pass


def _global(sharding: NamedSharding, local: np.ndarray, rows: int) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local, (rows, *local.shape[1:]))


class StreamingInput:
    """Batches streamed from the host (see the module docstring): ``stream``'s host batches placed on ``mesh``;
    raises DataError when more than ``max_bad`` of the training images this process reads do not decode."""

    def __init__(self, sd: StreamingData, mesh: Any, stream: TrainStream, *, max_bad: float,
                 saved: bytes | None = None) -> None:
        self.sd, self.max_bad, self.bs, self.size = sd, max_bad, stream.spec.batch, stream.spec.size
        self.data = NamedSharding(mesh, P("data"))
        self.key = jax.jit(lambda: jax.random.key(0), out_shardings=NamedSharding(mesh, P()))()  # unused by it
        self.prefetch = DevicePrefetch(stream, self._place, size=2)
        self.state_bytes, self.bad, self.distinct = saved, 0, set()

    def _place(self, item: dict[str, Any]) -> tuple[jax.Array, jax.Array, list[int], bytes]:
        return (_global(self.data, item["image"], self.bs), _global(self.data, item["label"], self.bs),
                item["bad"], item["state"])

    def examples(self, start_step: int) -> list[Batch]:
        x = jax.ShapeDtypeStruct((self.bs, self.size, self.size, 3), jnp.uint8, sharding=self.data)
        y = jax.ShapeDtypeStruct((self.bs,), jnp.int32, sharding=self.data)
        return [Batch("on_batch", (x, y, self.key), self.bs)]

    def batch(self, step: int) -> Batch:
        x, y, bad, self.state_bytes = next(self.prefetch)
        if bad:
            self.bad += len(bad)
            self.distinct.update(bad)
            limit = len(self.sd.train_idx) // jax.process_count()
            check_bad(self.sd, len(self.distinct), limit, self.max_bad, sorted(self.distinct),
                      what=f"of the {limit} training images this process reads")
        return Batch("on_batch", (x, y, self.key), self.bs)

    def data_state(self) -> bytes | None:
        return self.state_bytes

    def bad_images(self) -> int | None:
        return self.bad

    def close(self) -> None:
        self.prefetch.close()


def open_input(cfg: Config, ds: Dataset | StreamingData, mesh: Any, *, steps_per_epoch: int, steps: range,
               saved: bytes | None, say: Callable[[str], None]) -> ResidentInput | StreamingInput:
    """The run's training batches for global steps ``steps`` (``steps.start``: the step resumed from);
    ``saved``: this process's input state from the checkpoint resumed (streaming), ``say``: a note to the user."""
    if not isinstance(ds, StreamingData):
        return ResidentInput(ds, mesh, batch_size=cfg.batch_size, seed=cfg.seed, steps_per_epoch=steps_per_epoch)
    spec = TrainImages(batch=cfg.batch_size, steps_per_epoch=steps_per_epoch, size=cfg.image_px, seed=cfg.seed,
                       augment=cfg.augment, flip=cfg.flip, min_area=cfg.min_crop_area, crop=cfg.eval_crop)
    workers = default_threads() if cfg.input_workers is None else cfg.input_workers
    stream = TrainStream(ds, spec, steps, workers=workers, saved=saved, say=say)
    return StreamingInput(ds, mesh, stream, max_bad=cfg.max_bad_images, saved=saved)


# ----------------------------------------------------------------------------- evaluation batches

class ResidentEval:
    """Every example of each split, padded to whole batches (mask False on the padding), sharded on the devices
    once (see :class:`adaresnet_jax.steps.EvalBatches`)."""

    bad = 0

    def __init__(self, splits: dict[str, tuple[np.ndarray, np.ndarray]], batch_size: int, mesh: Any) -> None:
        self.batches: list[list[tuple[jax.Array, ...]]] = []
        names = []
        for name, (x, y) in splits.items():
            if len(x) == 0:
                continue
            pad = -len(x) % batch_size
            xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            yp = np.concatenate([y, np.zeros(pad, y.dtype)]).astype(np.int32)
            mask = np.arange(len(xp)) < len(x)
            names.append(name)
            self.batches.append([tuple(shard_batch(a[i:i + batch_size], mesh) for a in (xp, yp, mask))
                                 for i in range(0, len(xp), batch_size)])
        self.names = tuple(names)

    def example(self) -> tuple[Any, ...]:
        return self.batches[0][0]

    def __iter__(self) -> Iterator[tuple[int, jax.Array, jax.Array, jax.Array]]:
        return ((split, *b) for split, batches in enumerate(self.batches) for b in batches)


class StreamingEval:
    """Every image of each evaluation split once, streamed like training batches (evaluation transform), see
    :class:`adaresnet_jax.steps.EvalBatches`. ``bad``: images that did not decode (left out of the metrics)."""

    def __init__(self, sd: StreamingData, batch: int, mesh: Any, cfg: Config) -> None:
        named = [("val", sd.train_records, sd.val_idx), ("test", sd.test_records, sd.test_idx)]
        self.names, self.records, self.splits = zip(*[(n, r, i) for n, r, i in named if len(i)])
        self.batch, self.bad = batch, 0
        self.data = NamedSharding(mesh, P("data"))
        self.size, self.crop = cfg.image_px, cfg.eval_crop
        self.workers = default_threads() if cfg.input_workers is None else cfg.input_workers

    def example(self) -> tuple[Any, ...]:
        shape = lambda *s, dt: jax.ShapeDtypeStruct((self.batch, *s), dt, sharding=self.data)  # noqa: E731
        return shape(self.size, self.size, 3, dt=jnp.uint8), shape(dt=jnp.int32), shape(dt=jnp.bool_)

    def _place(self, item: dict[str, Any]) -> tuple[Any, ...]:
        return (*(_global(self.data, item[k], self.batch) for k in ("image", "label", "mask")),
                int(item["split"][0]), len(item["bad"]))

    def __iter__(self) -> Iterator[tuple[int, jax.Array, jax.Array, jax.Array]]:
        batches = DevicePrefetch(eval_batches(self.records, self.splits, batch=self.batch, size=self.size,
                                              crop=self.crop, workers=self.workers), self._place)
        try:
            for x, y, mask, split, bad in batches:
                yield split, x, y, mask
                self.bad += bad
        finally:
            batches.close()


def open_eval(cfg: Config, ds: Dataset | StreamingData, batch_size: int, mesh: Any) -> ResidentEval | StreamingEval:
    """The run's evaluation batches (validation, then test; empty splits left out)."""
    if isinstance(ds, StreamingData):
        return StreamingEval(ds, batch_size, mesh, cfg)
    return ResidentEval({"val": (ds.x_val, ds.y_val), "test": (ds.x_test, ds.y_test)}, batch_size, mesh)


class DevicePrefetch:
    """Runs ``place(item)`` (host batch -> device arrays) for the items of ``source`` in a background thread,
    ``size`` items ahead, so the step finds its batch on the devices when the host keeps up. Errors in
    the thread are raised by ``next``; ``close`` stops the thread and closes ``source``."""

    _END = object()

    def __init__(self, source: Iterator[Any], place: Callable[[Any], Any], size: int = 2) -> None:
        self.source, self.place = source, place
        self._q: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self.source:
                if not self._put(self.place(item)):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            self._put(e)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


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
    size = cfg.image_px
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
