"""The streaming input path: image folders and TFDS ArrayRecord sources, host crops, the grain pipeline,
training through train.py (learning, equality with the resident path, exact resume, two processes, bounded
memory), bad images, and the ImageNet presets.

Every data set is made here: scikit-learn's digits upscaled to 64x64 RGB (a colour per class) and
written as real JPEG files (one PNG and one corrupt file among them), or as a TFDS data set prepared as
ArrayRecord without TensorFlow. Runs use the "tiny" network and worker threads (``--input-workers 0``),
except where worker processes are the point.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from adaresnet_jax import train as T
from adaresnet_jax.data import DataError
from adaresnet_jax.data import images as img
from adaresnet_jax.data import streaming as S
from adaresnet_jax.data.folder import scan
from helpers import (  # noqa: F401 (autouse fixture)
    assert_trees_equal, compilation_cache, count_compiles, final_params, free_port, run_processes)

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--dataset", "folder", "--input", "streaming", "--image-size", "64", "--model", "tiny", "--width", "8",
         "--batch-size", "16", "--input-workers", "0", "--optimizer", "adam", "--lr", "3e-3", "--quiet",
         "--eval-batch-size", "128"]


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


@pytest.fixture(scope="module")
def clean(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same folder without the corrupt file."""
    root = tmp_path_factory.mktemp("clean") / "folder"
    bad = sorted((folder / "train" / "digit_3").glob("*.jpg"))[0]
    shutil.copytree(folder, root, ignore=lambda d, names: [n for n in names if Path(d, n) == bad])
    return root


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


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
        stream = S.TrainStream(sd, S.TrainImages(batch=100, steps_per_epoch=2, size=32, seed=1, augment=True),
                               range(start, 20), workers=workers, saved=saved)
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


# ----------------------------------------------------------------------------- training

def test_streaming_run_learns_and_counts_bad_images(folder: Path, tmp_path: Path) -> None:
    """2 epochs (Inception crops, flips) on the folder: it learns; the corrupt file is skipped and counted
    in metrics.jsonl; the class mapping is saved; checkpoints hold the input state."""
    wd = tmp_path / "run"
    assert T.main(FLAGS + ["--data-dir", str(folder), "--augment", "--min-crop-area", "0.35", "--epochs", "2",
                           "--workdir", str(wd)]) == 0
    r = rows(wd)
    assert [x["epoch"] for x in r] == [1, 2] and r[-1]["train_loss"] < r[0]["train_loss"]
    assert r[-1]["test_acc"] >= 0.4 and r[-1]["val_acc"] >= 0.4, r[-1]  # 10 classes: chance is 0.1
    assert r[-1]["bad_images"] >= 1
    assert json.loads((wd / "classes.json").read_text()) == [f"digit_{k}" for k in range(10)]
    s = json.loads((wd / "summary.json").read_text())
    assert s["input"] == "streaming" and s["classes"][3] == "digit_3" and s["bad_images"] == r[-1]["bad_images"]
    assert (wd / "checkpoints" / "32" / "data" / "process_0-of-1.json").is_file()


