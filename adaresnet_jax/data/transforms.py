"""On-device transforms of uint8 image batches, run inside the compiled train/eval steps."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from adaresnet_jax.data.errors import DataError


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float], dtype=jnp.float32) -> jax.Array:
    """uint8 (..., C) -> `dtype` (x / 255 - mean) / std per channel; mean=0, std=1 gives [0, 1] scaling."""
    mean_a, std_a = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    if mean_a.shape not in ((), (x.shape[-1],)) or std_a.shape not in ((), (x.shape[-1],)):
        raise DataError(f"mean/std shapes {mean_a.shape}/{std_a.shape} do not match {x.shape[-1]} channels")
    bcast = (1,) * (x.ndim - 1) + (-1,)  # explicit, so jax_numpy_rank_promotion="raise" code can call it
    scale, shift = (1.0 / (255.0 * std_a)).reshape(bcast), (mean_a / std_a).reshape(bcast)
    return (x.astype(jnp.float32) * scale - shift).astype(dtype)


def augment(key: jax.Array, x: jax.Array, *, crop_pad: int = 4, flip: bool = True) -> jax.Array:
    """Per-image random crop of the zero-padded image and random horizontal flip of a uint8 (N, H, W, C) batch.

    `crop_pad` (pixels of zero padding per side; 0 = no crop) and `flip` must be static Python values.
    Returns the same shape and dtype; jit-compatible, no host work.
    """
    if crop_pad < 0:
        raise ValueError(f"crop_pad is {crop_pad}: it must be >= 0")
    n, h, w, c = x.shape
    crop_key, flip_key = jax.random.split(key)
    if crop_pad > 0:
        p = crop_pad
        padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1)
        x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (n,))
        x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1, :], x)
    return x
