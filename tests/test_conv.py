"""Every convolution implementation must equal lax.conv_general_dilated (values and gradients) on ResNet layer shapes.

Tolerance: relative L2 error under 1e-5 for outputs and both gradients (the direct forms differ from XLA's
by float32 round-off, ~1e-7; Winograd F(2x2, 3x3) by ~1e-6), 5e-5 where Winograd F(4x4, 3x3) may run
(measured up to ~5e-6: its transforms multiply by up to 8 and divide by 6 and 24).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import adaresnet_jax as ar
from adaresnet_jax import conv as conv_lib
from adaresnet_jax import winograd
from adaresnet_jax.conv import CONV_IMPLS, Plan, conv_fn, conv_impl_for, hybrid_conv, slice_dot_conv, tuned_conv

DN = ("NHWC", "HWIO", "NHWC")


def _rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(size: int, k: int, cin: int, cout: int, seed: int = 0, dtype=jnp.float32, batch: int = 2):
    """(batch, size, size, cin) input and (k, k, cin, cout) kernel. numpy RNG: jax.random compiles slowly on CPU."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, cin), np.float32)
    w = rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _check_values_and_grads(size, k, stride, padding, cin, cout, conv_impl=slice_dot_conv, batch=2, tol=1e-5, **kw):
    """Output and (input, kernel) vjp of `conv_impl` match lax, both jitted (one compile each)."""
    x, w = _inputs(size, k, cin, cout, batch=batch)

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
        assert _rel(g, e) < tol


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


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_conv_fn_computes_lax_conv(impl):
    """Every named implementation, as flax's Conv calls it, gives lax's values and gradients (a 7x7/2 stem,
    a 3x3 on a 2x2 map)."""
    _check_values_and_grads(16, 7, 2, "SAME", 3, 8, conv_impl=conv_fn(impl))
    _check_values_and_grads(2, 3, 1, ((1, 1), (1, 1)), 8, 16, conv_impl=conv_fn(impl))


def test_conv_fn_refuses_an_unknown_name():
    with pytest.raises(ValueError, match=r"'bad'.*xla.*slice_dot.*hybrid.*tuned"):
        conv_fn("bad")


@pytest.mark.parametrize("size,k,stride,big", [(8, 3, 1, True), (8, 3, 2, False), (4, 3, 1, False), (32, 7, 2, True)])
def test_hybrid_picks_by_output_size_and_matches_lax(size, k, stride, big):
    x, w = _inputs(size, k, 3, 8)
    args = ((stride, stride), "SAME")
    kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    hlo = jax.jit(lambda x, w: hybrid_conv(x, w, *args, **kw)).lower(x, w).as_text()
    assert ("convolution" in hlo) == big  # XLA's conv on maps over 16 positions, slice-and-dot below
    _check_values_and_grads(size, k, stride, "SAME", 3, 8, conv_impl=hybrid_conv)


class _Device:
    """Stands for a jax.Device of another platform (conv_impl_for reads only ``platform``)."""

    def __init__(self, platform: str):
        self.platform = platform


@pytest.mark.parametrize("platform,n,requested,want", [
    ("cpu", 1, "auto", "tuned_single_device"), ("cpu", 4, "auto", "tuned"),  # barriers and chunks: one device only
    ("cpu", 1, "tuned", "tuned_single_device"), ("cpu", 2, "tuned_single_device", "tuned"),
    ("cpu", 2, "hybrid", "hybrid"), ("cpu", 1, "xla", "xla"),
    ("tpu", 1, "auto", "xla"), ("gpu", 8, "auto", "xla"), ("tpu", 4, "xla", "xla"),
])
def test_conv_impl_for_the_devices(platform, n, requested, want):
    assert conv_impl_for([_Device(platform)] * n, requested) == want


