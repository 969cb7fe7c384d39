"""Winograd F(2x2, 3x3) for stride-1, pad-1 3x3 convolutions (NHWC, HWIO), with its own gradients.

Lavin & Gray (2016), "Fast Algorithms for Convolutional Neural Networks": every 2x2 output tile is
``A^T [(G g G^T) * (B^T d B)] A`` for the 4x4 input tile ``d`` around it, so a 3x3 convolution becomes
16 independent matrix products over channels (one per position of the 4x4 transformed tile) with 2.25x
fewer multiplies than the direct form. The transforms only add and halve (points 0, +1, -1, inf), so
the result differs from a direct convolution by float32 round-off (relative error ~1e-6, tested).

Each 2-D transform is one matrix product with a constant Kronecker matrix over the 16 (or 4) tile
positions, and the tiles are read by one gather, which XLA fuses with the padding: a layer compiles to a
handful of kernels. The batch is processed in chunks (``lax.scan``) small enough that the transformed
tiles stay in cache; the chunk is the smallest divisor of the batch that gives at least
``MIN_TILE_ROWS`` tiles per product. The gradients are Winograd too: the input gradient is the forward
pass of ``dy`` with the kernel rotated by 180 degrees and transposed, the kernel gradient is
``G^T [sum over tiles of V^T dM] G`` with ``dM`` the adjoint output transform of ``dy``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)  # input transform
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)      # kernel transform
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)                                # output transform
MIN_TILE_ROWS = 256


# The 2-D transforms as single matrices over the flattened tile (Kronecker products), so that each
# transform is one matrix product and XLA compiles a handful of kernels per layer, not one per element.
_IN = np.kron(BT, BT)        # (16, 16): tile (r, q) -> transformed (a, b)
_OUT = np.kron(AT, AT)       # (4, 16): transformed (a, b) -> output (o, p)


def _apply(mat: np.ndarray, x: jax.Array) -> jax.Array:
    """``mat @ x`` over ``x``'s leading axis (the other axes flattened and restored)."""
    y = lax.dot_general(jnp.asarray(mat, x.dtype), x.reshape(x.shape[0], -1), (((1,), (0,)), ((), ())))
    return y.reshape(mat.shape[0], *x.shape[1:])


def _input_transform(xp: jax.Array, tiles: int) -> jax.Array:
    """(b, 2t+2, 2t+2, c), padded -> (16, b*t*t, c): ``B^T d B`` of every 4x4 tile ``d`` (stride 2)."""
    b, _, _, c = xp.shape
    idx = 2 * np.arange(tiles)[None, :] + np.arange(4)[:, None]  # (4, t): row 2i + r of tile i
    d = xp[:, idx[:, None, :, None], idx[None, :, None, :]]  # (b, 4, 4, t, t, c): one gather
    v = lax.dot_general(jnp.asarray(_IN.reshape(16, 4, 4), xp.dtype), d, (((1, 2), (1, 2)), ((), ())))
    return v.reshape(16, b * tiles * tiles, c)


def _output_transform(m: jax.Array, b: int, tiles: int) -> jax.Array:
    """(16, b*t*t, k) -> (b, 2t, 2t, k): ``A^T m A`` of every tile, tiles put side by side."""
    y = _apply(_OUT, m).reshape(2, 2, b, tiles, tiles, -1).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(b, 2 * tiles, 2 * tiles, -1)


def _output_transform_t(dy: jax.Array, tiles: int) -> jax.Array:
    """The adjoint of ``_output_transform``: (b, 2t, 2t, k) -> (16, b*t*t, k), ``A dY A^T`` per tile."""
    b, _, _, k = dy.shape
    d = dy.reshape(b, tiles, 2, tiles, 2, k)  # (b, t, o, t, p, k)
    m = lax.dot_general(jnp.asarray(_OUT.T.reshape(16, 2, 2), dy.dtype), d, (((1, 2), (2, 4)), ((), ())))
    return m.reshape(16, b * tiles * tiles, k)


