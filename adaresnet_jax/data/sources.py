"""Host-side data sources: load, validate and split image-classification data sets.

`load_dataset` returns a `Dataset` of uint8 NHWC numpy arrays (loaded once per run, on the host) plus
per-channel statistics. Sources (the `name` argument):

- ``"digits"``: scikit-learn's 8x8 digits, embedded, with a fixed 20% test split.
- ``"npz"`` (or any name with ``data_dir`` pointing at an ``.npz``): Keras layout ``x_train, y_train,
  x_test, y_test``.
- ``"cifar10"`` / ``"cifar100"`` with ``data_dir`` at the CIFAR python archive (``.tar.gz``), its
  extracted folder, or the folder holding either; without ``data_dir``, the archive is downloaded once
  into a cache (see :mod:`.download`).
- any other name: a TFDS data set prepared as ArrayRecord, read with `tfds.data_source` (no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Any
from collections.abc import Sequence

import numpy as np

from adaresnet_jax.data.download import fetch
from adaresnet_jax.data.errors import DataError

DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 20240901  # fixed: the digits test split never depends on `seed`
_KNOWN_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10}
_EXAMPLES = "digits, npz, cifar10, cifar100, mnist, fashion_mnist"
# name -> (archive file, extracted folder, train members, test members, label key)
_CIFAR = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",), b"fine_labels"),
}


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Splits as uint8 NHWC images (C in {1, 3}) and int32 labels; mean/std are per channel in [0, 1] units."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.x_train)}, val={len(self.x_val)}, "
                f"test={len(self.x_test)}, image_shape={self.image_shape}, num_classes={self.num_classes})")


# ----------------------------------------------------------------------------- validation

def _to_uint8(x: np.ndarray, split: str) -> np.ndarray:
    """uint8 as is; integer in [0, 255] cast; float in [0, 1] (max <= 1) scaled, or in [0, 255] rounded."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DataError(f"x_{split} has {bad} NaN/Inf values: clean or drop those images before loading")
    elif not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"x_{split} has dtype {x.dtype}: images must be uint8 (or int/float in [0, 255] or [0, 1])")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise DataError(f"x_{split} values span [{lo:g}, {hi:g}]: images must lie in [0, 255] (or [0, 1] as floats)")
    if np.issubdtype(x.dtype, np.floating):
        return np.rint(x * (255.0 if hi <= 1.0 else 1.0)).astype(np.uint8)
    return x.astype(np.uint8)


def _to_images(x: np.ndarray, split: str) -> np.ndarray:
    x = np.asarray(x)
    return _to_uint8(x[..., None] if x.ndim == 3 else x, split)


def _to_labels(y: np.ndarray, split: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"y_{split} has shape {y.shape}: labels must be class ids of shape (N,) or (N, 1)"
                        " (one-hot labels? take argmax first)")
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"y_{split} has dtype {y.dtype} with non-integer values: labels must be integer class ids")
    return y.astype(np.int64)


def _check_splits(splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int) -> None:
    """Checks (x, y) per split name; empty 'train' or 'test' is an error, an empty 'val' is allowed."""
    if num_classes < 1:
        raise DataError(f"num_classes is {num_classes}: it must be at least 1")
    shapes = {}
    for split, (x, y) in splits.items():
        if x.dtype != np.uint8:
            _to_uint8(x, split)  # raises the specific error (NaN/Inf, range) where there is one
            raise DataError(f"x_{split} has dtype {x.dtype}: images must be uint8 (load_dataset/from_arrays convert)")
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(f"x_{split} has shape {x.shape}: images must be (N, H, W) or (N, H, W, C) with C 1 or 3")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"y_{split} has shape {y.shape} dtype {y.dtype}: labels must be integer class ids (N,)")
        if len(x) != len(y):
            raise DataError(f"{split} split has {len(x)} images but {len(y)} labels: they must match one to one")
        if len(x) == 0 and split != "val":
            raise DataError(f"{split} split is empty: it needs at least one image (check the source file)")
        bad = int(np.count_nonzero((y < 0) | (y >= num_classes)))
        if bad:
            raise DataError(f"y_{split} has {bad} labels outside [0, {num_classes}) (min {y.min()}, max {y.max()}):"
                            " fix the labels or the class count")
        if len(x):
            shapes[split] = x.shape[1:]
    if len(set(shapes.values())) > 1:
        raise DataError(f"image shapes differ between splits {shapes}: resize all splits to one (H, W, C)")