@pytest.mark.parametrize("impl", ["slice_dot", "hybrid", "tuned", "tuned_single_device"])
def test_conv_impl_for_refuses_a_cpu_algorithm_on_accelerators(impl):
    with pytest.raises(ValueError, match=f"'{impl}' is a CPU algorithm but the devices are tpu: pass .*xla"):
        conv_impl_for([_Device("tpu")] * 2, impl)
    with pytest.raises(ValueError, match="unknown conv impl 'fft'"):
        conv_impl_for([_Device("cpu")], "fft")


def test_conv_impl_for_a_mesh_and_the_compute_dtype():
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    assert conv_impl_for(mesh) == "tuned_single_device"  # this host's devices are CPUs
    assert conv_lib.compute_dtype_for(mesh) == "float32"
    assert conv_lib.compute_dtype_for([_Device("tpu")]) == "bfloat16"
    assert conv_lib.compute_dtype_for([_Device("tpu")], "float32") == "float32"


# ----------------------------------------------------------------------------- tuned: an algorithm per pass

def _pads(size, k, stride, padding):
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads((size, size), (k, k), (stride, stride), padding))
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    return tuple(tuple(p) for p in padding)


def _plan_conv(plan):
    """A conv_general_dilated-like function running every pass by ``plan``'s algorithms."""
    def f(a, b, strides, padding, dimension_numbers=None):
        pads = _pads(a.shape[1], b.shape[0], strides[0], padding)
        return conv_lib._tuned(a, b, tuple(strides), tuple(tuple(p) for p in pads), plan)
    return f


WINOGRAD = [(s, 3, 1, p, 8, 16) for s in (32, 16, 8, 7, 5, 4, 3, 2, 1) for p in ("SAME", ((1, 1), (1, 1)))]


@pytest.mark.parametrize("plan", [Plan("xla", "slice_dot", "im2col", True), Plan("slice_dot", "xla", "im2col", False)])
@pytest.mark.parametrize("size,k,stride,padding,cin,cout", STEM + CONV3 + CONV1)
def test_every_direct_algorithm_matches_lax(size, k, stride, padding, cin, cout, plan):
    """Both direct forward and input-gradient algorithms and the im2col kernel gradient (in chunks of up to
    1024 positions, and whole), each pass checked on every layer geometry the named networks use; batch 3
    (a prime: one-image chunks on 32x32 maps)."""
    _check_values_and_grads(size, k, stride, padding, cin, cout, conv_impl=_plan_conv(plan), batch=3)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("algorithm,tol", [("winograd", 1e-5), ("winograd4", 5e-5)])
@pytest.mark.parametrize("size,k,stride,padding,cin,cout", WINOGRAD)
def test_winograd_matches_lax(size, k, stride, padding, cin, cout, algorithm, tol, chunked):
    """Winograd F(2x2, 3x3) and F(4x4, 3x3) for all three passes, on even and odd maps down to 1x1."""
    assert conv_lib.winograd_applies((1, size, size, cin), (k, k, cin, cout), (stride, stride),
                                     _pads(size, k, stride, padding), jnp.float32)
    _check_values_and_grads(size, k, stride, padding, cin, cout, batch=3, tol=tol,
                            conv_impl=_plan_conv(Plan(algorithm, algorithm, algorithm, chunked)))


@pytest.mark.parametrize("chunk_bytes", [None, 1])
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("size,k,stride,padding,cin,cout", WINOGRAD + [(32, 3, 1, "SAME", 3, 16), (16, 3, 1, ((1, 1), (1, 1)), 32, 32)])
def test_shifted_kernel_grad_matches_lax(size, k, stride, padding, cin, cout, chunked, chunk_bytes, monkeypatch):
    """The "shifted" kernel gradient (three column shifts of x against three row shifts of dy, one product)
    on even and odd maps down to 1x1, as one batch and (chunk_bytes=1) one image per chunk."""
    if chunk_bytes is not None:
        monkeypatch.setattr(conv_lib, "SHIFTED_CHUNK_BYTES", chunk_bytes)
    _check_values_and_grads(size, k, stride, padding, cin, cout, batch=3,
                            conv_impl=_plan_conv(Plan("xla", "xla", "shifted", chunked)))


