"""Convolution as slice-and-dot (im2col), a faster drop-in for ``lax.conv`` on CPU.

On CPU, XLA's native convolution is slow for ResNet's late layers (maps of
4x4, 2x2, 1x1 with 128-512 channels). Writing the convolution as one strided
slice per kernel tap, concatenated on the channel axis and contracted with the
kernel in a single ``dot_general``, gives the same result (to float32
round-off) and lets XLA use its fast matmul. Taps that only ever read padding
are dropped, so e.g. a 3x3 SAME conv on a 1x1 map is a single 1x1 dot.
Gradients come from JAX autodiff through ``pad``/``slice``/``concatenate``/``dot``.

Use with flax: ``nn.Conv(..., conv_general_dilated=slice_dot_conv)``, or pick an
implementation by name with :func:`conv_fn`.

``tuned_conv`` goes further: a ``jax.custom_vjp`` that runs each of the three passes of each
convolution (forward, input gradient, kernel gradient) with the algorithm measured fastest for its
shape on CPU (:func:`plan`): XLA's convolution, slice-and-dot, Winograd F(2x2, 3x3) or F(4x4, 3x3)
(:mod:`adaresnet_jax.winograd`), or, for the kernel gradient, im2col products over cache-sized batch
chunks or the "shifted" product of few-channel 3x3 layers (:func:`shifted_kernel_grad`). XLA's own
kernel gradient is the slow part of a CPU train step (2-5x its forward pass). :func:`slice_max_pool`
and :func:`block_input` go with it: the network's other two CPU-specific pieces under ``"tuned"``.

None of this is the default: a :class:`~adaresnet_jax.models.ResNet` computes with ``lax.conv`` and
``nn.max_pool`` (``conv_impl="xla"``), so ``jvp``, ``hessian`` and ``jax.export`` for any platform work on it.
The CPU algorithms are a choice made for the devices a step is compiled for: :func:`conv_impl_for` (used by
the trainer and the benchmarks with their mesh), or ``create_model(..., conv_impl=...)`` by hand.
``"tuned_single_device"`` is ``"tuned"`` plus what only pays on one device: optimization barriers that
stop XLA recomputing skip-add chains, and cache-sized batch chunks (``lax.scan``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adaresnet_jax import winograd

CONV_IMPLS = ("xla", "slice_dot", "hybrid", "tuned", "tuned_single_device")
CPU_IMPLS = CONV_IMPLS[1:]  # the CPU algorithms: only for CPU devices (conv_impl_for)
# hybrid: slice_dot where the output map has at most this many positions, XLA elsewhere.
HYBRID_MAX_POSITIONS = 16

_NHWC_HWIO = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _live_taps(size: int, k: int, stride: int, lo: int, out: int) -> tuple[range, int, int]:
    """Along one spatial axis: live kernel taps, and the (lo, hi) padding they need.

    Output ``o`` with tap ``i`` reads input index ``o*stride + i - lo``. A tap is dropped
    when all its reads fall before the input or all fall after it, so the kept taps are
    a contiguous range (exact whenever ``stride <= size`` or ``out == 1``, as in a ResNet;
    otherwise a kept tap may still read only zeros, which is harmless). Dropping taps
    also drops padding only they would read (3x3 SAME on a 1x1 map: no padding at all).
    """
    live = range(max(0, lo - (out - 1) * stride), min(k, lo + size))
    if not live:
        return live, 0, 0
    last_read = (out - 1) * stride + live[-1] - lo  # input index read by the last output, last tap
    return live, lo - live[0], max(0, last_read - (size - 1))


def slice_dot_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` computing a 2-D conv as slices + one dot.

    Fast path: ``lhs`` (N, H, W, Cin) NHWC, ``rhs`` (KH, KW, Cin, Cout) HWIO, output
    (N, OH, OW, Cout) NHWC (flax's layout), any kernel size and stride, padding
    'SAME'/'VALID'/explicit ((lo, hi), (lo, hi)) with non-negative pads, no
    dilation, no grouping. Anything else falls back to ``lax.conv_general_dilated``
    with the same arguments, so the result is always correct.
    """
    args = dict(
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type,
    )
    fallback = lambda: lax.conv_general_dilated(lhs, rhs, window_strides, padding, **args)

    if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None:
        return fallback()
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if (
        dn != _NHWC_HWIO
        or feature_group_count != 1
        or batch_group_count != 1
        or any(d != 1 for d in (lhs_dilation or ()))
        or any(d != 1 for d in (rhs_dilation or ()))
    ):
        return fallback()

    n, h, w, cin = lhs.shape
    kh, kw, kcin, cout = rhs.shape
    sh, sw = window_strides
    pads = _pads((h, w), (kh, kw), (sh, sw), padding)
    (ph_lo, ph_hi), (pw_lo, pw_hi) = pads
    oh, ow = _out_size((h, w), (kh, kw), (sh, sw), pads)
    rows, rh_lo, rh_hi = _live_taps(h, kh, sh, ph_lo, oh)
    cols, rw_lo, rw_hi = _live_taps(w, kw, sw, pw_lo, ow)
    if kcin != cin or min(ph_lo, ph_hi, pw_lo, pw_hi) < 0 or oh <= 0 or ow <= 0 or not rows or not cols:
        return fallback()

    patch = _patch_matrix(lhs, (sh, sw), (oh, ow), rows, cols, (rh_lo, rh_hi, rw_lo, rw_hi))
    # Keep only live taps of the kernel, in the same (row, col, cin) order as the patches.
    kernel = rhs[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    kernel = kernel.reshape(len(rows) * len(cols) * cin, cout)
    return lax.dot_general(
        patch, kernel, (((3,), (0,)), ((), ())),
        precision=precision, preferred_element_type=preferred_element_type,
    )


def _patch_matrix(x: jax.Array, strides: tuple[int, int], out: tuple[int, int], rows: range, cols: range,
                  pads: tuple[int, int, int, int], gather: bool = False) -> jax.Array:
    """(N, OH, OW, live taps * Cin): the input pixels each live tap multiplies, taps in (row, col) order.

    ``pads`` (top, bottom, left, right) is the padding the live taps need (from ``_live_taps``).
    ``gather``: one gather instead of a slice per tap (XLA on CPU fuses it with the padding into one
    kernel, and compiles one kernel instead of one per tap); its gradient would be a scatter, so only
    for values that are never differentiated.
    """
    n, _, _, cin = x.shape
    (sh, sw), (oh, ow) = strides, out
    if any(pads):
        x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pads[0], pads[1], 0), (pads[2], pads[3], 0), (0, 0, 0)))
    if gather:
        r = (np.arange(len(rows))[None, :] + sh * np.arange(oh)[:, None])[:, None, :, None]  # (OH, 1, taps, 1)
        c = (np.arange(len(cols))[None, :] + sw * np.arange(ow)[:, None])[None, :, None, :]  # (1, OW, 1, taps)
        return x[:, r, c].reshape(n, oh, ow, len(rows) * len(cols) * cin)

    def tap(i: int, j: int) -> jax.Array:
        """(N, OH, OW, Cin): the input pixels multiplied by live tap (i, j), offsets in ``x``."""
        limit = (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, cin)
        return lax.slice(x, (0, i, j, 0), limit, (1, sh, sw, 1))

    patches = [tap(i, j) for i in range(len(rows)) for j in range(len(cols))]
    return patches[0] if len(patches) == 1 else lax.concatenate(patches, dimension=3)


