"""Image folders (torchvision's ImageFolder layout) as random-access sources of encoded images.

Layout: ``root/train/<class>/*.{jpg,jpeg,png}`` and ``root/val/<class>/...`` (``validation/`` or ``test/``
are accepted too); the evaluation split is what this project reports as ``test``. Class names are the
sorted folder names of ``train/`` and give the label ids (``classes[label]``); files are sorted by path,
so the index of an image never depends on the file system's listing order. Nothing is decoded here:
``FileRecords[i]`` is ``(bytes of the file, label)``, read when asked for (``b""`` if it cannot be read,
which the pipeline counts as a bad image). The path list is stored as one bytes blob with offsets, so a
source of 1.28 million files pickles to each grain worker process in a few tens of MB.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from adaresnet_jax.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
EVAL_FOLDERS = ("val", "validation", "test")


class FileRecords:
    """Random access to the files of one split: ``len``, ``[i] -> (bytes, label)``; picklable and compact."""

    def __init__(self, root: Path, rel_paths: list[str], labels: np.ndarray) -> None:
        self.root = str(root)
        encoded = [p.encode() for p in rel_paths]
        self._blob = b"".join(encoded)
        self._offsets = np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64)
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self._blob[self._offsets[i]:self._offsets[i + 1]].decode())

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        try:
            with open(self.path(i), "rb") as f:
                return f.read(), int(self.labels[i])
        except OSError:
            return b"", int(self.labels[i])

    def __repr__(self) -> str:
        return f"FileRecords({self.root!r}, {len(self)} files)"


def is_image_folder(path: Path) -> bool:
    """Whether ``path`` has the layout ``train/<class>/`` (at least one class folder)."""
    train = path / "train"
    return train.is_dir() and any(p.is_dir() for p in train.iterdir())


LAYOUT = "an image folder (train/<class>/*.jpg and val/<class>/*.jpg), a TFDS data dir, a CIFAR archive or an .npz"


def check_data_dir(path: Path) -> None:
    """Raises DataError (one line naming the expected layout) for a ``--data-dir`` that does not exist, or that
    is one split of an image folder, or a folder of images, rather than the folder holding train/ and val/."""
    if not path.exists():
        raise DataError(f"data_dir '{path}' does not exist: pass {LAYOUT}")
    if not path.is_dir() or is_image_folder(path):
        return
    subdirs = [p for p in path.iterdir() if p.is_dir()]
    has_images = lambda d: any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir() if f.is_file())  # noqa: E731
    if has_images(path) or any(has_images(d) for d in subdirs[:20]):
        parent = path.parent if path.name in ("train", *EVAL_FOLDERS) else path
        raise DataError(f"data_dir '{path}' holds images but not as an image folder: pass the folder that holds "
                        f"train/<class>/*.jpg and val/<class>/*.jpg (here, expected {parent / 'train'} and "
                        f"{parent / 'val'})")


def _files(split_dir: Path, classes: list[str], where: str) -> tuple[list[str], list[int]]:
    index = {c: i for i, c in enumerate(classes)}
    rel, labels = [], []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if d.name not in index:
            raise DataError(f"{where}: class folder '{d.name}' is not among the {len(classes)} classes of "
                            f"{split_dir.parent / 'train'}: every evaluation class needs a training folder")
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    rel.append(os.path.relpath(os.path.join(dirpath, name), split_dir.parent))
                    labels.append(index[d.name])
    return rel, labels


def scan(root: Path) -> tuple[FileRecords, FileRecords, list[str]]:
    """(train, eval, class names) of an image folder; raises DataError (one line) for a bad layout."""
    if not is_image_folder(root):
        raise DataError(f"'{root}' is not an image folder: expected {root}/train/<class>/*.jpg (and "
                        f"{root}/val/<class>/...)")
    train_dir = root / "train"
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    eval_dir = next((root / n for n in EVAL_FOLDERS if (root / n).is_dir()), None)
    if eval_dir is None:
        raise DataError(f"'{root}' has train/ but no evaluation folder: add {root}/val/<class>/... "
                        f"(or validation/, test/)")
    splits = []
    for d in (train_dir, eval_dir):
        rel, labels = _files(d, classes, str(root))
        if not rel:
            raise DataError(f"'{d}' holds no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files in its class folders")
        splits.append(FileRecords(root, rel, np.asarray(labels)))
    return splits[0], splits[1], classes