def test_shifted_kernel_grad_chunks_divide_the_batch(monkeypatch):
    """Images per chunk: the largest divisor of the batch whose two stacks fit in SHIFTED_CHUNK_BYTES."""
    x = jnp.zeros((12, 8, 8, 4))
    per_image = (8 + 2) * 8 * 3 * (4 + 4) * 4  # (h + 2) x w positions, 3 (c + k) float32 values each
    jaxpr = lambda **kw: str(jax.make_jaxpr(lambda a: conv_lib.shifted_kernel_grad(a, a, **kw))(x))  # noqa: E731
    monkeypatch.setattr(conv_lib, "SHIFTED_CHUNK_BYTES", 5 * per_image)
    assert "length=3" in jaxpr()  # 5 images fit, 4 divide 12: 3 chunks
    monkeypatch.setattr(conv_lib, "SHIFTED_CHUNK_BYTES", 12 * per_image)
    assert "scan" not in jaxpr() and "scan" not in jaxpr(chunked=False)  # the whole batch at once


@pytest.mark.parametrize("m,bound", [(2, 2e-6), (4, 2e-5)])
def test_winograd_round_off_against_float64(m, bound):
    """Winograd's error against the float64 convolution, next to XLA's own float32 error (~1e-7 here):
    F(2x2, 3x3) measured ~5e-7, F(4x4, 3x3) ~3e-6 on 8x8 maps with 256 channels."""
    x, w = _inputs(8, 3, 256, 256, batch=4)
    exact = np.asarray(lax.conv_general_dilated(np.asarray(x, np.float64), np.asarray(w, np.float64), (1, 1),
                                                "SAME", dimension_numbers=DN))
    err = lambda y: float(np.linalg.norm(np.asarray(y, np.float64) - exact) / np.linalg.norm(exact))  # noqa: E731
    assert err(winograd.conv3x3(x, w, m)) < bound


def test_winograd_chunks_divide_the_batch():
    """Images per chunk: the smallest divisor of the batch with at least 256 tiles (2x2 outputs each)."""
    assert winograd._chunk(128, 16 * 16) == 1      # 32x32 maps: 256 tiles per image
    assert winograd._chunk(128, 8 * 8) == 4        # 16x16 maps
    assert winograd._chunk(128, 4 * 4) == 16       # 8x8 maps
    assert winograd._chunk(6, 8 * 8) == 6          # 3 images (192 tiles) are too few: the whole batch
    assert winograd._chunk(7, 4 * 4) == 7          # a prime batch: everything at once


@pytest.mark.parametrize("size,cin,cout,forward,kernel_grad", [
    (32, 64, 64, "xla", "winograd4"),        # large map: XLA's convolution, Winograd kernel gradient
    (16, 128, 128, "winograd4", "winograd4"),
    (8, 256, 256, "winograd4", "winograd4"),  # 16x16 and smaller with >= 128 channels: Winograd
    (4, 512, 512, "winograd4", "winograd4"),
    (2, 256, 256, "winograd", "winograd"),    # 2x2: one F(2x2, 3x3) tile
    (1, 512, 512, "slice_dot", "im2col"),     # 1x1 map: the centre tap only
    (8, 64, 64, "xla", "winograd4"),         # few channels: XLA's convolution is as fast
    (4, 64, 64, "slice_dot", "winograd4"),
    (32, 16, 16, "xla", "shifted"),           # at most 32 channels on 16x16 and larger maps: shifted
    (32, 3, 16, "xla", "shifted"),            # (the CIFAR stem)
    (16, 32, 32, "xla", "shifted"),
    (8, 32, 32, "xla", "winograd4"),          # 8x8: the two extra rows cost 25%
])
def test_plan_follows_the_measured_rule(size, cin, cout, forward, kernel_grad):
    p = conv_lib.plan((128, size, size, cin), (3, 3, cin, cout), (1, 1), ((1, 1), (1, 1)), single_device=True)
    assert (p.forward, p.input_grad, p.kernel_grad) == (forward, forward, kernel_grad)
    if kernel_grad == "shifted":  # a batch sharded over devices is not chunked, and unchunked Winograd is faster
        assert conv_lib.plan((128, size, size, cin), (3, 3, cin, cout), (1, 1), ((1, 1), (1, 1))).kernel_grad \
            == "winograd4"
    strided = conv_lib.plan((128, 32, 32, 64), (3, 3, 64, 128), (2, 2), ((1, 1), (1, 1)))
    assert (strided.forward, strided.kernel_grad) == ("xla", "im2col")
    assert conv_lib.plan((2, 8, 8, 256), (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1)), jnp.bfloat16).forward == "xla"