def hybrid_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                padding: str | Sequence[tuple[int, int]], **kwargs: Any) -> jax.Array:
    """``slice_dot_conv`` for small output maps (at most ``HYBRID_MAX_POSITIONS``), XLA's otherwise.

    On CPU the slice-and-dot form wins by 6-30x on the 4x4 to 1x1 maps of the deep stages and
    loses (0.75-1x) on large maps with few channels such as the 7x7/2 stem.
    """
    out = jax.eval_shape(lambda a, b: lax.conv_general_dilated(a, b, window_strides, padding, **kwargs), lhs, rhs)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, kwargs.get("dimension_numbers"))
    positions = int(np.prod([out.shape[d] for d in dn.out_spec[2:]]))
    impl = slice_dot_conv if positions <= HYBRID_MAX_POSITIONS else lax.conv_general_dilated
    return impl(lhs, rhs, window_strides, padding, **kwargs)


# ----------------------------------------------------------------------------- tuned: an algorithm per pass

# winograd: F(2x2, 3x3); winograd4: F(4x4, 3x3) (adaresnet_jax.winograd)
FORWARD_ALGORITHMS = ("xla", "slice_dot", "winograd", "winograd4")
INPUT_GRAD_ALGORITHMS = ("xla", "slice_dot", "winograd", "winograd4")
KERNEL_GRAD_ALGORITHMS = ("xla", "im2col", "winograd", "winograd4", "shifted")
IM2COL_CHUNK_ROWS = 1024  # output positions per chunk of the im2col kernel gradient
SHIFTED_CHUNK_BYTES = 2 << 20  # the two shifted copies of one chunk of the "shifted" kernel gradient
SHIFTED_MAX_CHANNELS = 32  # "shifted" kernel gradient for stride-1 3x3 layers with at most this many channels
SHIFTED_MIN_POSITIONS = 256  # ... on maps of at least 16x16 (below, the padding ring costs too much)
WINOGRAD_MIN_CHANNELS = 128  # below, XLA's own convolution is as fast on CPU (forward and input gradient)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The algorithm of each pass of one convolution (see ``plan``); ``chunked``: scan over batch chunks."""

    forward: str
    input_grad: str
    kernel_grad: str
    chunked: bool = True


