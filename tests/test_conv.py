"""slice_dot_conv must equal lax.conv_general_dilated (values and gradients) on ResNet layer shapes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from adaresnet_jax.conv import CONV_IMPLS, conv_fn, default_conv_impl, hybrid_conv, slice_dot_conv

DN = ("NHWC", "HWIO", "NHWC")


def _rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(size: int, k: int, cin: int, cout: int, seed: int = 0, dtype=jnp.float32):
    """(2, size, size, cin) input and (k, k, cin, cout) kernel. numpy RNG: jax.random compiles slowly on CPU."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, size, size, cin), np.float32)
    w = rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _check_values_and_grads(size, k, stride, padding, cin, cout, conv_impl=slice_dot_conv, **kw):
    """Output and (input, kernel) vjp of `conv_impl` match lax, both jitted (one compile each)."""
    x, w = _inputs(size, k, cin, cout)

    def run(conv):
        f = lambda a, b: conv(a, b, (stride, stride), padding, dimension_numbers=DN, **kw)

        @jax.jit
        def fwd_bwd(a, b, ct):
            y, vjp = jax.vjp(f, a, b)
            return (y, *vjp(ct))

        ct = jnp.asarray(np.random.default_rng(1).standard_normal(jax.eval_shape(f, x, w).shape, np.float32))
        return fwd_bwd(x, w, ct)

    want, got = run(lax.conv_general_dilated), run(conv_impl)
    for g, e in zip(got, want):  # output, d/dx, d/dw
        assert g.shape == e.shape and g.dtype == e.dtype
        assert _rel(g, e) < 1e-5


STEM = [(s, 7, 2, p, 3, 8) for s in (32, 64) for p in ("SAME", ((3, 3), (3, 3)))]
CONV3 = [
    (s, 3, st, p, 8, 16)
    for s in (32, 16, 8, 7, 4, 3, 2, 1)
    for st in (1, 2)
    for p in ("SAME", ((1, 1), (1, 1)))
]
CONV1 = [(s, 1, st, p, 8, 16) for s in (8, 7, 4, 2, 1) for st in (1, 2) for p in ("SAME", "VALID")]


@pytest.mark.parametrize("size,k,stride,padding,cin,cout", STEM + CONV3 + CONV1)
def test_matches_lax(size, k, stride, padding, cin, cout):
    _check_values_and_grads(size, k, stride, padding, cin, cout)


@pytest.mark.parametrize(
    "size,k,stride,padding",
    [
        (5, 3, 1, "VALID"),
        (6, 3, 2, ((0, 2), (1, 0))),
        (4, 2, 1, "SAME"),
        (3, 5, 3, ((4, 4), (4, 4))),
        (6, 3, 20, ((9, 9), (9, 9))),
    ],
)
def test_other_paddings_match_lax(size, k, stride, padding):
    """Asymmetric/VALID/even-kernel padding, huge padding with dead taps at both ends, stride > size."""
    _check_values_and_grads(size, k, stride, padding, 4, 8)


@pytest.mark.parametrize(
    "size,k,stride,padding,taps,pads",
    [
        (1, 3, 1, "SAME", 1, 0),  # 1x1 map: centre tap only, a single dot, no padding
        (1, 3, 1, ((1, 1), (1, 1)), 1, 0),
        (2, 3, 2, "SAME", 4, 0),  # SAME pads (0, 1): the third row/col only reads padding
        (2, 3, 1, "SAME", 9, 1),
        (8, 1, 2, "VALID", 1, 0),  # strided 1x1: slice + dot
        (2, 7, 2, "SAME", 4, 0),
    ],
)
def test_dead_taps_skipped(size, k, stride, padding, taps, pads):
    x, w = _inputs(size, k, 8, 16)
    jaxpr = jax.make_jaxpr(lambda a, b: slice_dot_conv(a, b, (stride, stride), padding, dimension_numbers=DN))(x, w)
    prims = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert "conv_general_dilated" not in prims and prims.count("dot_general") == 1
    assert prims.count("pad") == pads
    dot = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general")
    assert dot.invars[1].aval.shape == (taps * 8, 16)