def test_tuned_scans_over_batch_chunks_only_on_a_single_device():
    """A scan over a batch sharded over devices would gather it: without ``single_device`` the im2col
    kernel gradient takes the whole batch at once (no scan in the program)."""
    x, w = _inputs(32, 3, 4, 8, batch=8)  # 32x32 output: one image per 1024-position chunk
    jaxpr = lambda impl: str(jax.make_jaxpr(jax.grad(  # noqa: E731
        lambda b: conv_fn(impl)(x, b, (2, 2), "SAME", dimension_numbers=DN).sum()))(w))
    assert "scan" in jaxpr("tuned_single_device") and "scan" not in jaxpr("tuned")


def _network_layers():
    """Every distinct convolution (input shape without batch, kernel, strides, padding) of every named network,
    at 32x32 (how the benchmarks run them) and the ImageNet networks also at 224x224."""
    layers = set()
    imagenet = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
    for name in ar.MODEL_NAMES:
        for size in (32, 224) if name in imagenet else (32,):
            model = ar.create_model(name, num_classes=10, conv_impl="xla")
            x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
            v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
            jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(v, x)
            for eqn in jaxpr.jaxpr.eqns:
                if eqn.primitive.name == "conv_general_dilated":
                    p = eqn.params
                    layers.add((eqn.invars[0].aval.shape[1:], eqn.invars[1].aval.shape, p["window_strides"],
                                tuple(tuple(q) for q in p["padding"])))
    return sorted(layers)


@pytest.mark.slow
def test_tuned_matches_lax_on_every_layer_of_every_named_network():
    """tuned_conv as the models call it (its plan's algorithms, real channel counts), batch 2, every layer
    (tolerance 5e-5: F(4x4, 3x3) Winograd runs many kernel gradients)."""
    layers = _network_layers()
    assert len(layers) > 40
    rng = np.random.default_rng(0)
    for (h, w, cin), kshape, strides, pads in layers:
        x = jnp.asarray(rng.standard_normal((2, h, w, cin), np.float32))
        k = jnp.asarray(rng.standard_normal(kshape, np.float32) / np.sqrt(np.prod(kshape[:3])))

        def run(impl):
            f = lambda a, b: impl(a, b, strides, pads, dimension_numbers=DN)  # noqa: E731, B023
            y = jax.eval_shape(f, x, k)
            ct = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape, np.float32))
            return jax.jit(lambda a, b, g: (lambda yv: (yv[0], *yv[1](g)))(jax.vjp(f, a, b)))(x, k, ct)

        for got, want in zip(run(tuned_conv), run(lax.conv_general_dilated)):
            assert got.shape == want.shape and _rel(got, want) < 5e-5, ((h, w, cin), kshape, strides, pads)