def test_streaming_equals_resident_on_the_same_batches(clean: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Through train.py the two paths see different batches from one seed: the streaming order is a numpy
    permutation (computed inside grain worker processes, which must not start JAX), the resident one
    ``jax.random.permutation`` on device; and their augmentations differ by design (Inception crops on the
    host, padded crops on device). So the test gives the streaming path the resident order and turns
    augmentation off (evaluation crop 1.0 of 64x64 images: exact pixels; 240 training images, so the
    streaming statistics sample is the whole set): then every metric and the final parameters are equal."""
    from adaresnet_jax.steps import _key

    flags = FLAGS + ["--data-dir", str(clean), "--eval-crop", "1.0", "--val-split", "0.2", "--epochs", "2",
                     "--optimizer", "sgd", "--lr", "0.05"]
    assert T.main(flags + ["--input", "resident", "--workdir", str(tmp_path / "resident")]) == 0
    monkeypatch.setattr(S, "epoch_order", lambda seed, epoch, n: np.asarray(
        jax.random.permutation(jax.random.fold_in(_key(seed, 1), epoch), n)))
    assert T.main(flags + ["--workdir", str(tmp_path / "streaming")]) == 0
    res, st = rows(tmp_path / "resident"), rows(tmp_path / "streaming")
    for a, b in zip(res, st, strict=True):
        for key in ("step", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    assert_trees_equal(final_params(tmp_path / "resident")[1], final_params(tmp_path / "streaming")[1])
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("resident", "streaming")]
    assert [s["input"] for s in summaries] == ["resident", "streaming"]


def test_resume_mid_epoch_is_exact(folder: Path, tmp_path: Path) -> None:
    """Stopped mid-epoch (step 7 of 16) and rerun: bit-equal parameters to a run never stopped, whether it
    resumes from the saved grain state (same layout) or restarts the stream at the step with a worker
    process instead of threads."""
    flags = FLAGS + ["--data-dir", str(folder), "--augment", "--epochs", "2", "--log-every-steps", "4"]
    assert T.main(flags + ["--workdir", str(tmp_path / "ref")]) == 0
    reference = final_params(tmp_path / "ref")
    for name, more in (("same", []), ("worker", ["--input-workers", "1"])):
        wd = tmp_path / name
        assert T.main(flags + ["--workdir", str(wd), "--stop-after-steps", "7"]) == 0
        assert final_params(wd)[0] == 7 and (wd / "checkpoints" / "7" / "data").is_dir()
        assert T.main(flags + ["--workdir", str(wd), *more]) == 0
        step, params = final_params(wd)
        assert step == reference[0] == 32
        assert_trees_equal(params, reference[1])
        assert [x["step"] for x in rows(wd)] == [4, 7, 8, 12, 16, 20, 24, 28, 32]  # 7: the stopped command's last


@pytest.mark.slow
def test_two_processes_match_one_and_resume(clean: Path, tmp_path: Path) -> None:
    """2 processes x 1 CPU device (gloo), each reading only its half of every batch, stopped mid-epoch and
    resumed: the same metrics and (to float32 round-off) parameters as 1 process with 2 devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    flags = FLAGS + ["--data-dir", str(clean), "--augment", "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05"]
    wd = tmp_path / "multi"

    def launch(*more: str) -> list[str]:
        port = free_port()
        cmds = [[sys.executable, "train.py", *flags, "--workdir", str(wd), "--coordinator", f"127.0.0.1:{port}",
                 "--num-processes", "2", "--process-id", str(i), *more] for i in range(2)]
        return run_processes(cmds, cwd=REPO, env={**env, "JAX_NUM_CPU_DEVICES": "1"}, timeout=300)

    launch("--stop-after-steps", "5")
    assert sorted(p.name for p in (wd / "checkpoints" / "5" / "data").glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    outs = launch()
    assert "resumed from step 5 " in outs[0]
    single = subprocess.run([sys.executable, "train.py", *flags, "--workdir", str(tmp_path / "single")], cwd=REPO,
                            env={**env, "JAX_NUM_CPU_DEVICES": "2"}, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    (s1, p1), (s2, p2) = final_params(wd), final_params(tmp_path / "single")
    assert s1 == s2 == 2 * (len(S.open_streaming("folder", str(clean), val_split=0.1).train_idx) // 16)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    multi = rows(wd)
    assert [r["step"] for r in multi] == [5, 16, 32]  # 5: the stopped command's last row
    for m, o in zip(multi[1:], rows(tmp_path / "single"), strict=True):  # (epoch 1's train loss: since step 5)
        for key in ("val_loss", "test_loss", "val_acc", "test_acc") + (("train_loss",) if m["epoch"] == 2 else ()):
            assert m[key] == pytest.approx(o[key], rel=1e-5), key


# train.py under tracemalloc (which counts every numpy array and Python object, not XLA's own buffers), its
# peak reset when the training loop starts: prints the return code and the loop's peak of traced bytes.
MEASURE = """
import sys, tracemalloc
from adaresnet_jax import stopping, train
tracemalloc.start()
enter = stopping.StopOnSigterm.__enter__
def at_loop(self):
    tracemalloc.reset_peak()
    return enter(self)
stopping.StopOnSigterm.__enter__ = at_loop
rc = train.main(sys.argv[1:])
print(rc, tracemalloc.get_traced_memory()[1])
"""


@pytest.mark.slow
def test_memory_stays_bounded(tmp_path: Path) -> None:
    """2,000 JPEGs whose decoded training set (98 MB at 128 px) is six times --resident-budget-mb 16:
    --input auto streams it, and 200 steps over all of it (one epoch) peak, in the host memory the
    training loop holds, where 200 steps over a tenth of it (ten epochs) do: the run never holds the data
    set (the resident path would hold all 98 MB on the host).

    Measured with tracemalloc (numpy reports its arrays to it), not RSS: RSS also counts XLA's buffers and
    the allocator's caches, which swing by 55 MB between runs. Both runs keep the same buffers (batches of
    10, the same prefetch depth and chunk size, one evaluation of the same 100 test images); what the
    larger run may add is bookkeeping per training image (its order, offset, label and path: under 200
    bytes each, 0.4 MB for the 1,800 more). The margin, 10% of the decoded set (9.8 MB), is far above that
    and far below holding the set (98 MB), or even a tenth of it."""
    root = tmp_path / "big"
    write_digits(root, n_train=1600, n_val=200, size=128, quality=75)  # 1,600 + 200 distinct digits
    write_digits(root / "more", n_train=400, n_val=0, size=128, seed=1, quality=75)
    for d in (root / "more" / "train").iterdir():
        for f in d.iterdir():
            f.rename(root / "train" / d.name / f"more_{f.name}")
    shutil.rmtree(root / "more")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    flags = [f for f in FLAGS if f not in ("--input", "streaming")]
    peaks = {}
    for name, more in (("tenth", ["--max-train", "200", "--input", "streaming", "--epochs", "10"]), ("all", [])):
        cmd = [*flags, "--data-dir", str(root), "--image-size", "128",
               "--resident-budget-mb", "16", "--batch-size", "10", "--width", "4", "--epochs", "1", "--val-split", "0",
               "--max-test", "100", "--eval-batch-size", "100", "--eval-every-steps", "1000",
               "--workdir", str(tmp_path / name), *more]
        out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
        rc, traced = map(int, out.stdout.split()[-2:])
        assert rc == 0, out.stderr[-3000:]
        assert "exceeds --resident-budget-mb 16: streaming it" in out.stderr or name == "tenth"
        peaks[name] = traced / 1e6
    decoded = 2000 * 128 * 128 * 3 / 1e6
    print(f"training loop's traced peak: a tenth {peaks['tenth']:.1f} MB, all {peaks['all']:.1f} MB "
          f"(decoded set: {decoded:.0f} MB)")
    assert rows(tmp_path / "all")[-1]["step"] == rows(tmp_path / "tenth")[-1]["step"] == 200
    assert peaks["all"] - peaks["tenth"] < 0.1 * decoded, peaks


# ----------------------------------------------------------------------------- TFDS, bad input, presets

class TinyJpegs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Digits as JPEG-encoded tfds Image features of varying size, prepared as ArrayRecord without TensorFlow
    (tfds stores the bytes it is given); 'train' and 'validation' splits, as imagenet2012 has."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=[f"d{k}" for k in range(10)])}))

    def _split_generators(self, dl_manager):  # noqa: ANN001, ANN202
        return {"train": self._generate_examples(0, 160), "validation": self._generate_examples(160, 200)}

    def _generate_examples(self, lo: int, hi: int):  # noqa: ANN202
        from sklearn.datasets import load_digits

        d = load_digits()
        for i in range(lo, hi):
            size = 40 + i % 3 * 8
            gray = np.kron(d.images[i] / 16.0, np.ones((6, 6)))[:size, :]
            rgb = np.rint(np.repeat(gray[..., None], 3, -1) * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG")
            yield i, {"image": buf.getvalue(), "label": int(d.target[i])}


def test_tfds_array_record_source_without_tensorflow(tmp_path: Path) -> None:
    TinyJpegs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    assert "tensorflow" not in sys.modules
    sd = S.open_streaming("tiny_jpegs", str(tmp_path))
    assert sd.kind == "tfds" and sd.classes[:2] == ("d0", "d1") and len(sd.test_idx) == 40
    data, label = sd.train_records[0]
    assert data[:2] == b"\xff\xd8" and 0 <= label < 10
    wd = tmp_path / "run"
    assert T.main(FLAGS[2:] + ["--dataset", "tiny_jpegs", "--data-dir", str(tmp_path), "--input", "streaming",
                               "--image-size", "32", "--epochs", "1", "--workdir", str(wd)]) == 0
    assert rows(wd)[-1]["step"] == 9 and "tensorflow" not in sys.modules
    assert json.loads((wd / "classes.json").read_text())[9] == "d9"


def test_too_many_bad_images_exit_2(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A quarter of the training files unreadable: caught on the sample before compiling, or while
    training if the sample missed them; exit 2 with one line either way."""
    root = tmp_path / "folder"
    shutil.copytree(folder, root)
    for p in sorted((root / "train").rglob("*.jpg"))[::4]:  # a quarter of the training files
        p.write_bytes(b"broken")
    capsys.readouterr()
    with count_compiles() as n:
        rc = T.main(FLAGS + ["--data-dir", str(root), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and n[0] == 0 and "\n" not in err, err
    assert err.startswith("train.py: error: ") and " of 256 training images sampled in folder could not be " \
        f"decoded (first: '{root / 'train'}" in err and "more than --max-bad-images 0.01 of them" in err
    assert not (tmp_path / "run").exists()
    # the same files met during training (the sample check skipped): the run stops there, exit 2, one line
    monkeypatch.setattr(T, "inspect", lambda *a: ((0.5,) * 3, (0.25,) * 3))
    capsys.readouterr()
    assert T.main(FLAGS + ["--data-dir", str(root), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train.py: error: ") and "of the 270 training images this process reads in folder could " \
        "not be decoded" in err and "more than --max-bad-images 0.01" in err, err


@pytest.mark.parametrize("argv, expected", [
    (["--input", "streaming"], "--input streaming reads an image folder (--data-dir with train/<class>/) or a TFDS "
                               "data set prepared as ArrayRecord; --dataset digits is read into memory: use --input "
                               "resident (or auto)"),
    (["--input", "resident", "--resident-budget-mb", "1"],
     "the decoded training set of folder (3 MB at 64 px) exceeds --resident-budget-mb 1: use --input streaming "
     "(or auto), or raise the budget"),
    (["--no-drop-last"], "--no-drop-last is not supported by the streaming input path: drop it (or --input resident)"),
])
def test_input_path_errors_exit_2(argv: list[str], expected: str, folder: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    base = ["--dataset", "digits", "--model", "tiny"] if argv[:2] == ["--input", "streaming"] else \
        FLAGS + ["--data-dir", str(folder)]
    capsys.readouterr()
    assert T.main(base + argv + ["--workdir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"train.py: error: {expected}\n"


def test_imagenet_presets_start(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--preset imagenet on an image folder and on a TFDS data dir: a clear one-line error where the data
    cannot serve it (batch 1024 > 300 images; imagenet2012 not prepared), and a start on the tiny folder
    (tiny network, small images, --val-split 0: the preset's 1% would hold out 3 images, which is refused)
    that trains and evaluates."""
    cases = [(["--data-dir", str(folder)], "batch_size 1024 exceeds the 297 training images: lower --batch-size"),
             (["--dataset", "imagenet2012", "--data-dir", str(tmp_path / "tfds")], "dataset 'imagenet2012' is not "
              f"prepared in '{tmp_path / 'tfds'}': prepare it once with `pip install 'adaresnet-jax[prepare]' && "
              f"tfds build imagenet2012 --data_dir {tmp_path / 'tfds'} --file_format array_record`")]
    (tmp_path / "tfds").mkdir()
    for more, expected in cases:
        capsys.readouterr()
        assert T.main(["--preset", "imagenet", *more, "--workdir", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err.startswith(f"train.py: error: {expected}")
    wd = tmp_path / "run"
    assert T.main(["--preset", "imagenet", "--data-dir", str(folder), "--model", "tiny", "--width", "4",
                   "--image-size", "32", "--batch-size", "32", "--eval-batch-size", "64", "--input-workers", "0",
                   "--log-every-steps", "3", "--stop-after-steps", "6", "--val-split", "0", "--workdir", str(wd),
                   "--quiet"]) == 0
    r = rows(wd)
    assert [x["step"] for x in r] == [3, 6] and r[-1]["test_acc"] is not None
    cfg = json.loads((wd / "config.json").read_text())
    assert (cfg["model"], cfg["input"], cfg["lr_batch"], cfg["dtype"], cfg["val_split"]) == \
        ("tiny", "streaming", 256, "auto", 0.0)
    assert r[-1]["lr"] == pytest.approx(0.1 * 32 / 256 * 5 / (5 * 9))  # linear warm-up over 5 epochs of 9 steps


def test_input_pipeline_benchmark_smallest_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """benchmarks/input_pipeline.py end to end, at its smallest (speed is never asserted)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import input_pipeline

    out = tmp_path / "ip.json"
    report = input_pipeline.main(["--images", "24", "--workers", "0", "--steps", "1", "--rounds", "1", "--model", "tiny",
                                  "--batch-size", "8", "--image-size", "32", "--dir", str(tmp_path), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["images_per_s"]) == {"workers=0", "train step"} and saved["per_core"]["train"] > 0
    assert all(v > 0 for xs in report["images_per_s"].values() for v in xs) and saved["cores"] >= 1
    assert "| pipeline, 0 worker processes (threads) |" in capsys.readouterr().out
