"""Shared fixtures. The default run reads nothing outside the repository.

``image_batch`` is 32 real images (scikit-learn's handwritten digits, shipped with a dependency) made
32x32x3: each 8x8 digit upscaled 4x and given a colour per class, so a network can learn it and the
tests see real image statistics, not noise. Set ``ADARESNET_CIFAR_NPZ`` to an .npz with
``x_train``/``y_train`` (for example ``../shared/data/cifar10/cifar10_train_first4000_lossless.npz``)
to run the same tests on real CIFAR-10 images instead (opt-in; never needed).
"""

from __future__ import annotations

import os
from pathlib import Path

# The suite runs on the CPU. libtpu (the test extra: tests/test_aot.py compiles for TPUs) would otherwise make
# JAX look for a TPU at start-up; compiling for a target needs no backend of its kind.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

CIFAR_ENV = "ADARESNET_CIFAR_NPZ"


def digits_rgb32(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digits as uint8 (n, 32, 32, 3) and int32 labels: 4x nearest upscaling, a colour per class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.images))[:n]
    gray = np.kron(d.images[idx] / 16.0, np.ones((4, 4)))  # (n, 32, 32) in [0, 1]
    colours = np.random.default_rng(1).uniform(0.3, 1.0, (10, 3))
    rgb = gray[..., None] * colours[d.target[idx]][:, None, None, :]
    return np.rint(rgb * 255).astype(np.uint8), d.target[idx].astype(np.int32)


@pytest.fixture(scope="session")
def image_batch() -> tuple[np.ndarray, np.ndarray]:
    """32 real 32x32x3 images as float32 in [0, 1] and their int32 labels (see the module docstring)."""
    path = os.environ.get(CIFAR_ENV)
    if path:
        with np.load(Path(path)) as d:
            x, y = d["x_train"][:32], d["y_train"][:32].reshape(-1)
    else:
        x, y = digits_rgb32(32)
    return x.astype(np.float32) / 255.0, y.astype(np.int32)