@pytest.mark.parametrize(
    "kw",
    [
        dict(rhs_dilation=(2, 2)),
        dict(lhs_dilation=(2, 2), padding=((1, 1), (1, 1))),
        dict(feature_group_count=2),
        dict(padding=((-1, 0), (0, 0))),  # negative pads: lax crops; not on the fast path
        dict(padding=((9, 0), (9, 0)), stride=20),  # the only output pixel reads padding only
    ],
)
def test_fallback_matches_lax(kw):
    kw = dict(kw)
    padding, stride = kw.pop("padding", "SAME"), kw.pop("stride", 1)
    groups = kw.get("feature_group_count", 1)
    x, _ = _inputs(6, 3, 8, 16)
    w = _inputs(6, 3, 8 // groups, 16)[1]
    args = (x, w, (stride, stride), padding)
    want = lax.conv_general_dilated(*args, dimension_numbers=DN, **kw)
    got = slice_dot_conv(*args, dimension_numbers=DN, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    jaxpr = jax.make_jaxpr(lambda a, b: slice_dot_conv(a, b, *args[2:], dimension_numbers=DN, **kw))(x, w)
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns] == ["conv_general_dilated"]


def test_other_layout_falls_back():
    x, w = _inputs(6, 3, 4, 8)
    xn, wn = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)  # NCHW, OIHW (lax's default)
    want = lax.conv_general_dilated(xn, wn, (1, 1), "SAME")
    np.testing.assert_allclose(slice_dot_conv(xn, wn, (1, 1), "SAME"), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "size,k,stride,padding", [(16, 3, 1, "SAME"), (4, 3, 2, "SAME"), (1, 3, 1, "SAME"), (32, 7, 2, "SAME")]
)
def test_bf16_close_to_f32(size, k, stride, padding):
    x, w = _inputs(size, k, 8, 16)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    conv = lambda impl, a, b, **kw: impl(a, b, (stride, stride), padding, dimension_numbers=DN, **kw)
    want = conv(lax.conv_general_dilated, x, w)
    got = jax.jit(lambda a, b: conv(slice_dot_conv, a, b))(xb, wb)
    assert got.dtype == conv(lax.conv_general_dilated, xb, wb).dtype == jnp.bfloat16
    assert _rel(got, want) < 1e-2
    got32 = jax.jit(lambda a, b: conv(slice_dot_conv, a, b, preferred_element_type=jnp.float32))(xb, wb)
    assert got32.dtype == jnp.float32 and _rel(got32, want) < 1e-2
    loss = lambda a, b: conv(slice_dot_conv, a, b).astype(jnp.float32).sum()
    gx, gw = jax.jit(jax.grad(loss, (0, 1)))(xb, wb)
    assert gx.dtype == gw.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "size,k,stride,padding",
    [(32, 7, 2, "SAME"), (32, 7, 2, 3), (4, 3, 2, "SAME"), (1, 3, 1, 1), (8, 1, 2, "VALID")],
)
def test_flax_conv(size, k, stride, padding):
    kwargs = dict(features=16, kernel_size=(k, k), strides=(stride, stride), padding=padding)
    x, w = _inputs(size, k, 8, 16)
    params = {"params": {"kernel": w, "bias": jnp.linspace(-1.0, 1.0, 16)}}  # no init: jax.random compiles slowly
    ref, fast = nn.Conv(**kwargs), nn.Conv(**kwargs, conv_general_dilated=slice_dot_conv)
    want, got = jax.jit(ref.apply)(params, x), jax.jit(fast.apply)(params, x)
    assert got.shape == want.shape and _rel(got, want) < 1e-5


def test_conv_fn():
    assert conv_fn("xla") is lax.conv_general_dilated
    assert conv_fn("slice_dot") is slice_dot_conv
    assert conv_fn("hybrid") is hybrid_conv
    assert set(CONV_IMPLS) == {"xla", "slice_dot", "hybrid"}
    with pytest.raises(ValueError, match=r"'bad'.*xla.*slice_dot.*hybrid"):
        conv_fn("bad")


@pytest.mark.parametrize("size,k,stride,big", [(8, 3, 1, True), (8, 3, 2, False), (4, 3, 1, False), (32, 7, 2, True)])
def test_hybrid_picks_by_output_size_and_matches_lax(size, k, stride, big):
    x, w = _inputs(size, k, 3, 8)
    args = ((stride, stride), "SAME")
    kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    hlo = jax.jit(lambda x, w: hybrid_conv(x, w, *args, **kw)).lower(x, w).as_text()
    assert ("convolution" in hlo) == big  # XLA's conv on maps over 16 positions, slice-and-dot below
    _check_values_and_grads(size, k, stride, "SAME", 3, 8, conv_impl=hybrid_conv)


def test_default_conv_impl():
    assert default_conv_impl("cpu") == "hybrid"
    assert default_conv_impl("gpu") == "xla" and default_conv_impl("tpu") == "xla"
    assert default_conv_impl() in CONV_IMPLS