def validate(ds: Dataset) -> None:
    """Raises DataError unless every split is uint8 (N, H, W, C) with C in {1, 3} and matching shapes,
    labels are int (N,) in [0, num_classes), and train and test are non-empty."""
    _check_splits({"train": (ds.x_train, ds.y_train), "val": (ds.x_val, ds.y_val),
                   "test": (ds.x_test, ds.y_test)}, ds.num_classes)
    c = ds.x_train.shape[-1]
    if len(ds.mean) != c or len(ds.std) != c:
        raise DataError(f"mean/std have {len(ds.mean)}/{len(ds.std)} entries for {c} channels: one per channel")


def channel_stats(x: np.ndarray, chunk: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images in [0, 1] units (std floored at 1/255)."""
    s = np.zeros(x.shape[-1]); ss = np.zeros(x.shape[-1])
    for i in range(0, len(x), chunk):
        b = x[i:i + chunk].astype(np.float64) / 255.0
        s += b.sum(axis=(0, 1, 2)); ss += np.square(b).sum(axis=(0, 1, 2))
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(max(v, 1 / 255)) for v in std)


@dataclasses.dataclass(frozen=True)
class Split:
    """How a data set's splits are cut: ``val_split`` in [0, 1) of the training images held out for validation
    (a permutation seeded by ``seed``; 0: none), then train/test cut to their first ``max_train``/``max_test``
    images (None: all). The one rule of the resident and streaming paths (:meth:`indices`)."""

    val_split: float = 0.0
    seed: int = 0
    max_train: int | None = None
    max_test: int | None = None

    def check(self) -> None:
        """DataError (one line) for a value out of range."""
        if not 0.0 <= self.val_split < 1.0:
            raise DataError(f"val_split is {self.val_split}: it must be in [0, 1) (0 disables validation)")
        for arg, v in (("max_train", self.max_train), ("max_test", self.max_test)):
            if v is not None and v < 1:
                raise DataError(f"{arg} is {v}: it must be a positive count, or None for all images")

    def indices(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(train indices, validation indices), each sorted, of ``n`` training images (train cut to max_train)."""
        n_val = max(1, round(self.val_split * n)) if self.val_split > 0 else 0
        if n_val >= n:
            raise DataError(f"val_split={self.val_split} of {n} training images leaves none to train on: lower it")
        perm = np.random.default_rng(self.seed).permutation(n)
        return np.sort(perm[n_val:])[:self.max_train], np.sort(perm[:n_val])


def from_arrays(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                *, num_classes: int | None = None, split: Split = Split()) -> Dataset:
    """Builds a validated Dataset from raw arrays: images (N, H, W) or (N, H, W, C), labels (N,) or (N, 1).

    num_classes defaults to max label + 1; ``split`` says how validation is held out and what is kept.
    """
    split.check()
    xtr, xte = _to_images(x_train, "train"), _to_images(x_test, "test")
    ytr, yte = _to_labels(y_train, "train"), _to_labels(y_test, "test")
    if num_classes is None:
        num_classes = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    _check_splits({"train": (xtr, ytr), "test": (xte, yte)}, num_classes)
    train_idx, val_idx = split.indices(len(xtr))
    xva, yva = xtr[val_idx], ytr[val_idx]
    xtr, ytr = xtr[train_idx], ytr[train_idx]
    xte, yte = xte[:split.max_test], yte[:split.max_test]
    mean, std = channel_stats(xtr)
    return Dataset(name, xtr, ytr.astype(np.int32), xva, yva.astype(np.int32), xte, yte.astype(np.int32),
                   int(num_classes), mean, std)


# ----------------------------------------------------------------------------- sources

def _load_digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    perm = np.random.default_rng(_DIGITS_TEST_SEED).permutation(len(x))
    n_test = round(DIGITS_TEST_FRACTION * len(x))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return x[train], d.target[train], x[test], d.target[test]


def _load_npz(path: Path) -> tuple[np.ndarray, ...]:
    """Keras layout (x_train, y_train, x_test, y_test), or JPEG bytes with offsets (see _decode_jpegs)."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    jpeg_keys = ("train_jpeg", "train_offsets", "train_labels", "test_jpeg", "test_offsets", "test_labels")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # an .npz is a zip archive; np.load would try to unpickle anything else
        raise DataError(f"'{path}' is not an .npz file (it does not start with a zip header): "
                        f"pass an .npz written by numpy.savez with arrays {', '.join(keys)}")
    try:
        with np.load(path, allow_pickle=False) as f:
            found = list(f.files)
            if all(k in found for k in jpeg_keys):
                return (_decode_jpegs(f["train_jpeg"], f["train_offsets"]), f["train_labels"],
                        _decode_jpegs(f["test_jpeg"], f["test_offsets"]), f["test_labels"])
            arrays = {k: f[k] for k in keys if k in found}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read '{path}' as .npz, it is truncated or damaged ({why}): "
                        "copy or write the file again") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataError(f"'{path}' lacks {missing} (has {found}): an .npz needs arrays {', '.join(keys)}")
    return tuple(arrays[k] for k in keys)


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Images stored as concatenated JPEG files: image i is blob[offsets[i]:offsets[i + 1]].

    This is the layout of the offline CIFAR-10 copy (``cifar10_jpeg.npz``); decoding needs Pillow.
    """
    import io

    from PIL import Image

    data = blob.tobytes()
    return np.stack([np.asarray(Image.open(io.BytesIO(data[a:b])).convert("RGB"))
                     for a, b in zip(offsets[:-1], offsets[1:])])


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold (numpy arrays, lists, bytes), never arbitrary code."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) == ("_codecs", "encode") or (
                module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar")):
            return super().find_class(module.replace("numpy.core", "numpy._core"), name)
        raise DataError(f"unexpected object {module}.{name} in a CIFAR batch: is this the CIFAR python archive?")


def _unpickle(f: IO[bytes]) -> dict:
    return _CifarUnpickler(f, encoding="bytes").load()


def _find_cifar(path: Path, name: str) -> Path | None:
    """The archive or extracted folder of CIFAR `name` at or inside `path`, else None."""
    archive, folder, train_files, _, _ = _CIFAR[name]
    if path.is_file():
        return path if tarfile.is_tarfile(path) else None
    for cand in (path, path / folder):
        if (cand / train_files[0]).is_file():
            return cand
    return path / archive if (path / archive).is_file() else None


def _load_cifar(src: Path, name: str) -> tuple[np.ndarray, ...]:
    _, _, train_files, test_files, label_key = _CIFAR[name]
    wanted = set(train_files + test_files)
    batches: dict[str, dict] = {}
    if src.is_file():
        with tarfile.open(src, "r:*") as tar:  # one sequential pass, nothing written to disk
            for m in tar:
                base = PurePosixPath(m.name).name
                if m.isfile() and base in wanted:
                    batches[base] = _unpickle(tar.extractfile(m))  # type: ignore[arg-type]
    else:
        for base in wanted & {p.name for p in src.iterdir()}:
            with open(src / base, "rb") as f:
                batches[base] = _unpickle(f)
    missing = sorted(wanted - set(batches))
    if missing:
        raise DataError(f"'{src}' lacks {missing}: pass the original {_CIFAR[name][0]} or its extracted folder")

    def join(files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        data = np.concatenate([np.asarray(batches[f][b"data"], np.uint8) for f in files])
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{name} batch data has shape {data.shape}, expected (N, 3072): a corrupt archive?")
        labels = np.concatenate([np.asarray(batches[f][label_key]) for f in files])
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # CHW rows -> NHWC

    return join(train_files) + join(test_files)


def _read_source(src: Sequence, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for start in range(0, len(src), chunk):
        recs = src.__getitems__(list(range(start, min(start + chunk, len(src)))))  # type: ignore[attr-defined]
        try:
            xs.append(np.stack([np.asarray(r["image"]) for r in recs]))
        except KeyError as e:
            raise DataError(f"records lack feature {e}: need an image-classification set with 'image', 'label'") from e
        except ValueError as e:
            raise DataError(f"images differ in shape ({e}): only fixed-size image sets are supported") from e
        ys.append(np.asarray([r["label"] for r in recs]))
    return np.concatenate(xs), np.concatenate(ys)


def open_tfds(name: str, data_dir: str | None, decoders: dict | None = None) -> tuple[Sequence, Sequence, Any]:
    """(train, test, features) of a TFDS data set prepared as ArrayRecord, through `tfds.data_source` (random
    access, no TensorFlow). A set without a 'test' split (imagenet2012, imagenette) is evaluated on its
    'validation' split. `decoders` as for `tfds.data_source` (``tfds.decode.SkipDecoding()`` keeps encoded
    image bytes). Raises DataError (one line, saying how to prepare it) when it cannot be read."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.registered import DatasetNotFoundError

    where = f"'{data_dir}'" if data_dir else "the default TFDS data dir (~/tensorflow_datasets)"
    how = (f"prepare it once with `pip install 'adaresnet-jax[prepare]' && tfds build {name} --data_dir "
           f"{data_dir or '~/tensorflow_datasets'} --file_format array_record` (needs network and TensorFlow), "
           "or pass --data-dir a CIFAR python archive or an .npz with x_train/y_train/x_test/y_test")

    def source(splits: list[str]) -> list:
        extra = {"decoders": decoders} if decoders else {}
        return tfds.data_source(name, split=splits, data_dir=data_dir, download=False, **extra)

    try:
        train, test = source(["train", "test"])
    except DatasetNotFoundError:
        raise DataError(f"unknown dataset '{name}': use one of {_EXAMPLES} or another TFDS "
                        "image-classification name") from None
    except (NotImplementedError, KeyError, FileNotFoundError, AssertionError, ValueError) as e:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise DataError(f"dataset '{name}' is not prepared in {where}: {how}") from e
        splits, fmt = sorted(builder.info.splits), builder.info.file_format
        if not ({"train", "test"} <= set(splits) or {"train", "validation"} <= set(splits)):
            raise DataError(f"dataset '{name}' has splits {splits}, not 'train' and 'test' (or 'validation'): "
                            "pass --data-dir an .npz with x_train/y_train/x_test/y_test instead") from e
        if fmt is not None and fmt.value != "array_record":
            raise DataError(f"dataset '{name}' in {where} is stored as {fmt.value}, but reading it without "
                            f"TensorFlow needs ArrayRecord: {how}") from e
        if "test" in splits:
            raise DataError(f"cannot read dataset '{name}' from {where} ({e}): {how}") from e
        train, test = source(["train", "validation"])
    features = train.dataset_info.features
    if "label" not in features or not hasattr(features["label"], "num_classes"):
        raise DataError(f"dataset '{name}' has no class 'label' feature: it is not an image-classification set")
    return train, test, features


def _load_tfds(name: str, data_dir: str | None) -> tuple[tuple[np.ndarray, ...], int]:
    train, test, features = open_tfds(name, data_dir)
    return _read_source(train) + _read_source(test), int(features["label"].num_classes)


def load_dataset(name: str, data_dir: str | None = None, *, val_split: float = 0.0, seed: int = 0,
                 max_train: int | None = None, max_test: int | None = None) -> Dataset:
    """Loads `name` (see the module docstring) into a validated Dataset of uint8 (N, H, W, C) images.

    `data_dir` is ignored for "digits"; otherwise it is a .npz, a CIFAR archive/folder, or a TFDS data dir.
    `val_split` in [0, 1) of the training set becomes the validation split (permutation seeded by `seed`);
    `max_train`/`max_test` keep only the first images of train/test (after the validation split).
    """
    kwargs = dict(split=Split(val_split, seed, max_train, max_test))
    if name == "digits":
        return from_arrays(name, *_load_digits(), num_classes=10, **kwargs)
    path = Path(data_dir).expanduser() if data_dir is not None else None
    if path is not None and not path.exists():
        raise DataError(f"data_dir '{data_dir}' does not exist: pass an existing folder or file")
    if name == "npz" or (path is not None and path.suffix == ".npz"):
        if path is None or not path.is_file():
            raise DataError(f"dataset '{name}' needs data_dir = an .npz file with x_train/y_train/x_test/y_test")
        return from_arrays(name, *_load_npz(path), num_classes=_KNOWN_CLASSES.get(name), **kwargs)
    if name in _CIFAR and path is None:  # the official archive, downloaded once into download.cache_dir()
        path = fetch(name)
    if name in _CIFAR and path is not None and (src := _find_cifar(path, name)) is not None:
        return from_arrays(name, *_load_cifar(src, name), num_classes=_KNOWN_CLASSES[name], **kwargs)
    if path is not None and path.is_file():
        raise DataError(f"data_dir '{data_dir}' is a file but not an .npz or CIFAR archive: pass a TFDS data dir,"
                        " a CIFAR python archive or an .npz")
    arrays, num_classes = _load_tfds(name, data_dir)
    return from_arrays(name, *arrays, num_classes=num_classes, **kwargs)