def winograd_applies(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int],
                     pads: Sequence[tuple[int, int]], dtype: Any) -> bool:
    """Stride-1 3x3 with one pixel of zero padding on every side (SAME and symmetric agree), float32."""
    return (tuple(w_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
            and tuple(map(tuple, pads)) == ((1, 1), (1, 1)) and jnp.dtype(dtype) == jnp.float32)


def plan(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int],
         pads: Sequence[tuple[int, int]], dtype: Any = jnp.float32, single_device: bool = False) -> Plan:
    """The measured choice for one NHWC/HWIO convolution on CPU (benchmarks/conv_profile.py, benchmarks/README.md).

    - forward and input gradient: Winograd for stride-1 3x3 layers with at least WINOGRAD_MIN_CHANNELS
      channels in and out on maps of 2x2 to 16x16, F(4x4, 3x3) from 4x4 up, F(2x2, 3x3) below (0.85x of
      XLA's time at 16x16, half or less at 8x8 and under); slice-and-dot for outputs of at most
      HYBRID_MAX_POSITIONS positions; XLA's convolution otherwise (large maps, and few channels);
    - kernel gradient: for stride-1 3x3 layers on maps of 16x16 and more with at most SHIFTED_MAX_CHANNELS
      channels in and out, the "shifted" product (``shifted_kernel_grad``, 1.1-1.5x faster than Winograd
      there on resnet56's layers); Winograd for every other stride-1 3x3 layer on a map of 2x2 or more (F(4x4, 3x3) from 4x4
      up), chunked im2col products for every other layer (XLA's own kernel gradient takes 2-5x as long).

    Chunks (cache-sized ``lax.scan``) and the "shifted" kernel gradient only with ``single_device`` (the
    caller knows where the step runs): a scan over a batch that is sharded over devices would gather it.
    """
    cin, cout = x_shape[3], w_shape[3]
    oh, ow = _out_size(x_shape[1:3], w_shape[:2], strides, pads)
    positions = oh * ow
    wino = winograd_applies(x_shape, w_shape, strides, pads, dtype) and positions >= 4
    winograd_m = "winograd4" if positions >= 16 else "winograd"
    if wino and positions <= 256 and min(cin, cout) >= WINOGRAD_MIN_CHANNELS:
        direct = winograd_m
    else:
        direct = "slice_dot" if positions <= HYBRID_MAX_POSITIONS else "xla"
    chunked = single_device
    if wino and chunked and positions >= SHIFTED_MIN_POSITIONS and max(cin, cout) <= SHIFTED_MAX_CHANNELS:
        kernel = "shifted"
    else:
        kernel = winograd_m if wino else "im2col"
    return Plan(forward=direct, input_grad=direct, kernel_grad=kernel, chunked=chunked)