def _chunk(n: int, tiles_per_image: int) -> int:
    """Images per chunk: the smallest divisor of ``n`` giving at least MIN_TILE_ROWS tiles (else ``n``)."""
    for d in range(1, n + 1):
        if n % d == 0 and d * tiles_per_image >= MIN_TILE_ROWS:
            return d
    return n


def _over_chunks(fn: Callable[..., jax.Array], chunk: int, *arrays: jax.Array) -> jax.Array:
    """``fn`` applied to batch chunks of ``arrays``, results concatenated (one call when ``chunk`` is the batch)."""
    n = arrays[0].shape[0]
    if chunk == n:
        return fn(*arrays)
    out = lax.map(lambda a: fn(*a), tuple(a.reshape(n // chunk, chunk, *a.shape[1:]) for a in arrays))
    return out.reshape(n, *out.shape[2:])


def _padded(x: jax.Array, tiles: int) -> jax.Array:
    h, w = x.shape[1:3]
    return jnp.pad(x, ((0, 0), (1, 2 * tiles + 1 - h), (1, 2 * tiles + 1 - w), (0, 0)))


def _kernel_transform(w: jax.Array, g: np.ndarray) -> jax.Array:
    """(3, 3, c, k) -> (16, c, k): ``g w g^T`` over the two spatial axes."""
    return _apply(np.kron(g, g), w.reshape(9, *w.shape[2:]))


def _conv(x: jax.Array, u: jax.Array, contract: int, chunked: bool) -> jax.Array:
    """Winograd convolution of ``x`` with the transformed kernel ``u`` (16, c, k), contracting its axis ``contract``."""
    n, h, wd, _ = x.shape
    tiles = -(-max(h, wd) // 2)

    def one(xc: jax.Array) -> jax.Array:
        m = lax.dot_general(_input_transform(xc, tiles), u, (((2,), (contract,)), ((0,), (0,))))
        return _output_transform(m, xc.shape[0], tiles)

    y = _over_chunks(one, _chunk(n, tiles * tiles) if chunked else n, _padded(x, tiles))
    return y[:, :h, :wd]


def conv3x3(x: jax.Array, w: jax.Array, chunked: bool = True) -> jax.Array:
    """Stride-1 3x3 convolution with one pixel of zero padding: (n, h, w, c) x (3, 3, c, k) -> (n, h, w, k)."""
    return _conv(x, _kernel_transform(w, G), 1, chunked)


def conv3x3_input_grad(w: jax.Array, dy: jax.Array, chunked: bool = True) -> jax.Array:
    """d(conv3x3(x, w))/dx applied to ``dy``: the same convolution of ``dy`` with ``w`` rotated by 180 degrees
    (``G`` with its columns reversed) and its channel axes swapped (contracting ``k``)."""
    return _conv(dy, _kernel_transform(w, G[:, ::-1]), 2, chunked)


def conv3x3_kernel_grad(x: jax.Array, dy: jax.Array, chunked: bool = True) -> jax.Array:
    """d(conv3x3(x, w))/dw applied to ``dy``: (3, 3, c, k), summed over the batch chunk by chunk."""
    n, h, wd, c = x.shape
    k = dy.shape[-1]
    tiles = -(-max(h, wd) // 2)
    xp = _padded(x, tiles)
    dyp = jnp.pad(dy, ((0, 0), (0, 2 * tiles - h), (0, 2 * tiles - wd), (0, 0)))

    def part(xc: jax.Array, dc: jax.Array) -> jax.Array:
        v, dm = _input_transform(xc, tiles), _output_transform_t(dc, tiles)
        return lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))))

    chunk = _chunk(n, tiles * tiles) if chunked else n
    if chunk == n:
        du = part(xp, dyp)
    else:
        split = lambda a: a.reshape(n // chunk, chunk, *a.shape[1:])  # noqa: E731
        du, _ = lax.scan(lambda acc, a: (acc + part(*a), None), jnp.zeros((16, c, k), jnp.float32),
                         (split(xp), split(dyp)))
    return _apply(np.kron(G, G).T, du).reshape(3, 3, c, k).astype(x.dtype)
