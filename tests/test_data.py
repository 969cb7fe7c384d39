"""Tests for adaresnet_jax.data: loaders (digits, npz, CIFAR archives, TFDS), validation, normalize, augment."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from adaresnet_jax.data import DataError, Dataset, Split, augment, from_arrays, load_dataset, normalize, validate

CIFAR_ENV = "ADARESNET_CIFAR_NPZ"  # opt-in: the offline CIFAR-10 copy's lossless npz (see conftest.py)


def _rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """Sorted multiset of (image, label) rows, to compare splits regardless of order."""
    return sorted(xi.tobytes() + int(yi).to_bytes(2, "little") for xi, yi in zip(x, y))


# ----------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_shapes_dtypes_and_stats(digits: Dataset) -> None:
    assert digits.num_classes == 10 and digits.image_shape == (8, 8, 1)
    assert len(digits.x_train) + len(digits.x_test) == 1797 and len(digits.x_test) == 359
    assert len(digits.x_val) == 0 and digits.x_val.shape[1:] == (8, 8, 1)
    assert digits.x_train.dtype == np.uint8 and digits.y_train.dtype == np.int32
    assert digits.x_train.max() == 255 and set(np.unique(digits.y_test)) == set(range(10))
    allowed = np.rint(np.arange(17) * 255 / 16).astype(np.uint8)  # 0..16 scaled with rounding
    assert np.isin(digits.x_train, allowed).all()
    x = digits.x_train.astype(np.float64) / 255
    np.testing.assert_allclose(digits.mean, [x.mean()], rtol=1e-9)
    np.testing.assert_allclose(digits.std, [x.std()], rtol=1e-9)
    validate(digits)
    assert "train=1438" in repr(digits)


@pytest.mark.parametrize("seed", [0, 7])
def test_digits_fixed_test_split_and_disjoint_val(digits: Dataset, seed: int) -> None:
    ds = load_dataset("digits", val_split=0.2, seed=seed)
    np.testing.assert_array_equal(ds.x_test, digits.x_test)  # the test split never depends on seed
    np.testing.assert_array_equal(ds.y_test, digits.y_test)
    assert len(ds.x_val) == round(0.2 * 1438) and len(ds.x_train) == 1438 - len(ds.x_val)
    # train + val is exactly the non-test part (as a multiset, so no image is in both)
    assert _rows(np.concatenate([ds.x_train, ds.x_val]), np.concatenate([ds.y_train, ds.y_val])) == \
        _rows(digits.x_train, digits.y_train)
    np.testing.assert_allclose(ds.mean, [ds.x_train.mean() / 255], rtol=1e-9)  # stats after the val split


def test_val_split_depends_on_seed_and_truncation() -> None:
    a, b = load_dataset("digits", val_split=0.1, seed=0), load_dataset("digits", val_split=0.1, seed=1)
    assert _rows(a.x_val, a.y_val) != _rows(b.x_val, b.y_val)
    c = load_dataset("digits", val_split=0.1, seed=0, max_train=100, max_test=50)
    assert len(c.x_train) == 100 and len(c.x_test) == 50
    np.testing.assert_array_equal(c.x_train, a.x_train[:100])
    np.testing.assert_array_equal(c.x_val, a.x_val)


@pytest.mark.parametrize("val_split", [-0.1, 1.0, 1.5])
def test_bad_val_split(val_split: float) -> None:
    with pytest.raises(DataError, match="val_split"):
        load_dataset("digits", val_split=val_split)


# ----------------------------------------------------------------------------- npz

def test_npz_rgb_and_grayscale(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_tr, x_te = rng.integers(0, 256, (20, 6, 5, 3), np.uint8), rng.integers(0, 256, (7, 6, 5, 3), np.uint8)
    y_tr, y_te = rng.integers(0, 4, (20, 1)), np.array([0, 1, 2, 3, 4, 0, 1])
    np.savez(tmp_path / "rgb.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    ds = load_dataset("npz", str(tmp_path / "rgb.npz"), val_split=0.25)
    assert ds.num_classes == 5 and ds.image_shape == (6, 5, 3)
    assert len(ds.x_train) == 15 and len(ds.x_val) == 5 and ds.y_train.shape == (15,)
    assert _rows(np.concatenate([ds.x_train, ds.x_val]), np.concatenate([ds.y_train, ds.y_val])) == \
        _rows(x_tr, y_tr[:, 0])
    np.testing.assert_array_equal(ds.x_test, x_te)

    np.savez(tmp_path / "gray.npz", x_train=x_tr[..., 0], y_train=y_tr, x_test=x_te[..., 0], y_test=y_te % 2)
    gray = load_dataset("cifar10", str(tmp_path / "gray.npz"))  # an .npz path wins over the name
    assert gray.image_shape == (6, 5, 1) and gray.num_classes == 10  # known class count for cifar10
    np.testing.assert_array_equal(gray.x_train[..., 0], x_tr[..., 0])


def test_npz_missing_arrays_and_not_a_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "half.npz", x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.zeros(2))
    with pytest.raises(DataError, match="x_test"):
        load_dataset("npz", str(tmp_path / "half.npz"))
    with pytest.raises(DataError, match=r"\.npz"):
        load_dataset("npz", str(tmp_path))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="is not an .npz file"):
        load_dataset("npz", str(tmp_path / "junk.npz"))


def test_float_images_are_converted() -> None:
    rng = np.random.default_rng(1)
    x01 = rng.random((6, 4, 4, 3))
    y = np.arange(6) % 3
    ds = from_arrays("f", x01, y, x01 * 255, y, num_classes=3)
    np.testing.assert_array_equal(ds.x_train, np.rint(x01 * 255).astype(np.uint8))
    np.testing.assert_array_equal(ds.x_test, ds.x_train)


# ----------------------------------------------------------------------------- CIFAR python archives

_LAYOUT = {  # name -> (archive, folder, {member: n images}, label key)
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                {**{f"data_batch_{i}": 3 for i in range(1, 6)}, "test_batch": 2}, b"labels"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", {"train": 4, "test": 3}, b"fine_labels"),
}


def _fake_cifar(tmp_path: Path, name: str, form: str) -> tuple[Path, dict[str, dict]]:
    """Writes pickled batches in the real layout; returns the path to pass and the batches."""
    archive, folder, members, label_key = _LAYOUT[name]
    rng = np.random.default_rng(len(name))
    batches = {}
    for member, n in members.items():
        data = rng.integers(0, 256, (n, 3072), np.uint8)
        batches[member] = {b"batch_label": member.encode(), label_key: rng.integers(0, 10, n).tolist(),
                           b"coarse_labels": [0] * n, b"data": data,
                           b"filenames": [f"{i}.png".encode() for i in range(n)]}
    first = next(iter(batches))
    batches[first][b"data"][0] = 0
    batches[first][b"data"][0, 1 * 1024 + 3 * 32 + 7] = 200  # green channel, row 3, column 7
    if form == "tar" or form == "parent_of_tar":
        with tarfile.open(tmp_path / archive, "w:gz") as tar:
            for member, batch in batches.items():
                blob = pickle.dumps(batch, protocol=2)
                info = tarfile.TarInfo(f"{folder}/{member}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        return (tmp_path / archive if form == "tar" else tmp_path), batches
    (tmp_path / folder).mkdir()
    for member, batch in batches.items():
        (tmp_path / folder / member).write_bytes(pickle.dumps(batch, protocol=2))
    return (tmp_path / folder if form == "folder" else tmp_path), batches


@pytest.mark.parametrize("form", ["tar", "parent_of_tar", "folder", "parent_of_folder"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_archives(tmp_path: Path, name: str, form: str) -> None:
    path, batches = _fake_cifar(tmp_path, name, form)
    ds = load_dataset(name, str(path))
    label_key, members = _LAYOUT[name][3], list(_LAYOUT[name][2])
    train, test = members[:-1], members[-1:]
    assert ds.num_classes == (10 if name == "cifar10" else 100) and ds.image_shape == (32, 32, 3)
    assert ds.x_train[0, 3, 7, 1] == 200 and int(ds.x_train[0].sum()) == 200  # CHW rows -> HWC
    np.testing.assert_array_equal(ds.y_train, np.concatenate([batches[m][label_key] for m in train]))
    np.testing.assert_array_equal(ds.y_test, batches[test[0]][label_key])
    want = batches[test[0]][b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(ds.x_test, want)


def test_cifar_missing_member_and_unsafe_pickle(tmp_path: Path) -> None:
    path, _ = _fake_cifar(tmp_path, "cifar10", "folder")
    (path / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5"):
        load_dataset("cifar10", str(path))
    (path / "data_batch_5").write_bytes(pickle.dumps({b"data": print}, protocol=2))
    with pytest.raises(DataError, match="unexpected object .*print"):
        load_dataset("cifar10", str(path))


# ----------------------------------------------------------------------------- TFDS

@pytest.fixture
def tfds_mock(monkeypatch: pytest.MonkeyPatch):
    """tfds.testing.mock_data for tfds.data_source. tfds 4.9.10's mock sets `__getitems__` on a MagicMock as a
    plain attribute, so it is called without `self` and fails; patch its helper to take no `self`."""
    monkeypatch.setattr(mocking, "_getitems", lambda record_keys, generator, serialized=False:
                        [generator[k] for k in record_keys])
    return functools.partial(tfds.testing.mock_data, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mocked(tfds_mock, tmp_path: Path, name: str, shape: tuple[int, ...]) -> None:
    with tfds_mock(num_examples=12):
        ds = load_dataset(name, str(tmp_path), val_split=0.25)
    assert ds.image_shape == shape and ds.num_classes == 10
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (9, 3, 12)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32


class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A real ArrayRecord data set that tfds prepares without TensorFlow (a Tensor feature, not a PNG Image)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(6, 5, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=4)}))

    def _split_generators(self, dl_manager):  # noqa: ANN001, ANN202
        return {"train": self._generate_examples(11, 0), "test": self._generate_examples(5, 1)}

    def _generate_examples(self, n: int, seed: int):  # noqa: ANN202
        rng = np.random.default_rng(seed)
        for i in range(n):
            yield i, {"image": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), "label": i % 4}


def test_tfds_real_array_record(tmp_path: Path) -> None:
    TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ds = load_dataset("tiny_images", str(tmp_path), max_test=3)  # found on disk, not in the registry
    assert ds.num_classes == 4 and ds.image_shape == (6, 5, 3) and len(ds.x_test) == 3
    rng = np.random.default_rng(0)
    want = np.stack([rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(11)])
    assert _rows(ds.x_train, ds.y_train) == _rows(want, np.arange(11) % 4)


def test_tfds_unprepared_unknown_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not prepared.*tfds build mnist .*--file_format array_record"):
        load_dataset("mnist", str(tmp_path))
    with pytest.raises(DataError, match="unknown dataset 'no_such_set'.*cifar100"):
        load_dataset("no_such_set", str(tmp_path))
    with pytest.raises(DataError, match="does_not_exist.*does not exist"):
        load_dataset("cifar10", str(tmp_path / "does_not_exist"))


def test_tfds_prepared_as_tfrecord_or_without_test_split(tmp_path: Path) -> None:
    builder = TinyImages(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    info_path = Path(builder.data_path) / "dataset_info.json"
    info = json.loads(info_path.read_text())
    # what `tfds build` writes by default (TFRecord), which needs TensorFlow to read
    info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    with pytest.raises(DataError, match="stored as tfrecord.*needs ArrayRecord.*--file_format array_record"):
        load_dataset("tiny_images", str(tmp_path))
    info_path.write_text(json.dumps({**info, "splits": [sp for sp in info["splits"] if sp["name"] == "train"]}))
    with pytest.raises(DataError, match=r"has splits \['train'\], not 'train' and 'test'"):
        load_dataset("tiny_images", str(tmp_path))


# ----------------------------------------------------------------------------- validate

def _good(**changes: np.ndarray) -> Dataset:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (6, 4, 4, 3), np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2], np.int32)
    ds = Dataset("t", x, y, x[:0], y[:0], x[:2], y[:2], 3, (0.5,) * 3, (0.25,) * 3)
    return dataclasses.replace(ds, **changes)


@pytest.mark.parametrize("changes, message", [
    ({"y_train": np.array([0, 1, 2, 3, 1, -1], np.int32)}, r"y_train has 2 labels outside \[0, 3\)"),
    ({"y_test": np.array([0.5, 1.0])}, "y_test.*integer"),
    ({"x_train": np.zeros((6, 4, 4), np.uint8)}, r"x_train has shape \(6, 4, 4\)"),
    ({"x_test": np.zeros((2, 4, 4, 4), np.uint8)}, "C 1 or 3"),
    ({"x_test": np.zeros((2, 5, 4, 3), np.uint8)}, "shapes differ"),
    ({"x_val": np.zeros((1, 4, 4, 3), np.uint8)}, "val split has 1 images but 0 labels"),
    ({"x_train": np.zeros((0, 4, 4, 3), np.uint8), "y_train": np.zeros(0, np.int32)}, "train split is empty"),
    ({"x_train": np.where(np.arange(6)[:, None, None, None] < 2, np.nan, 0.5) * np.ones((6, 4, 4, 3))},
     "x_train has 96 NaN/Inf"),
    ({"x_train": np.full((6, 4, 4, 3), 0.5)}, "x_train has dtype float64"),
    ({"mean": (0.5,)}, "one per channel"),
])
def test_validate_rejects(changes: dict, message: str) -> None:
    validate(_good())
    with pytest.raises(DataError, match=message):
        validate(_good(**changes))


def test_from_arrays_rejects_bad_inputs() -> None:
    x, y = np.zeros((4, 4, 4, 3), np.float32), np.arange(4) % 2
    x[0, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match="x_train has 1 NaN/Inf"):
        from_arrays("t", x, y, x[1:], y[1:])
    with pytest.raises(DataError, match=r"x_test values span \[300, 300\]"):
        from_arrays("t", x[1:], y[1:], np.full((2, 4, 4, 3), 300), y[:2])
    with pytest.raises(DataError, match="one-hot"):
        from_arrays("t", x[1:], np.eye(3), x[1:], y[1:])
    with pytest.raises(DataError, match="test split is empty"):
        from_arrays("t", x[1:], y[1:], x[:0], y[:0])
    with pytest.raises(DataError, match="leaves none to train"):
        from_arrays("t", x[1:2], y[1:2], x[1:], y[1:], split=Split(val_split=0.5))


# ----------------------------------------------------------------------------- normalize / augment

@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_normalize(dtype, tol: float) -> None:
    x = np.random.default_rng(3).integers(0, 256, (2, 4, 4, 3), np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = jax.jit(functools.partial(normalize, mean=mean, std=std, dtype=dtype))(jnp.asarray(x))
    assert out.dtype == dtype and out.shape == x.shape
    want = (x / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(normalize(jnp.asarray(x), 0.0, 1.0)), x / 255.0, rtol=1e-6)
    with pytest.raises(DataError, match="channels"):
        normalize(jnp.asarray(x), (0.5, 0.5), (1.0, 1.0))


def _images(n: int, h: int = 7, w: int = 6, c: int = 3) -> jax.Array:
    return jnp.asarray(np.random.default_rng(4).integers(1, 256, (n, h, w, c), np.uint8))


def test_augment_identity_shape_and_keys() -> None:
    x = _images(8)
    same = augment(jax.random.key(0), x, crop_pad=0, flip=False)
    assert same.shape == x.shape and same.dtype == jnp.uint8
    np.testing.assert_array_equal(same, x)
    a, b = augment(jax.random.key(0), x), augment(jax.random.key(1), x)
    assert a.shape == x.shape and a.dtype == jnp.uint8 and not np.array_equal(a, b)
    jitted = jax.jit(functools.partial(augment, crop_pad=4, flip=True))
    np.testing.assert_array_equal(jitted(jax.random.key(0), x), a)


def test_augment_flip_only() -> None:
    x = _images(64)
    out, xs = np.asarray(augment(jax.random.key(5), x, crop_pad=0)), np.asarray(x)
    kept = [np.array_equal(o, i) for o, i in zip(out, xs)]
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, xs)]
    assert all(k or m for k, m in zip(kept, mirrored)) and any(kept) and any(mirrored)


@pytest.mark.parametrize("flip", [False, True])
def test_augment_crop_is_a_window_of_the_padded_image(flip: bool) -> None:
    p, (n, h, w) = 2, (32, 7, 6)
    x = np.asarray(_images(n, h, w))
    out = np.asarray(jax.jit(functools.partial(augment, crop_pad=p, flip=flip))(jax.random.key(6), jnp.asarray(x)))
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = set()
    for i in range(n):
        windows = {(dy, dx, m) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for m in (False, True)
                   if np.array_equal(out[i], (lambda v: v[:, ::-1] if m else v)(padded[i, dy:dy + h, dx:dx + w]))}
        assert windows and (flip or all(not m for *_, m in windows)), f"image {i} is not a crop"
        offsets |= {(dy, dx) for dy, dx, _ in windows}
    assert len(offsets) > 5  # offsets really vary


def test_augment_marker_moves_at_most_crop_pad() -> None:
    p, (h, w) = 3, (9, 9)
    x = np.zeros((16, h, w, 1), np.uint8)
    x[:, 4, 4] = 255  # unique marker in the centre never leaves the crop
    out = np.asarray(augment(jax.random.key(7), jnp.asarray(x), crop_pad=p, flip=False))
    for img in out:
        (r,), (c,) = np.nonzero(img[..., 0])[0], np.nonzero(img[..., 0])[1]
        assert abs(r - 4) <= p and abs(c - 4) <= p


# ----------------------------------------------------------------------------- real data

@pytest.mark.skipif(not os.environ.get(CIFAR_ENV), reason=f"opt-in: set {CIFAR_ENV} to the first-4000 lossless npz")
def test_real_cifar10_stats_and_pixels() -> None:
    path = Path(os.environ[CIFAR_ENV])
    with np.load(path) as f:
        x, y = f["x_train"], f["y_train"]
    ds = from_arrays("cifar10", x[:3500], y[:3500], x[3500:], y[3500:], num_classes=10, split=Split(val_split=0.1))
    assert ds.image_shape == (32, 32, 3) and len(ds.x_train) == 3150
    np.testing.assert_array_equal(x[0, 0, :3, 0], [59, 43, 50])  # row 0 of data_batch_1 begins R = 59, 43, 50
    np.testing.assert_allclose(ds.mean, (0.4914, 0.4822, 0.4465), atol=0.02)  # published CIFAR-10 stats
    np.testing.assert_allclose(ds.std, (0.2470, 0.2435, 0.2616), atol=0.02)
    with pytest.raises(DataError, match=r"lacks \['x_test', 'y_test'\]"):
        load_dataset("cifar10", str(path))


def test_npz_of_jpeg_bytes_is_decoded(tmp_path):
    """The offline CIFAR-10 copy's layout: concatenated JPEG files with offsets and labels."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)

    def encode(n):
        imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        imgs[:] = imgs.mean(axis=(1, 2), keepdims=True).astype(np.uint8)  # flat colours survive JPEG
        blobs = []
        for im in imgs:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG", quality=95)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        return imgs, np.concatenate(blobs), np.cumsum([0] + [len(b) for b in blobs])

    xtr, btr, otr = encode(6)
    xte, bte, ote = encode(3)
    path = tmp_path / "jpeg.npz"
    np.savez(path, train_jpeg=btr, train_offsets=otr, train_labels=np.arange(6) % 10,
             test_jpeg=bte, test_offsets=ote, test_labels=np.arange(3))
    ds = load_dataset("cifar10", str(path))
    assert ds.x_train.shape == (6, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    assert np.abs(ds.x_train.astype(int) - xtr).max() <= 3 and np.abs(ds.x_test.astype(int) - xte).max() <= 3
    np.testing.assert_array_equal(ds.y_train, np.arange(6))
    assert ds.num_classes == 10


def test_normalize_under_strict_rank_promotion():
    x = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.uint8).reshape(2, 2, 2, 3)
    with jax.numpy_rank_promotion("raise"):
        out = normalize(x, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    np.testing.assert_allclose(out, (np.asarray(x) / 255.0 - [0.1, 0.2, 0.3]) / 0.5, rtol=1e-6)
