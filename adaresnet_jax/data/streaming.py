"""The streaming input path: read, decode and augment on the host with grain, batch onto the devices.

For data sets that do not fit the resident path (every image on every device). Sources are random
access: an image folder (:mod:`.folder`) or a TFDS data set prepared as ArrayRecord (``tfds.data_source``
with the images left encoded; no TensorFlow). Decoding and crops are :mod:`.images` (Pillow).

**What batch a step sees** depends only on (seed, step), never on the process, worker or thread count:
epoch ``e`` visits the training images in the order ``epoch_order(seed, e, n)`` (a numpy permutation), and
step ``s`` (epoch ``s // S``, ``S`` steps an epoch, the last partial batch dropped) takes positions
``[(s % S) B, (s % S + 1) B)`` of it. Process ``p`` of ``P`` reads only rows ``[p B/P, (p+1) B/P)`` of each
global batch (grain's ``ShardByJaxProcess`` gives ``p`` and ``P``), split into chunks of at most 64 images;
each chunk is one grain element, decoded by one worker. Batching chunks happens after ``mp_prefetch``
(grain's advice for results that do not depend on ``num_workers``). Image ``i`` at epoch ``e`` is
augmented with ``np.random.default_rng([seed, 2, e, i])``. An image that does not decode is replaced by
the next image of the epoch's order that does, and counted.

**Resume.** The pipeline's position is the step. The grain iterator state (and the layout it was saved
with) goes into each checkpoint through grain's orbax handler (the "state" of each batch of :class:`TrainStream`); a run
restarted with the same layout continues from that state, and one with another worker or process count
starts a fresh iterator at the step's position: both see the same batches as a run never stopped.

**Why the order is numpy's, not the resident path's** ``jax.random.permutation``: it is computed inside
each grain worker process, and a worker that initialised JAX would claim the accelerator (and pay
seconds of start-up). The two paths therefore see different batches from the same seed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np

from adaresnet_jax.data import images as img
from adaresnet_jax.data.folder import check_data_dir, is_image_folder, scan
from adaresnet_jax.data.errors import DataError
from adaresnet_jax.data.sources import Split, channel_stats, open_tfds

RESIDENT_ONLY = ("digits", "npz", "cifar10", "cifar100")  # names that are read into memory by sources.py
CHUNK = 64  # most images one grain element (one worker's unit of work) holds
SAMPLE = 256  # training images decoded before training: normalisation statistics and a bad-file check


# ----------------------------------------------------------------------------- sources

class TfdsRecords:
    """A ``tfds.data_source`` with encoded images as ``[i] -> (bytes, label)`` (picklable, like the source)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        r = self.source[int(i)]
        return bytes(r["image"]), int(r["label"])

    def __repr__(self) -> str:
        return f"TfdsRecords({self.source!r})"


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingData:
    """A data set read image by image: records plus the indices of each split (train/val from the training
    records, with the resident path's seeded split rule; test from the evaluation records)."""

    name: str
    kind: str  # "folder" or "tfds"
    train_records: Any
    test_records: Any
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    classes: tuple[str, ...]
    image_shape: tuple[int, ...] | None  # the stored shape when every image has one (some TFDS sets)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def decoded_mb(self, image_size: int) -> float:
        """Size in MB of the uint8 training split at its stored shape, or image_size x image_size x 3."""
        shape = self.image_shape or (image_size, image_size, 3)
        return len(self.train_idx) * math.prod(shape) / 2**20

    def describe(self, i: int) -> str:
        rec = self.train_records
        return f"'{rec.path(i)}'" if hasattr(rec, "path") else f"record {i} of {self.name}'s training split"


