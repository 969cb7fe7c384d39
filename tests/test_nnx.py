"""Flax NNX through the bridge: ``nnx.bridge.ToNNX`` with lazy init, a training step with ``nnx.Optimizer``
in which BatchNorm's statistics update, evaluation, and ``skip_weights`` on NNX state (README, "Flax NNX")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adaresnet_jax as ar


def _bridged(x, **kw):
    linen = ar.create_model("tiny", num_classes=10, **kw)
    model = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x, train=False)  # Linen's init, from a sample batch
    return linen, model


def test_nnx_train_step_updates_batch_stats_and_matches_linen():
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    y = jnp.array([0, 1, 2, 3])
    linen, model = _bridged(x)
    variables = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                 "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}
    np.testing.assert_array_equal(model(x, train=False), linen.apply(variables, x, train=False))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x, train=True, mutable=["batch_stats"])  # batch statistics, updated in place
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    before = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    loss = train_step(model, optimizer, x, y)

    # The same step in Linen, the reference.
    def linen_loss(params):
        logits, new = linen.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]
    (want_loss, want_stats), g = jax.value_and_grad(linen_loss, has_aux=True)(variables["params"])
    want_params = jax.tree.map(lambda p, d: p - 0.1 * d, variables["params"], g)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    after = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    assert not np.allclose(after["stem_bn"]["mean"], before["stem_bn"]["mean"])  # the statistics moved
    for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for got, want in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

    # Evaluation: the running averages, nothing changes.
    logits = nnx.jit(lambda m, x: m(x, train=False))(model, x)
    assert logits.shape == (4, 10)
    new_vars = {"params": want_params, "batch_stats": want_stats}
    np.testing.assert_allclose(logits, linen.apply(new_vars, x, train=False), rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))), jax.tree.leaves(after)):
        np.testing.assert_array_equal(got, want)


def test_skip_weights_of_nnx_state_are_arrays():
    x = jnp.zeros((1, 8, 8, 3))
    linen, model = _bridged(x, skip_init=0.25)
    for state in (nnx.state(model), nnx.state(model, nnx.Param)):
        ws = ar.skip_weights(state)
        assert list(ws) == ["stage1/block1", "stage2/block1"]
        assert all(isinstance(w, jax.Array) and w.shape == (1,) and float(w[0]) == 0.25 for w in ws.values())
    assert ar.skip_weights(nnx.state(_bridged(x, skip="identity")[1])) == {}
