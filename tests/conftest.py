"""Shared fixtures: small real CIFAR-10 batches when ../shared is present, else seeded noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


@pytest.fixture(scope="session")
def cifar_batch() -> tuple[np.ndarray, np.ndarray]:
    """32 CIFAR-10 training images with their original pixels, as float32 in [0, 1], and labels."""
    path = SHARED_CIFAR / "cifar10_train_first4000_lossless.npz"
    if path.exists():
        with np.load(path) as d:
            x, y = d["x_train"][:32], d["y_train"][:32]
    else:  # CI always has ../shared; this keeps the tests runnable from a bare copy.
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 32)
    return x.astype(np.float32) / 255.0, y.astype(np.int32)
