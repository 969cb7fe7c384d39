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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_IMPLS = ("xla", "slice_dot", "hybrid")
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
    if isinstance(padding, str):
        pads = lax.padtype_to_pads((h, w), (kh, kw), (sh, sw), padding)
    else:
        pads = [tuple(p) for p in padding]
    (ph_lo, ph_hi), (pw_lo, pw_hi) = pads
    oh = (h + ph_lo + ph_hi - kh) // sh + 1
    ow = (w + pw_lo + pw_hi - kw) // sw + 1
    rows, rh_lo, rh_hi = _live_taps(h, kh, sh, ph_lo, oh)
    cols, rw_lo, rw_hi = _live_taps(w, kw, sw, pw_lo, ow)
    if kcin != cin or min(ph_lo, ph_hi, pw_lo, pw_hi) < 0 or oh <= 0 or ow <= 0 or not rows or not cols:
        return fallback()

    x = lhs
    if any((rh_lo, rh_hi, rw_lo, rw_hi)):
        x = lax.pad(lhs, jnp.zeros((), lhs.dtype), ((0, 0, 0), (rh_lo, rh_hi, 0), (rw_lo, rw_hi, 0), (0, 0, 0)))

    def tap(i: int, j: int) -> jax.Array:
        """(N, OH, OW, Cin): the input pixels multiplied by live tap (i, j), offsets in ``x``."""
        limit = (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, cin)
        return lax.slice(x, (0, i, j, 0), limit, (1, sh, sw, 1))

    patches = [tap(i, j) for i in range(len(rows)) for j in range(len(cols))]
    patch = patches[0] if len(patches) == 1 else lax.concatenate(patches, dimension=3)
    # Keep only live taps of the kernel, in the same (row, col, cin) order as the patches.
    kernel = rhs[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    kernel = kernel.reshape(len(rows) * len(cols) * cin, cout)
    return lax.dot_general(
        patch, kernel, (((3,), (0,)), ((), ())),
        precision=precision, preferred_element_type=preferred_element_type,
    )


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


ConvFn = Callable[..., jax.Array]


def conv_fn(impl: str) -> ConvFn:
    """The ``conv_general_dilated`` implementation named ``impl`` (one of ``CONV_IMPLS``)."""
    fns = {"xla": lax.conv_general_dilated, "slice_dot": slice_dot_conv, "hybrid": hybrid_conv}
    if impl not in fns:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {CONV_IMPLS}")
    return fns[impl]


def default_conv_impl(backend: str | None = None) -> str:
    """The implementation ``conv_impl="auto"`` resolves to: measured per backend (benchmarks/README.md).

    CPU: ``"hybrid"``; other backends: ``"xla"`` until measured there.
    """
    return "hybrid" if (backend or jax.default_backend()) == "cpu" else "xla"
