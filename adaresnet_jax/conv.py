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
from jax import lax

CONV_IMPLS = ("xla", "slice_dot")

_NHWC_HWIO = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _live_taps(size: int, k: int, stride: int, lo: int, out: int) -> list[int]:
    """Kernel offsets (along one spatial axis) that read real input somewhere.

    Output position ``o`` with tap ``i`` reads input index ``o*stride + i - lo``;
    a tap is dead when that index is outside ``[0, size)`` for every ``o < out``.
    """
    return [i for i in range(k) if i - lo < size and (out - 1) * stride + i - lo >= 0]


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
    rows = _live_taps(h, kh, sh, ph_lo, oh)
    cols = _live_taps(w, kw, sw, pw_lo, ow)
    if kcin != cin or min(ph_lo, ph_hi, pw_lo, pw_hi) < 0 or oh <= 0 or ow <= 0 or not rows or not cols:
        return fallback()

    x = lhs
    if any((ph_lo, ph_hi, pw_lo, pw_hi)):
        x = lax.pad(lhs, jnp.zeros((), lhs.dtype), ((0, 0, 0), (ph_lo, ph_hi, 0), (pw_lo, pw_hi, 0), (0, 0, 0)))

    def tap(i: int, j: int) -> jax.Array:
        """(N, OH, OW, Cin): the input pixels that kernel tap (i, j) multiplies."""
        start = (0, i, j, 0)
        limit = (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, cin)
        return lax.slice(x, start, limit, (1, sh, sw, 1))

    patches = [tap(i, j) for i in rows for j in cols]
    cols_x = patches[0] if len(patches) == 1 else lax.concatenate(patches, dimension=3)
    # Keep only live taps of the kernel, in the same (row, col, cin) order as the patches.
    kernel = rhs[rows[0] : rows[-1] + 1][:, cols[0] : cols[-1] + 1]
    kernel = kernel.reshape(len(rows) * len(cols) * cin, cout)
    return lax.dot_general(
        cols_x, kernel, (((3,), (0,)), ((), ())),
        precision=precision, preferred_element_type=preferred_element_type,
    )


ConvFn = Callable[..., jax.Array]


def conv_fn(impl: str) -> ConvFn:
    """The ``conv_general_dilated`` implementation named ``impl`` (one of ``CONV_IMPLS``)."""
    if impl == "xla":
        return lax.conv_general_dilated
    if impl == "slice_dot":
        return slice_dot_conv
    raise ValueError(f"unknown conv impl {impl!r}; choose one of {CONV_IMPLS}")


def default_conv_impl(backend: str | None = None) -> str:
    """"slice_dot" on CPU (measured faster there), "xla" elsewhere (not yet measured)."""
    return "slice_dot" if (backend or jax.default_backend()) == "cpu" else "xla"