def open_streaming(name: str, data_dir: str | None, *, val_split: float = 0.0, seed: int = 0,
                   max_train: int | None = None, max_test: int | None = None) -> StreamingData | None:
    """The data set as a :class:`StreamingData`: an image folder when ``data_dir`` has ``train/<class>/``,
    else a TFDS name; None for the in-memory sources (digits, npz, cifar10/100 archives, any file)."""
    path = Path(data_dir).expanduser() if data_dir is not None else None
    if path is not None:
        check_data_dir(path)
    if path is not None and path.is_dir() and is_image_folder(path):
        train, test, classes = scan(path)
        kind, shape = "folder", None
    elif name in RESIDENT_ONLY or (path is not None and (path.is_file() or not path.exists())):
        return None
    else:
        import tensorflow_datasets as tfds

        tr, te, features = open_tfds(name, data_dir, decoders={"image": tfds.decode.SkipDecoding()})
        if "image" not in features:
            raise DataError(f"dataset '{name}' has no 'image' feature: it is not an image-classification set")
        train, test, kind = TfdsRecords(tr), TfdsRecords(te), "tfds"
        classes = list(features["label"].names)
        shape = tuple(features["image"].shape)
        shape = shape if all(isinstance(d, int) for d in shape) else None
    train_idx, val_idx = Split(val_split, seed, max_train, max_test).indices(len(train))  # the resident path's rule
    return StreamingData(name, kind, train, test, train_idx, val_idx, np.arange(len(test))[:max_test],
                         tuple(classes), shape)


# ----------------------------------------------------------------------------- the order and the chunks

def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The positions 0..n-1 of the training split in epoch ``epoch``'s order."""
    return np.random.default_rng([seed, 1, epoch]).permutation(n)


def chunking(rows: int) -> tuple[int, int]:
    """(chunks per batch, rows per chunk) for a process's ``rows`` rows of a batch: near-equal, <= CHUNK."""
    per = -(-rows // CHUNK)
    return per, -(-rows // per)


def _concat(chunks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0] if isinstance(chunks[0][k], np.ndarray)}
    out["bad"] = [i for c in chunks for i in c["bad"]]
    return out


@dataclasses.dataclass(frozen=True)
class TrainImages:
    """How the training batches are made: ``batch`` images a step (global; the last partial batch of an epoch
    dropped), ``steps_per_epoch``, ``size`` x ``size`` pixels, ``seed`` (the order and the augmentation); with
    ``augment`` a random-resized crop of at least ``min_area`` of the image and a random horizontal ``flip``,
    else the evaluation transform (centre ``crop``)."""

    batch: int
    steps_per_epoch: int
    size: int
    seed: int
    augment: bool
    flip: bool = True
    min_area: float = 0.08
    crop: float = 0.875


class _TrainChunks:
    """grain map function: element k -> chunk ``k % cpb`` of this process's rows of step ``k // cpb``."""

    def __init__(self, sd: StreamingData, spec: TrainImages, *, process: int, processes: int) -> None:
        self.records, self.idx, self.spec = sd.train_records, sd.train_idx, spec
        self.batch, self.spe, self.size, self.seed = spec.batch, spec.steps_per_epoch, spec.size, spec.seed
        self.rows = spec.batch // processes
        self.first = process * self.rows
        self.cpb, self.per = chunking(self.rows)
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.seed, epoch, len(self.idx))}  # keep one epoch's
        return self._orders[epoch]

    def render(self, data: bytes, index: int, epoch: int) -> np.ndarray | None:
        if not self.spec.augment:
            return img.eval_image(data, self.size, self.spec.crop)
        rng = np.random.default_rng([self.seed, 2, epoch, int(index)])
        return img.train_image(data, self.size, rng, min_area=self.spec.min_area, flip=self.spec.flip)

    def __call__(self, k: int) -> dict[str, Any]:
        step, c = divmod(int(k), self.cpb)
        epoch, i = divmod(step, self.spe)
        order, n = self.order(epoch), len(self.idx)
        lo, hi = c * self.per, min((c + 1) * self.per, self.rows)
        x = np.zeros((hi - lo, self.size, self.size, 3), np.uint8)
        y = np.zeros(hi - lo, np.int32)
        bad = []
        for r, pos in enumerate(range(i * self.batch + self.first + lo, i * self.batch + self.first + hi)):
            for j in range(n):  # the image at this position, else the next ones of the epoch's order
                index = int(self.idx[order[(pos + j) % n]])
                data, label = self.records[index]
                out = self.render(data, index, epoch)
                if out is not None:
                    x[r], y[r] = out, label
                    break
                bad.append(index)
                if len(bad) > 16 * (hi - lo):
                    raise DataError(f"no decodable image among {len(bad)} tried for step {step}")
        return {"image": x, "label": y, "bad": bad}