def _pads(spatial: Sequence[int], window: Sequence[int], strides: Sequence[int],
          padding: str | Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """``padding`` ("SAME", "VALID" or explicit (lo, hi) pairs) as int (lo, hi) pairs, one per spatial axis."""
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(tuple(spatial), tuple(window), tuple(strides), padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _out_size(spatial: Sequence[int], window: Sequence[int], strides: Sequence[int],
              pads: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(rows, cols) of a convolution's or pooling's output: (size + padding - window) // stride + 1 per axis."""
    return tuple((spatial[d] + sum(pads[d]) - window[d]) // strides[d] + 1 for d in range(2))


def _tile(algorithm: str) -> int:
    """The output tile of a Winograd algorithm: 4 for "winograd4", 2 for "winograd"."""
    return 4 if algorithm == "winograd4" else 2


def forward(algorithm: str, x: jax.Array, w: jax.Array, strides: tuple[int, int],
            pads: Sequence[tuple[int, int]], chunked: bool = True) -> jax.Array:
    """The convolution (NHWC x HWIO -> NHWC) by ``algorithm`` (one of FORWARD_ALGORITHMS)."""
    if algorithm.startswith("winograd"):
        return winograd.conv3x3(x, w, _tile(algorithm), chunked)
    fn = slice_dot_conv if algorithm == "slice_dot" else lax.conv_general_dilated
    return fn(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def input_grad(algorithm: str, x: jax.Array, w: jax.Array, dy: jax.Array, strides: tuple[int, int],
               pads: Sequence[tuple[int, int]], chunked: bool = True) -> jax.Array:
    """d(conv(x, w))/dx applied to ``dy`` by ``algorithm``: winograd, or the autodiff of xla / slice_dot."""
    if algorithm.startswith("winograd"):
        return winograd.conv3x3_input_grad(w, dy, _tile(algorithm), chunked)
    return jax.vjp(lambda a: forward(algorithm, a, w, strides, pads), x)[1](dy)[0]


def kernel_grad(algorithm: str, x: jax.Array, w_shape: Sequence[int], dy: jax.Array, strides: tuple[int, int],
                pads: Sequence[tuple[int, int]], chunked: bool = True) -> jax.Array:
    """d(conv(x, w))/dw applied to ``dy`` by ``algorithm`` (one of KERNEL_GRAD_ALGORITHMS).

    ``im2col``: ``dy^T @ patches`` over the live taps, accumulated in float32 over batch chunks of about
    IM2COL_CHUNK_ROWS output positions, so each chunk's patch matrix stays in cache; dead taps get zeros.
    """
    if algorithm.startswith("winograd"):
        return winograd.conv3x3_kernel_grad(x, dy, _tile(algorithm), chunked)
    if algorithm == "shifted":
        return shifted_kernel_grad(x, dy, chunked)
    if algorithm == "xla":
        zero = jnp.zeros(w_shape, x.dtype)
        return jax.vjp(lambda b: forward("xla", x, b, strides, pads), zero)[1](dy)[0]
    (n, h, wd, c), (kh, kw, _, k) = x.shape, w_shape
    oh, ow = dy.shape[1:3]
    rows, rh_lo, rh_hi = _live_taps(h, kh, strides[0], pads[0][0], oh)
    cols, rw_lo, rw_hi = _live_taps(wd, kw, strides[1], pads[1][0], ow)

    def part(xc: jax.Array, dc: jax.Array) -> jax.Array:
        patch = _patch_matrix(xc, strides, (oh, ow), rows, cols, (rh_lo, rh_hi, rw_lo, rw_hi), gather=True)
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731 - XLA on CPU has no bf16 x bf16 -> f32 product
        return lax.dot_general(f32(dc), f32(patch), (((0, 1, 2), (0, 1, 2)), ((), ())))

    chunk = _largest_divisor(n, IM2COL_CHUNK_ROWS // (oh * ow)) if chunked else n
    g = winograd.sum_over_chunks(part, chunk, x, dy)
    live = g.T.reshape(len(rows), len(cols), c, k).astype(x.dtype)
    return jnp.zeros(w_shape, x.dtype).at[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].set(live)


def shifted_kernel_grad(x: jax.Array, dy: jax.Array, chunked: bool = True) -> jax.Array:
    """The kernel gradient of a stride-1 3x3 convolution with one pixel of zero padding: (3, 3, c, k).

    Tap (i, j)'s gradient is the sum over rows r and columns s of ``xp[r + i, s + j] dy[r, s]`` (``xp``: x
    zero-padded by one). Substituting r' = r + i, it is the sum over the h + 2 rows r' of ``xp[r', s + j]``
    times ``dy[r' - i, s]`` (zero outside dy). So with ``x3`` the three column shifts of ``xp`` side by side
    and ``d3`` the three row shifts of ``dy``, both (h + 2) x w maps, the one product ``x3^T d3`` (3c x 3k,
    contracting batch, rows and columns) holds all nine (c x k) blocks: block (j, i) is tap (i, j)'s
    gradient. No multiply is wasted but those of the two extra rows (6% at 32x32, 12% at 16x16), there
    is no transform, and the product is 3x wider than one tap's: for few channels that beats the nine thin
    products of im2col and Winograd's transforms. Chunks of the batch keep both stacks within
    SHIFTED_CHUNK_BYTES; accumulated in float32.
    """
    n, h, w, c = x.shape
    k = dy.shape[-1]

    def part(xc: jax.Array, dc: jax.Array) -> jax.Array:
        xp = jnp.pad(xc.astype(jnp.float32), ((0, 0), (1, 1), (1, 1), (0, 0)))
        x3 = jnp.concatenate([xp[:, :, j:j + w] for j in range(3)], axis=3)  # x3[.., r, s, j] = xp[.., r, s + j]
        dc = dc.astype(jnp.float32)  # d3[.., r, s, i] = dy[.., r - i, s]
        d3 = jnp.concatenate([jnp.pad(dc, ((0, 0), (i, 2 - i), (0, 0), (0, 0))) for i in range(3)], axis=3)
        return lax.dot_general(x3.reshape(-1, 3 * c), d3.reshape(-1, 3 * k), (((0,), (0,)), ((), ())))

    per_image = (h + 2) * w * 3 * (c + k) * 4
    chunk = _largest_divisor(n, SHIFTED_CHUNK_BYTES // per_image) if chunked else n
    g = winograd.sum_over_chunks(part, chunk, x, dy)  # (3 * c, 3 * k): rows (j, c), columns (i, k)
    return g.reshape(3, c, 3, k).transpose(2, 0, 1, 3).astype(x.dtype)


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``max(limit, 1)``."""
    return next(d for d in range(max(1, min(n, limit)), 0, -1) if n % d == 0)


Pads = tuple[tuple[int, int], tuple[int, int]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _tuned(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads, p: Plan) -> jax.Array:
    return forward(p.forward, x, w, strides, pads, p.chunked)


def _tuned_fwd(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads,
               p: Plan) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    if p.chunked:  # single device: see _tuned_bwd
        x = lax.optimization_barrier(x)
    return _tuned(x, w, strides, pads, p), (x, w)


def _tuned_bwd(strides: tuple[int, int], pads: Pads, p: Plan, res: tuple[jax.Array, jax.Array],
               dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    # x and dy as the buffers they are: left to itself, XLA recomputes the elementwise chain that makes
    # each of them (BatchNorm, the skip add, ReLU, several blocks deep) inside the kernel gradient's
    # reshape for its chunks, on every use (single device only, as block_input)
    if p.chunked:
        dy = lax.optimization_barrier(dy)
    with jax.named_scope("input_grad"):  # named in the HLO, so a profile can tell the passes apart
        dx = input_grad(p.input_grad, x, w, dy, strides, pads, p.chunked)
    with jax.named_scope("kernel_grad"):
        dw = kernel_grad(p.kernel_grad, x, w.shape, dy, strides, pads, p.chunked)
    return dx, dw


_tuned.defvjp(_tuned_fwd, _tuned_bwd)


def tuned_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
               padding: str | Sequence[tuple[int, int]], *, single_device: bool = False, **kwargs: Any) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated``: each pass of each convolution by the algorithm ``plan`` picks.

    Fast path: NHWC/HWIO 2-D convolutions without dilation or groups, non-negative padding, no
    ``precision``/``preferred_element_type``; anything else is ``hybrid_conv``. Values and gradients equal
    ``lax.conv_general_dilated``'s up to float32 round-off (Winograd: relative error ~1e-6 for F(2x2, 3x3), ~5e-6 for F(4x4, 3x3)).
    ``single_device``: the step runs on one device, so batch chunks and barriers may be used (see ``plan``).
    """
    dn = kwargs.get("dimension_numbers")
    plain = all(kwargs.get(k) in (None, 1, (1, 1)) for k in
                ("lhs_dilation", "rhs_dilation", "feature_group_count", "batch_group_count", "precision",
                 "preferred_element_type"))
    if (lhs.ndim != 4 or rhs.ndim != 4 or dn is None or not plain
            or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn) != _NHWC_HWIO or rhs.shape[2] != lhs.shape[3]):
        return hybrid_conv(lhs, rhs, window_strides, padding, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    pads = _pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    if min(min(p) for p in pads) < 0 or min(_out_size(lhs.shape[1:3], rhs.shape[:2], strides, pads)) <= 0:
        return hybrid_conv(lhs, rhs, window_strides, padding, **kwargs)
    return _tuned(lhs, rhs, strides, pads, plan(lhs.shape, rhs.shape, strides, pads, lhs.dtype, single_device))


def slice_max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int],
                   padding: str | Sequence[tuple[int, int]], single_device: bool = False) -> jax.Array:
    """``flax.linen.max_pool`` on an NHWC batch as the maximum of one strided slice per window tap.

    The same values and the same gradient as ``nn.max_pool``, ties included: each output's gradient goes
    to the first maximum of its window in row-major order, as XLA's ``select_and_scatter`` gives it
    (padding never wins: it is ``-inf``). The forward pass records that tap's index (int8 up to 127 taps) and the
    backward pass adds one masked, strided copy of the gradient per tap, a ``jax.custom_vjp``: autodiff
    through the chain of maxima re-derives every comparison for every tap, and XLA's fusion of that on
    CPU can cost 5x as much. On CPU its forward and backward take a fifth of the time of XLA's
    ``reduce_window`` / ``select_and_scatter`` (3x3/2 on the 16x16x64 maps of the ImageNet stem at 32x32,
    batch 128). ``single_device``: the backward pass's inputs behind an ``optimization_barrier`` (as
    :func:`block_input`).
    """
    n, h, w, c = x.shape
    (kh, kw), (sh, sw) = tuple(window), tuple(strides)
    pads = _pads((h, w), (kh, kw), (sh, sw), padding)
    return _max_pool(x, (kh, kw), (sh, sw), pads, bool(single_device))


def _pool_taps(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], pads: Pads) -> list[jax.Array]:
    """One strided slice of the ``-inf``-padded input per window tap, taps in row-major order."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), ((top, bottom), (left, right)) = window, strides, pads
    oh, ow = _out_size((h, w), window, strides, pads)
    xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    return [lax.slice(xp, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], pads: Pads, barrier: bool) -> jax.Array:
    return functools.reduce(jnp.maximum, _pool_taps(x, window, strides, pads))


def _max_pool_fwd(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                  pads: Pads, barrier: bool) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    taps = _pool_taps(x, window, strides, pads)
    y = functools.reduce(jnp.maximum, taps)
    index = jnp.int8 if len(taps) <= 127 else jnp.int32
    first = jnp.zeros(y.shape, index)  # the first tap equal to the maximum, found from the last tap down
    for i in range(len(taps) - 1, -1, -1):
        first = jnp.where(taps[i] == y, index(i), first)
    return y, (first, jnp.zeros((0,) + x.shape[1:], x.dtype))  # the empty array carries x's shape and dtype


def _max_pool_bwd(window: tuple[int, int], strides: tuple[int, int], pads: Pads, barrier: bool,
                  res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    first, like = res
    # computed once each: left to itself, XLA fuses both into the sum below and redoes them for every tap
    # (single device only, as block_input)
    if barrier:
        first, g = lax.optimization_barrier((first, g))
    h, w = like.shape[1:3]
    (kh, kw), (sh, sw), ((top, bottom), (left, right)) = window, strides, pads
    oh, ow = g.shape[1:3]
    hp, wp = h + top + bottom, w + left + right
    zero = jnp.zeros((), g.dtype)
    dxp = None
    for i in range(kh):
        for j in range(kw):
            part = jnp.where(first == i * kw + j, g, zero)
            # the transpose of the tap's strided slice: its values back at rows i, i + sh, ... of the padded input
            part = lax.pad(part, zero, ((0, 0, 0), (i, hp - i - (oh - 1) * sh - 1, sh - 1),
                                        (j, wp - j - (ow - 1) * sw - 1, sw - 1), (0, 0, 0)))
            dxp = part if dxp is None else dxp + part
    return (dxp[:, top:top + h, left:left + w],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def block_input(x: jax.Array, impl: str) -> jax.Array:
    """A residual block's input, for the convolution implementation ``impl``: under ``"tuned_single_device"``
    an ``optimization_barrier``, so that XLA keeps it as the one buffer it has to be anyway (the block's first
    convolution reads it). Otherwise XLA on CPU recomputes it wherever the skip path or a ReLU's gradient
    needs it, and that recomputation recurses through the skip adds of every block before: on resnet56 some
    of its fusions read a dozen feature maps to write one. Not over several devices (``"tuned"``): there the
    barrier changed how XLA partitions the step (a 2-process run stopped matching the 4-device one to 1e-5,
    tests/test_faults.py). Other implementations: ``x``."""
    return lax.optimization_barrier(x) if impl == "tuned_single_device" else x


def max_pool_fn(impl: str) -> Callable[..., jax.Array]:
    """The max pooling that goes with the convolution implementation ``impl``: ``slice_max_pool`` for
    ``"tuned"`` (with barriers for ``"tuned_single_device"``), ``flax.linen.max_pool`` for the others."""
    if impl.startswith("tuned"):
        return functools.partial(slice_max_pool, single_device=impl == "tuned_single_device")
    return nn.max_pool


ConvFn = Callable[..., jax.Array]


def conv_fn(impl: str) -> ConvFn:
    """The ``conv_general_dilated`` implementation named ``impl`` (one of ``CONV_IMPLS``)."""
    fns = {"xla": lax.conv_general_dilated, "slice_dot": slice_dot_conv, "hybrid": hybrid_conv, "tuned": tuned_conv,
           "tuned_single_device": functools.partial(tuned_conv, single_device=True)}
    if impl not in fns:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {CONV_IMPLS}")
    return fns[impl]


Devices = Any  # a jax.sharding.Mesh or a sequence of jax.Device


def device_list(devices: Devices) -> list[Any]:
    """The devices of a ``Mesh`` (any shape) or of a sequence of devices, as a flat list."""
    if isinstance(devices, jax.sharding.Mesh):
        devices = devices.devices
    devs = list(np.asarray(devices, dtype=object).reshape(-1))
    if not devs:
        raise ValueError("no devices given: pass a Mesh or a non-empty list of jax.Device")
    return devs


def conv_impl_for(devices: Devices, requested: str = "auto") -> str:
    """The ``conv_impl`` for a step compiled for ``devices`` (a ``Mesh`` or a sequence of ``jax.Device``).

    ``"auto"``: on CPU devices only, ``"tuned_single_device"`` for one device and ``"tuned"`` for several
    (1.0-1.5x ``"hybrid"``'s train step on the benchmark networks, benchmarks/README.md); ``"xla"`` for
    any other platform (TPU, GPU), where the CPU algorithms were never measured. ``"tuned"`` on a single
    CPU device becomes ``"tuned_single_device"``, ``"tuned_single_device"`` on several becomes ``"tuned"``.
    A CPU algorithm (``CPU_IMPLS``) asked for non-CPU devices is a ``ValueError``.
    """
    if requested not in ("auto", *CONV_IMPLS):
        raise ValueError(f"unknown conv impl {requested!r}; choose auto or one of {', '.join(CONV_IMPLS)}")
    devs = device_list(devices)
    platforms = sorted({d.platform for d in devs})
    on_cpu = platforms == ["cpu"]
    if requested == "auto":
        requested = "tuned" if on_cpu else "xla"
    if requested in CPU_IMPLS and not on_cpu:
        raise ValueError(f"conv impl {requested!r} is a CPU algorithm but the devices are {'/'.join(platforms)}: "
                         "pass --conv-impl auto or xla (conv_impl='xla')")
    if requested.startswith("tuned"):
        requested = "tuned_single_device" if len(devs) == 1 else "tuned"
    return requested


def compute_dtype_for(devices: Devices, requested: str = "auto") -> str:
    """``"auto"`` resolved for ``devices``: ``"float32"`` when every device is a CPU, ``"bfloat16"`` otherwise
    (GPU, TPU); any other ``requested`` as it is."""
    if requested != "auto":
        return requested
    return "float32" if all(d.platform == "cpu" for d in device_list(devices)) else "bfloat16"
