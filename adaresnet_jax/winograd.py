"""Winograd F(2x2, 3x3) and F(4x4, 3x3) for stride-1, pad-1 3x3 convolutions (NHWC, HWIO), with gradients.

Lavin & Gray (2016), "Fast Algorithms for Convolutional Neural Networks": every m x m output tile is
``A^T [(G g G^T) * (B^T d B)] A`` for the (m+2) x (m+2) input tile ``d`` around it, so a 3x3 convolution
becomes (m+2)^2 independent matrix products over channels, one per position of the transformed tile:
2.25x fewer multiplies than the direct form for m = 2, 4x for m = 4. The result differs from a direct
convolution by round-off: m = 2 only adds and halves (relative error ~1e-6 in float32, as XLA's own),
m = 4 interpolates at 0, +-1, +-2, inf and multiplies by up to 8 (~5e-6); the tests bound both.

Each 2-D transform is one matrix product with a constant Kronecker matrix over the flattened tile, and
the tiles are read by one gather, which XLA fuses with the padding: a layer compiles to a handful of
kernels. The batch is processed in chunks (``lax.scan``) small enough that the transformed tiles stay
in cache: the smallest divisor of the batch that gives at least ``MIN_TILE_ROWS`` tiles per product.
The gradients are Winograd too: the input gradient is the forward pass of ``dy`` with the kernel rotated
by 180 degrees and transposed; the kernel gradient is ``G^T [sum over tiles of V^T dM] G``, with ``V``
the input transform of ``x`` and ``dM`` the adjoint output transform of ``dy``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MIN_TILE_ROWS = 256

# (B^T, G, A^T) of F(m, 3): input transform (a, a), kernel transform (a, 3), output transform (m, a), a = m + 2.
MATRICES: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])),
}


def _apply(mat: np.ndarray, x: jax.Array) -> jax.Array:
    """``mat @ x`` over ``x``'s leading axis (the other axes flattened and restored)."""
    y = lax.dot_general(jnp.asarray(mat, x.dtype), x.reshape(x.shape[0], -1), (((1,), (0,)), ((), ())))
    return y.reshape(mat.shape[0], *x.shape[1:])


def _input_transform(xp: jax.Array, tiles: int, m: int) -> jax.Array:
    """(b, m*t + 2, m*t + 2, c), padded -> (a*a, b*t*t, c): ``B^T d B`` of every a x a tile ``d`` (stride m)."""
    bt = MATRICES[m][0]
    a, (b, c) = m + 2, (xp.shape[0], xp.shape[-1])
    idx = m * np.arange(tiles)[None, :] + np.arange(a)[:, None]  # (a, t): row m*i + r of tile i
    d = xp[:, idx[:, None, :, None], idx[None, :, None, :]]  # (b, a, a, t, t, c): one gather
    v = lax.dot_general(jnp.asarray(np.kron(bt, bt).reshape(a * a, a, a), xp.dtype), d, (((1, 2), (1, 2)), ((), ())))
    return v.reshape(a * a, b * tiles * tiles, c)


def _output_transform(y: jax.Array, b: int, tiles: int, m: int) -> jax.Array:
    """(a*a, b*t*t, k) -> (b, m*t, m*t, k): ``A^T y A`` of every tile, tiles put side by side."""
    at = MATRICES[m][2]
    out = _apply(np.kron(at, at), y).reshape(m, m, b, tiles, tiles, -1).transpose(2, 3, 0, 4, 1, 5)
    return out.reshape(b, m * tiles, m * tiles, -1)


def _output_transform_t(dy: jax.Array, tiles: int, m: int) -> jax.Array:
    """The adjoint of ``_output_transform``: (b, m*t, m*t, k) -> (a*a, b*t*t, k), ``A dY A^T`` per tile."""
    at = MATRICES[m][2]
    a, (b, k) = m + 2, (dy.shape[0], dy.shape[-1])
    d = dy.reshape(b, tiles, m, tiles, m, k)
    out = lax.dot_general(jnp.asarray(np.kron(at, at).T.reshape(a * a, m, m), dy.dtype), d, (((1, 2), (2, 4)), ((), ())))
    return out.reshape(a * a, b * tiles * tiles, k)


def _kernel_transform(w: jax.Array, g: np.ndarray) -> jax.Array:
    """(3, 3, c, k) -> (a*a, c, k): ``g w g^T`` over the two spatial axes."""
    return _apply(np.kron(g, g), w.reshape(9, *w.shape[2:]))


