"""The streaming input path: image folders, host crops, the grain pipeline.

Every data set is made here: scikit-learn's digits upscaled to 64x64 RGB (a colour per class) and
written as real JPEG files (one PNG and one corrupt file among them).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaresnet_jax.data import DataError
from adaresnet_jax.data import images as img
from adaresnet_jax.data import streaming as S
from adaresnet_jax.data.folder import scan


def write_digits(root: Path, n_train: int = 300, n_val: int = 100, size: int = 64, seed: int = 0,
                 quality: int = 90) -> None:
    """Digits as size x size RGB JPEGs in root/{train,val}/digit_<k>/ (nearest upscaling, a colour per class)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.images))[: n_train + n_val]
    colours = np.random.default_rng(1).uniform(0.3, 1.0, (10, 3))
    reps = -(-size // 8)
    for k, i in enumerate(idx):
        gray = np.kron(d.images[i] / 16.0, np.ones((reps, reps)))[:size, :size]
        rgb = np.rint(gray[..., None] * colours[d.target[i]] * 255).astype(np.uint8)
        path = root / ("train" if k < n_train else "val") / f"digit_{d.target[i]}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path, quality=quality)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 training and 100 evaluation digits as 64x64 JPEGs; one training image is a PNG (grayscale),
    one training file is a truncated JPEG."""
    root = tmp_path_factory.mktemp("digits") / "folder"
    write_digits(root)
    first = sorted((root / "train" / "digit_3").iterdir())
    Image.open(first[0]).convert("L").save(first[0].with_suffix(".png"))
    first[0].unlink()
    first[1].write_bytes(first[1].read_bytes()[:200])  # truncated: Pillow cannot decode it
    return root


# ----------------------------------------------------------------------------- sources and crops

def test_folder_layout_classes_and_errors(folder: Path, tmp_path: Path) -> None:
    train, test, classes = scan(folder)
    assert classes == [f"digit_{k}" for k in range(10)] and (len(train), len(test)) == (300, 100)
    assert train.path(0).startswith(str(folder / "train" / "digit_0"))
    assert sum(train.path(i).endswith(".png") for i in range(len(train))) == 1
    data, label = train[len(train) - 1]
    assert data[:2] == b"\xff\xd8" and label == 9 and classes[label] in train.path(len(train) - 1)
    (tmp_path / "a" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "a" / "train" / "cat" / "1.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no evaluation folder"):
        scan(tmp_path / "a")
    (tmp_path / "a" / "val" / "dog").mkdir(parents=True)
    with pytest.raises(DataError, match="class folder 'dog' is not among the 1 classes"):
        scan(tmp_path / "a")
    with pytest.raises(DataError, match="is not an image folder"):
        scan(tmp_path)


def test_crops() -> None:
    rng = np.random.default_rng(0)
    boxes = [img.crop_box(rng, 500, 375) for _ in range(2000)]
    for left, top, w, h in boxes:
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
    areas = np.array([w * h / (500 * 375) for _, _, w, h in boxes])
    ratios = np.array([w / h for _, _, w, h in boxes])
    assert areas.min() >= 0.075 and areas.max() <= 1 and 0.35 < np.median(areas) < 0.5  # large crops of extreme ratio do not fit
    assert ratios.min() >= 0.74 and ratios.max() <= 1.34
    assert img.crop_box(rng, 1000, 10, min_area=0.9) == (493, 0, 13, 10)  # no fit: central crop, ratio clipped
    photo = np.random.default_rng(1).integers(0, 256, (375, 500, 3), np.uint8)
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo).save(jpeg, format="JPEG")
    Image.fromarray(photo[:64, :64]).save(png, format="PNG")
    a = img.train_image(jpeg.getvalue(), 64, np.random.default_rng(5))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, img.train_image(jpeg.getvalue(), 64, np.random.default_rng(5)))
    assert img.eval_image(jpeg.getvalue(), 224).shape == (224, 224, 3)
    np.testing.assert_array_equal(img.eval_image(png.getvalue(), 64, crop=1.0), photo[:64, :64])  # exact pixels
    for junk in (b"", b"not an image", jpeg.getvalue()[:300]):
        assert img.eval_image(junk, 32) is None and img.train_image(junk, 32, rng) is None


def test_batches_do_not_depend_on_workers_and_resume_from_grain_state(folder: Path) -> None:
    """The same batches with 0 and 2 worker processes; a stream restarted from a saved grain state (same
    layout) or at the step alone (another worker count) continues with the same batches; the corrupt
    file is replaced by the next image of the epoch's order and reported."""
    sd = S.open_streaming("folder", str(folder), val_split=0.1, seed=0)
    assert (len(sd.train_idx), len(sd.val_idx), len(sd.test_idx), sd.num_classes) == (270, 30, 100, 10)

    def take(workers: int, start: int = 0, n: int = 6, saved: bytes | None = None) -> list[dict]:
        stream = S.TrainStream(sd, batch=100, steps_per_epoch=2, end_step=20, start_step=start, size=32, seed=1,
                               augment=True, workers=workers, saved=saved)
        try:
            return [next(stream) for _ in range(n)]
        finally:
            stream.close()

    a, b = take(0), take(2)
    assert S.chunking(100) == (2, 50) and a[0]["image"].shape == (100, 32, 32, 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    corrupt = [i for i in sd.train_idx if sd.train_records.path(i).endswith(".jpg")
               and img.eval_image(sd.train_records[i][0], 8) is None]
    assert len(corrupt) == 1
    position = [list(sd.train_idx[S.epoch_order(1, e, 270)]).index(corrupt[0]) for e in range(3)]
    assert [x["bad"] for x in a] == [[corrupt[0]] if p // 100 == i % 2 and p < 200 and e == i // 2 else []
                                     for i in range(6) for e, p in [(i // 2, position[i // 2])]]
    expected = [sd.train_idx[j] for j in S.epoch_order(1, 0, 270)[:101]]
    expected = [k for k in expected if k != corrupt[0]][:100]  # the corrupt image's place: the next one's
    np.testing.assert_array_equal(a[0]["label"], [sd.train_records[int(k)][1] for k in expected])
    for saved, workers in ((a[2]["state"], 0), (b[2]["state"], 2), (a[2]["state"], 1)):
        resumed = take(workers, start=3, n=3, saved=saved)
        for x, y in zip(a[3:], resumed):
            np.testing.assert_array_equal(x["image"], y["image"])
