"""A newcomer's first tries (issue 22, "Tried as a new user would"): each friction found there, checked
here so that it cannot come back. (Others live beside the code they test: SIGINT in test_train.py, the
download command in test_download.py, the two-process stop line in test_faults.py, the throughput
tables in test_benchmarks.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaresnet_jax import train as T
from adaresnet_jax.config import build_parser
from adaresnet_jax.metrics import curves_figure, skip_weights_figure
from helpers import count_compiles

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny", "--width", "4", "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--quiet"]


def image_folder(root: Path, classes: int = 2, per_class: int = 20) -> Path:
    """root/train/c<k>/*.png and root/val/c<k>/*.png: 16x16 images, a colour per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 4)):
        for k in range(classes):
            d = root / split / f"c{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.full((16, 16, 3), 40 * k + 20, np.uint8) + rng.integers(0, 20, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Runs train.main in this process: asserts exit 2, one stderr line, nothing compiled; that line."""
    capsys.readouterr()
    with count_compiles() as n:
        rc = T.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("train.py: error: ") and err.count("\n") == 1, err
    assert n[0] == 0
    return err.strip()


# ----------------------------------------------------------------------------- 1. a wrong --data-dir

@pytest.mark.parametrize("preset", [[], ["--preset", "imagenet"]])
def test_mistyped_data_dir_names_the_layout(preset: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    typo = tmp_path / "imagenett"
    err = one_line_error([*preset, "--dataset", "imagenet2012", "--data-dir", str(typo), *SMALL,
                          "--workdir", str(tmp_path / "run")], capsys)
    assert f"'{typo}' does not exist" in err and "train/<class>/*.jpg and val/<class>/*.jpg" in err, err
    assert "--input" not in err


def test_data_dir_at_train_itself_says_train_and_val_are_expected(tmp_path: Path) -> None:
    """As a user runs it (a subprocess, so absl's own warnings would show): exactly one line, no TFDS advice."""
    root = image_folder(tmp_path / "imgs")
    for preset in ([], ["--preset", "imagenet"]):
        out = subprocess.run([sys.executable, "train.py", *preset, "--dataset", "imgs", "--data-dir", str(root / "train"),
                              *SMALL, "--workdir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert f"expected {root / 'train'} and {root / 'val'}" in out.stderr and "tfds" not in out.stderr, out.stderr


# ----------------------------------------------------------------------------- 3. small image folders

def test_validation_split_too_small_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """40 training images, --val-split 0.05: 2 validation images (fewer than 100 and than a batch of 8)."""
    root = image_folder(tmp_path / "imgs")
    err = one_line_error(["--dataset", "imgs", "--data-dir", str(root), "--val-split", "0.05", *SMALL,
                          "--workdir", str(tmp_path / "run")], capsys)
    assert "--val-split 0.05 holds out 2 of about 40 training images" in err and "--val-split 0" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("source", ["folder", "npz"])
def test_one_class_is_refused(source: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if source == "folder":
        data = image_folder(tmp_path / "imgs", classes=1)
    else:
        data = tmp_path / "one.npz"
        rng = np.random.default_rng(0)
        np.savez(data, x_train=rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), y_train=np.zeros(40, int),
                 x_test=rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8), y_test=np.zeros(8, int))
    err = one_line_error(["--dataset", "imgs" if source == "folder" else "npz", "--data-dir", str(data),
                          "--val-split", "0", *SMALL, "--workdir", str(tmp_path / "run")], capsys)
    assert "has one class: a classifier needs at least 2" in err, err


def _rows(n_blocks: int) -> list[dict]:
    weights = {f"stage{b // 4 + 1}_block{b % 4 + 1}": [0.1 * b] for b in range(n_blocks)}
    return [{"epoch": e, "train_loss": 1e7 if e == 2 else 1.0 / e, "val_loss": 2.0, "test_loss": 2.0,
             "train_acc": 0.5, "val_acc": 0.5, "test_acc": 0.5, "skip_weights": weights} for e in (1, 2, 3)]


def test_loss_curves_use_a_log_axis() -> None:
    fig = curves_figure(_rows(1))
    assert fig.axes[0].get_yscale() == "log" and fig.axes[1].get_yscale() == "linear"


def test_skip_weight_lines_have_distinct_colours() -> None:
    from matplotlib.colors import to_hex

    fig = skip_weights_figure(_rows(27))  # resnet56 has 27 blocks
    colours = [to_hex(line.get_color()) for line in fig.axes[0].get_lines()]
    assert len(colours) == 27 and len(set(colours)) == 27


# ----------------------------------------------------------------------------- 4. README commands

def test_readme_says_how_to_enter_the_venv_before_its_first_command() -> None:
    """`make setup` creates .venv (the Makefile's VENV) with the package in .venv/bin/python; README's
    `python ...` commands run inside it, so README activates it before its first such command."""
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^VENV := \.venv$", make, re.M) and "$(PYTHON) -m venv $(VENV)" in make
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    first = next(i for i, b in enumerate(blocks) if re.search(r"^(\S+=\S+ )*python ", b, re.M))
    before = readme[: readme.index(blocks[first])]
    assert ". .venv/bin/activate" in before, "README runs `python ...` before saying how to activate .venv"


# ----------------------------------------------------------------------------- 8. --help

def test_help_names_image_folders() -> None:
    helps = {a.dest: " ".join(a.help.split()) for a in build_parser()._actions}
    assert "image folder" in helps["dataset"]
    assert "image folder (train/<class>/*.jpg and val/<class>/*.jpg)" in helps["data_dir"]