@pytest.mark.parametrize("kw", [
    dict(rhs_dilation=(2, 2)), dict(feature_group_count=2), dict(padding=((-1, 0), (0, 0))),
    dict(preferred_element_type=jnp.float32),
])
def test_tuned_falls_back_outside_its_fast_path(kw):
    kw = dict(kw)
    padding = kw.pop("padding", "SAME")
    groups = kw.get("feature_group_count", 1)
    x, _ = _inputs(6, 3, 8, 16)
    w = _inputs(6, 3, 8 // groups, 16)[1]
    want = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN, **kw)
    np.testing.assert_allclose(tuned_conv(x, w, (1, 1), padding, dimension_numbers=DN, **kw), want, rtol=1e-5, atol=1e-6)
    xn, wn = x.transpose(0, 3, 1, 2), _inputs(6, 3, 8, 16)[1].transpose(3, 2, 0, 1)
    np.testing.assert_allclose(tuned_conv(xn, wn, (1, 1), "SAME"), lax.conv_general_dilated(xn, wn, (1, 1), "SAME"),
                               rtol=1e-5, atol=1e-6)


def test_tuned_bf16_close_to_f32():
    x, w = _inputs(8, 3, 8, 16)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    f = lambda a, b: tuned_conv(a, b, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    assert _rel(jax.jit(f)(xb, wb), f(x, w)) < 1e-2
    gx, gw = jax.jit(jax.grad(lambda a, b: f(a, b).astype(jnp.float32).sum(), (0, 1)))(xb, wb)
    rx, rw = jax.grad(lambda a, b: f(a, b).sum(), (0, 1))(x, w)
    assert gx.dtype == gw.dtype == jnp.bfloat16 and _rel(gx, rx) < 2e-2 and _rel(gw, rw) < 2e-2


def _train_grads(name, impls, x):
    """All parameter gradients (one vector) of a train-mode loss of ``name`` per conv implementation."""
    models = {i: ar.create_model(name, num_classes=10, conv_impl=i) for i in impls}
    v = models[impls[0]].init(jax.random.key(0), x, train=False)

    def grads(model):
        def loss(params):
            out, _ = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.shape[-1]))
        g = jax.jit(jax.grad(loss))(v["params"])
        return jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)])

    return v, models, {i: grads(m) for i, m in models.items()}


@pytest.mark.parametrize("name", ["tiny", "resnet20", pytest.param("resnet18_cifar", marks=pytest.mark.slow)])
def test_networks_train_the_same_with_tuned(name, image_batch):
    """Every parameter gradient of a train-mode loss: tuned equals xla (resnet18_cifar runs Winograd in all
    three passes of its 16x16 to 4x4 stages; the others use XLA's forward and Winograd kernel gradients)
    as closely as slice_dot, an exact reordering of the same sums, does. Train-mode BatchNorm over 4 images
    amplifies round-off, most in the skip weights' gradients (sums that nearly cancel on the digit images:
    slice_dot alone is ~5e-3 off xla on resnet18_cifar, tuned ~3e-3; ~1e-5 both on random inputs), so the
    whole gradient vector is compared, against 1e-4 or twice slice_dot's distance, whichever is larger."""
    _, _, g = _train_grads(name, ("xla", "slice_dot", "tuned", "tuned_single_device"), jnp.asarray(image_batch[0][:4]))
    for impl in ("tuned", "tuned_single_device"):
        assert _rel(g[impl], g["xla"]) < max(1e-4, 2 * _rel(g["slice_dot"], g["xla"])), impl


def test_paper_the_same_with_tuned(image_batch):
    """The seed's network (TF 'same' padding, conv biases): inference logits equal xla's, and the train-mode
    gradient is as close to xla's as hybrid's and slice_dot's are (~7e-4 here: its conv biases feed BatchNorm,
    their gradients are zero up to round-off, and its 1x1 maps normalise over 8 numbers)."""
    x = jnp.asarray(image_batch[0][:8])
    v, models, g = _train_grads("paper", ("xla", "hybrid", "tuned"), x)
    logits = {i: jax.jit(lambda v, m=m: m.apply(v, x, train=False))(v) for i, m in models.items()}
    assert _rel(logits["tuned"], logits["xla"]) < 1e-4
    assert _rel(g["tuned"], g["xla"]) <= 2 * _rel(g["hybrid"], g["xla"]) + 1e-5


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("size,padding", [(16, "SAME"), (16, ((1, 1), (1, 1))), (7, "SAME"), (7, ((1, 1), (1, 1))),
                                          (5, "VALID"), (2, "SAME"), (1, ((1, 1), (1, 1)))])
