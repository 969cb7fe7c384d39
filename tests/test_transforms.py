"""The default model is plain Flax: forward-mode autodiff, vmap, export and lowering for TPU/GPU from this
CPU host work on every named network, and the program has no custom_vjp and no optimization_barrier. The
explicit CPU choice (``conv_impl="tuned_single_device"``) has both, so the checks below can fail.

Every named network is traced (not run) with its own stem, block, padding, shortcut and head, at width 4,
one block per stage (depth only repeats blocks) on 32x32 inputs; names that are then the same module
(resnet18/34, resnet50/101/152, resnet20...110) are checked once. The numbers are checked on ``tiny``
against an independent computation (reverse mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import adaresnet_jax as ar

X = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


def _model(name: str, **kw) -> ar.ResNet:
    """The named network at width 4, one block per stage."""
    stages = len(ar.create_model(name, num_classes=10).stage_sizes)
    return ar.create_model(name, num_classes=10, num_filters=4, stage_sizes=(1,) * stages, **kw)


def _distinct() -> dict[str, list[str]]:
    """Named networks grouped by the module ``_model`` gives them: first name -> all names."""
    groups: dict[str, list[str]] = {}
    for name in ar.MODEL_NAMES:
        first = next((f for f in groups if _model(f) == _model(name)), name)
        groups.setdefault(first, []).append(name)
    return groups


GROUPS = _distinct()


def _train_loss(model: ar.ResNet):
    """loss(params, batch_stats, x): a train-mode loss (batch statistics, as a training step computes it)."""
    def loss(params, batch_stats, x):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(x.shape[0]) % 10).mean()
    return loss


def _with_skips(params, skips):
    """``params`` with the skip weights of ``skips`` (flat path -> array) put in."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **skips})


def _skips(params):
    return {k: w for k, w in traverse_util.flatten_dict(params).items() if k[-1] == "skip_weight"}


def _grad_step(model: ar.ResNet):
    """jit of the train-mode gradient (forward and backward), as a train step lowers it."""
    return jax.jit(lambda v, x: jax.grad(_train_loss(model))(v["params"], v["batch_stats"], x))


@pytest.mark.parametrize("name", list(GROUPS), ids=["/".join(g) for g in GROUPS.values()])
def test_every_network_transforms_and_exports_for_tpu_and_cuda(name):
    model = _model(name)
    assert model.conv_impl == "xla"
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), X)
    loss = _train_loss(model)
    jax.eval_shape(lambda v, x: jax.jvp(lambda p: loss(p, v["batch_stats"], x), (v["params"],), (v["params"],)),
                   v, X)  # forward mode
    skip_loss = lambda s, v, x: loss(_with_skips(v["params"], s), v["batch_stats"], x)  # noqa: E731
    jax.eval_shape(jax.hessian(skip_loss), _skips(v["params"]), v, X)
    logits = lambda s, v, x: model.apply({**v, "params": _with_skips(v["params"], s)}, x, train=False)  # noqa: E731
    jax.eval_shape(jax.jacfwd(logits), _skips(v["params"]), v, X)
    per_image = jax.vmap(lambda x, v: model.apply(v, x[None], train=False)[0], in_axes=(0, None))
    assert jax.eval_shape(per_image, X, v).shape == (2, 10)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(v["params"], v["batch_stats"], X))
    assert "custom_vjp" not in jaxpr and "optimization_barrier" not in jaxpr
    exported = jax.export.export(_grad_step(model), platforms=["tpu", "cuda"])(v, X)
    assert exported.platforms == ("tpu", "cuda")
    assert "optimization_barrier" not in exported.mlir_module()


def test_the_cpu_choice_is_not_plain_and_lowers_for_tpu_only_if_asked():
    """The same checks see the CPU algorithms when they are chosen: custom_vjp in the jaxpr, barriers in
    the program (so the test above would fail on them)."""
    model = _model("resnet20", conv_impl="tuned_single_device")
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), X)
    loss = _train_loss(model)
    assert "custom_vjp" in str(jax.make_jaxpr(jax.grad(loss))(v["params"], v["batch_stats"], X))
    lowered = _grad_step(model).trace(v, X).lower(lowering_platforms=("cpu",)).as_text()
    assert "optimization_barrier" in lowered
    plain = _model("resnet20")
    for platform in ("tpu", "cuda", "cpu"):  # lowering for another platform than the host's
        text = _grad_step(plain).trace(v, X).lower(lowering_platforms=(platform,)).as_text()
        assert "stablehlo.convolution" in text and "optimization_barrier" not in text


@pytest.fixture(scope="module")
def tiny():
    model = ar.create_model("tiny", num_classes=10, skip_init=0.3)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    return model, model.init(jax.random.key(0), x, train=False), x


def test_jvp_and_jacfwd_equal_reverse_mode(tiny):
    model, v, x = tiny
    loss = lambda p: _train_loss(model)(p, v["batch_stats"], x)  # noqa: E731
    t = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), v["params"])
    value, directional = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(v["params"], t)
    g = jax.grad(loss)(v["params"])
    want = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(t)))
    np.testing.assert_allclose(value, loss(v["params"]), rtol=1e-6)
    np.testing.assert_allclose(directional, want, rtol=1e-4)
    logits = lambda s: model.apply({**v, "params": _with_skips(v["params"], s)}, x, train=False)  # noqa: E731
    skips = _skips(v["params"])
    fwd, rev = jax.jit(jax.jacfwd(logits))(skips), jax.jit(jax.jacrev(logits))(skips)
    for a, b in zip(jax.tree.leaves(fwd), jax.tree.leaves(rev)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_hessian_of_the_skip_weights_equals_reverse_over_reverse(tiny):
    model, v, x = tiny
    skips = _skips(v["params"])
    f = lambda s: _train_loss(model)(_with_skips(v["params"], s), v["batch_stats"], x)  # noqa: E731
    assert len(skips) == 2
    h = jax.jit(jax.hessian(f))(skips)  # forward over reverse
    r = jax.jit(jax.jacrev(jax.jacrev(f)))(skips)
    flat = lambda m: np.array([[np.asarray(m[a][b]).item() for b in skips] for a in skips])  # noqa: E731
    np.testing.assert_allclose(flat(h), flat(r), rtol=1e-4, atol=1e-7)
    assert np.allclose(flat(h), flat(h).T, rtol=1e-4, atol=1e-7) and np.abs(flat(h)).max() > 0


def test_vmap_over_images_equals_the_batch(tiny):
    """In evaluation each image is independent: vmap over single images gives the batch's logits."""
    model, v, x = tiny
    per_image = jax.vmap(lambda xi: model.apply(v, xi[None], train=False)[0])(x)
    np.testing.assert_allclose(per_image, model.apply(v, x, train=False), rtol=1e-5, atol=1e-6)