def _chunk(n: int, tiles_per_image: int) -> int:
    """Images per chunk: the smallest divisor of ``n`` giving at least MIN_TILE_ROWS tiles (else ``n``)."""
    return next((d for d in range(1, n + 1) if n % d == 0 and d * tiles_per_image >= MIN_TILE_ROWS), n)


def _over_chunks(fn: Callable[..., jax.Array], chunk: int, *arrays: jax.Array) -> jax.Array:
    """``fn`` applied to batch chunks of ``arrays``, results concatenated (one call when ``chunk`` is the batch)."""
    n = arrays[0].shape[0]
    if chunk == n:
        return fn(*arrays)
    out = lax.map(lambda a: fn(*a), tuple(a.reshape(n // chunk, chunk, *a.shape[1:]) for a in arrays))
    return out.reshape(n, *out.shape[2:])


def sum_over_chunks(fn: Callable[..., jax.Array], chunk: int, *arrays: jax.Array) -> jax.Array:
    """The sum of ``fn`` over batch chunks of ``arrays`` (one ``lax.scan``; one call when ``chunk`` is the batch)."""
    n = arrays[0].shape[0]
    if chunk == n:
        return fn(*arrays)
    parts = tuple(a.reshape(n // chunk, chunk, *a.shape[1:]) for a in arrays)
    out = jax.eval_shape(fn, *(p[0] for p in parts))
    total, _ = lax.scan(lambda acc, a: (acc + fn(*a), None), jnp.zeros(out.shape, out.dtype), parts)
    return total


def _tiles(x: jax.Array, m: int) -> int:
    return -(-max(x.shape[1:3]) // m)


def _padded(x: jax.Array, tiles: int, m: int) -> jax.Array:
    h, w = x.shape[1:3]
    return jnp.pad(x, ((0, 0), (1, m * tiles + 1 - h), (1, m * tiles + 1 - w), (0, 0)))


def _conv(x: jax.Array, u: jax.Array, contract: int, m: int, chunked: bool) -> jax.Array:
    """Winograd convolution of ``x`` with the transformed kernel ``u`` (a*a, c, k), contracting its axis ``contract``."""
    n, h, w, _ = x.shape
    tiles = _tiles(x, m)

    def one(xc: jax.Array) -> jax.Array:
        y = lax.dot_general(_input_transform(xc, tiles, m), u, (((2,), (contract,)), ((0,), (0,))))
        return _output_transform(y, xc.shape[0], tiles, m)

    y = _over_chunks(one, _chunk(n, tiles * tiles) if chunked else n, _padded(x, tiles, m))
    return y[:, :h, :w]


def conv3x3(x: jax.Array, w: jax.Array, m: int = 2, chunked: bool = True) -> jax.Array:
    """Stride-1 3x3 convolution with one pixel of zero padding, F(m x m, 3x3): (n, h, w, c) x (3, 3, c, k) -> (n, h, w, k)."""
    return _conv(x, _kernel_transform(w, MATRICES[m][1]), 1, m, chunked)


def conv3x3_input_grad(w: jax.Array, dy: jax.Array, m: int = 2, chunked: bool = True) -> jax.Array:
    """d(conv3x3(x, w))/dx applied to ``dy``: the same convolution of ``dy`` with ``w`` rotated by 180 degrees
    (``G`` with its columns reversed) and its channel axes swapped (contracting ``k``)."""
    return _conv(dy, _kernel_transform(w, MATRICES[m][1][:, ::-1]), 2, m, chunked)


def conv3x3_kernel_grad(x: jax.Array, dy: jax.Array, m: int = 2, chunked: bool = True) -> jax.Array:
    """d(conv3x3(x, w))/dw applied to ``dy``: (3, 3, c, k), summed over the batch chunk by chunk."""
    n, h, w, c = x.shape
    k, tiles = dy.shape[-1], _tiles(x, m)
    xp = _padded(x, tiles, m)
    dyp = jnp.pad(dy, ((0, 0), (0, m * tiles - h), (0, m * tiles - w), (0, 0)))

    def part(xc: jax.Array, dc: jax.Array) -> jax.Array:
        v, dm = _input_transform(xc, tiles, m), _output_transform_t(dc, tiles, m)
        return lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))))

    du = sum_over_chunks(part, _chunk(n, tiles * tiles) if chunked else n, xp, dyp)
    g = MATRICES[m][1]
    return _apply(np.kron(g, g).T, du).reshape(3, 3, c, k)