def test_slice_max_pool_equals_flax(size, padding, ties):
    """Values exactly nn.max_pool's; gradients too, ties included (each window's gradient goes to its first
    maximum, as select_and_scatter gives it), up to the order in which overlapping windows add up."""
    x = np.random.default_rng(0).standard_normal((3, size, size, 5), np.float32)
    x = jnp.asarray(np.maximum(np.round(x), 0) if ties else x)  # ties: mostly zeros and ones, as after a ReLU
    args = ((3, 3), (2, 2), padding)
    (want, vjp_want), (got, vjp_got) = jax.vjp(lambda a: nn.max_pool(a, *args), x), \
        jax.vjp(lambda a: conv_lib.slice_max_pool(a, *args), x)
    assert got.shape == want.shape and np.array_equal(got, want)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape, np.float32))
    g_want, g_got = np.asarray(vjp_want(ct)[0]), np.asarray(vjp_got(ct)[0])
    assert np.array_equal(g_got != 0, g_want != 0)  # the same inputs receive gradient
    np.testing.assert_allclose(g_got, g_want, rtol=0, atol=1e-6 * np.abs(g_want).max())


def test_barriers_only_under_tuned_single_device():
    """Under tuned_single_device each block's input is an optimization_barrier (XLA keeps the one buffer
    instead of recomputing it through the skip adds of every earlier block), and so are the max-pool's
    and the convolutions' backward inputs; other implementations, tuned (several devices, where the barrier
    changed XLA's partitioning) included, have none, forward or backward. Whatever the host."""
    images = jnp.zeros((2, 32, 32, 3))
    model = lambda impl: ar.create_model("resnet18", num_classes=10, num_filters=4, conv_impl=impl)  # noqa: E731
    v = jax.eval_shape(lambda: model("xla").init(jax.random.key(0), images, train=False))

    def count(impl):
        def loss(params, stats, x):
            out, _ = model(impl).apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return out.sum()
        return str(jax.make_jaxpr(jax.grad(loss))(v["params"], v["batch_stats"], images)).count("optimization_barrier")

    assert count("tuned_single_device") >= 8 + 1 + 20  # 8 blocks, the max-pool, 20 convolutions' backward
    assert count("xla") == count("hybrid") == count("tuned") == 0


def test_slice_max_pool_tied_window_gives_all_to_first():
    """An all-equal window: its whole gradient goes to the window's first input (row-major), none to the others."""
    x = jnp.zeros((1, 4, 4, 1))
    g = jax.grad(lambda a: conv_lib.slice_max_pool(a, (3, 3), (2, 2), "VALID").sum())(x)
    want = np.zeros((1, 4, 4, 1), np.float32)
    want[0, 0, 0, 0] = 1.0  # one 3x3/2 window on a 4x4 map (VALID): output (0, 0) reads rows and columns 0-2
    assert np.array_equal(g, want)


def test_the_trainer_chooses_for_its_devices():
    """train.py's model overrides follow the devices they are given, not the host: the CPU fast path on
    one CPU device, xla and bfloat16 (--dtype auto) for TPU devices, a CPU algorithm for TPU refused."""
    from adaresnet_jax.config import parse_config

    assert parse_config([]).model_overrides(jax.devices()[:1])["conv_impl"] == "tuned_single_device"
    tpu = parse_config(["--dtype", "auto"]).model_overrides([_Device("tpu")] * 4)
    assert tpu["conv_impl"] == "xla" and tpu["dtype"] == jnp.bfloat16
    with pytest.raises(ValueError, match="CPU algorithm"):
        parse_config(["--conv-impl", "hybrid"]).model_overrides([_Device("tpu")])