class _EvalChunks:
    """grain map function over the evaluation batches of several splits, in order; padded rows masked."""

    def __init__(self, records: Sequence[Any], splits: Sequence[np.ndarray], *, batch: int, process: int,
                 processes: int, size: int, crop: float) -> None:
        self.records, self.splits, self.batch, self.size, self.crop = records, splits, batch, size, crop
        self.rows = batch // processes
        self.first = process * self.rows
        self.cpb, self.per = chunking(self.rows)
        self.batches = [-(-len(s) // batch) for s in splits]

    def __len__(self) -> int:
        return sum(self.batches) * self.cpb

    def __call__(self, k: int) -> dict[str, Any]:
        b, c = divmod(int(k), self.cpb)
        split = 0
        while b >= self.batches[split]:
            b, split = b - self.batches[split], split + 1
        idx, records = self.splits[split], self.records[split]
        lo, hi = c * self.per, min((c + 1) * self.per, self.rows)
        x = np.zeros((hi - lo, self.size, self.size, 3), np.uint8)
        y, mask, bad = np.zeros(hi - lo, np.int32), np.zeros(hi - lo, bool), []
        for r, pos in enumerate(range(b * self.batch + self.first + lo, b * self.batch + self.first + hi)):
            if pos < len(idx):
                data, label = records[int(idx[pos])]
                out = img.eval_image(data, self.size, self.crop)
                if out is None:
                    bad.append(int(idx[pos]))
                else:
                    x[r], y[r], mask[r] = out, label, True
        return {"image": x, "label": y, "mask": mask, "split": np.full(hi - lo, split, np.int32), "bad": bad}


def _pipeline(fn: Callable[[int], Any], start: int, stop: int, *, cpb: int, workers: int, threads: int) -> Any:
    """grain: elements start..stop-1 mapped by ``fn`` (in ``workers`` processes, or ``threads`` threads
    here), ``cpb`` consecutive chunks concatenated into one batch after the workers."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags; a program not started by absl.app parses none
        flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.range(start, stop).map(fn)
    its = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if workers else threads,
                                               prefetch_buffer_size=2 if workers else 2 * threads))
    if workers:
        its = its.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    return its.batch(cpb, batch_fn=_concat)


def default_threads() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 32))


# ----------------------------------------------------------------------------- streams

class TrainStream:
    """This process's part of the training batches of global steps ``steps`` (a range), as host numpy arrays.

    ``next(stream)`` -> {"image" (B/P, size, size, 3) uint8, "label" (B/P,) int32, "bad": [record indices
    that did not decode], "state": bytes (JSON) for the checkpoint: the grain iterator state after this batch
    and the layout it belongs to}. ``saved``: such a state (or None); ``workers`` grain worker processes (0:
    ``threads`` threads here); ``say``: a note to the user.
    """

    def __init__(self, sd: StreamingData, spec: TrainImages, steps: range, *, workers: int = 0,
                 threads: int | None = None, saved: bytes | None = None,
                 say: Callable[[str], None] = lambda m: None) -> None:
        from grain.sharding import ShardByJaxProcess

        shard = ShardByJaxProcess()
        self.spec, start_step, end_step, batch, seed = spec, steps.start, steps.stop, spec.batch, spec.seed
        self.fn = _TrainChunks(sd, spec, process=shard.shard_index, processes=shard.shard_count)
        cpb = self.fn.cpb
        self.layout = {"batch": batch, "chunks": cpb, "workers": workers, "processes": shard.shard_count,
                       "process": shard.shard_index, "seed": seed, "images": int(len(sd.train_idx))}
        state = json.loads(saved) if saved else None
        resume = state is not None and state.get("layout") == self.layout and state.get("next") == start_step * cpb
        if state is not None and not resume:
            say(f"input pipeline: the saved iterator state is for {state.get('layout')} (next element "
                f"{state.get('next')}); starting a fresh one at step {start_step}: the same batches follow")
        self.base = state["base"] if resume else start_step * cpb
        self.next = start_step * cpb
        ds = _pipeline(self.fn, self.base, end_step * cpb, cpb=cpb, workers=workers,
                       threads=threads or default_threads())
        self._it = iter(ds)
        if resume:
            self._it.set_state(state["grain"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        out = next(self._it)
        self.next += self.fn.cpb
        out["state"] = json.dumps({"base": self.base, "next": self.next, "layout": self.layout,
                                   "grain": self._it.get_state()}).encode()
        return out

    def close(self) -> None:
        self._it.close()


def eval_batches(records: Sequence[Any], splits: Sequence[np.ndarray], *, batch: int, size: int, crop: float,
                 workers: int = 0, threads: int | None = None) -> Iterator[dict[str, Any]]:
    """This process's rows of every evaluation batch of each split in turn: {"image", "label", "mask",
    "split" (index into ``splits``), "bad"}; rows past a split's end are zero images with mask False."""
    from grain.sharding import ShardByJaxProcess

    shard = ShardByJaxProcess()
    fn = _EvalChunks(records, splits, batch=batch, process=shard.shard_index, processes=shard.shard_count,
                     size=size, crop=crop)
    it = iter(_pipeline(fn, 0, len(fn), cpb=fn.cpb, workers=workers, threads=threads or default_threads()))
    try:
        yield from it
    finally:
        it.close()


# ----------------------------------------------------------------------------- before training

def decode_many(records: Any, indices: np.ndarray, size: int, crop: float,
                threads: int | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(images uint8 (n, size, size, 3), labels, bad record indices) of ``indices`` with the evaluation
    transform, decoded by a thread pool; images that do not decode are left out."""
    def one(i: int) -> tuple[np.ndarray | None, int]:
        data, label = records[int(i)]
        return img.eval_image(data, size, crop), label

    with concurrent.futures.ThreadPoolExecutor(threads or default_threads()) as pool:
        results = list(pool.map(one, indices))
    good = [(x, y) for x, y in results if x is not None]
    bad = [int(i) for i, (x, _) in zip(indices, results) if x is None]
    x = np.stack([g[0] for g in good]) if good else np.zeros((0, size, size, 3), np.uint8)
    return x, np.asarray([g[1] for g in good], np.int32), bad


def inspect(sd: StreamingData, size: int, crop: float, seed: int, max_bad: float
            ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a seeded sample of up to SAMPLE training images (all of them when there
    are fewer; sorted, so that is the resident path's statistic), decoded as for evaluation. Raises
    DataError when more than ``max_bad`` of the sample does not decode."""
    idx = sd.train_idx
    if len(idx) > SAMPLE:
        idx = np.sort(np.random.default_rng([seed, 3]).choice(idx, SAMPLE, replace=False))
    x, _, bad = decode_many(sd.train_records, idx, size, crop)
    check_bad(sd, len(bad), len(idx), max_bad, bad[:1], what=f"of {len(idx)} training images sampled")
    return channel_stats(x)


def check_bad(sd: StreamingData, bad: int, seen: int, max_bad: float, examples: list[int], what: str) -> None:
    if bad > max_bad * seen:
        first = f" (first: {sd.describe(examples[0])})" if examples else ""
        raise DataError(f"{bad} {what} in {sd.name} could not be decoded{first}: more than --max-bad-images "
                        f"{max_bad:g} of them; check the data set (truncated copy? wrong folder?)")
