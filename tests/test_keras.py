"""Our networks against the seed's Keras code: weights copied with adaresnet_jax.keras_weights.

The seed's network is rebuilt here in Keras 3 (JAX backend), from the seed document's code: its
``AddWithWeight`` layer and its two block kinds. Tolerances are float32 round-off: both sides compute
the same function in float32 with different operation orders (BatchNorm folded differently, our CPU
convolutions partly slice-and-dot products). Measured on CPU (max abs difference; relative: divided by
the largest value compared): ``paper`` inference logits 2.4e-7 (4e-7), ``resnet50_keras`` 7.7e-7
(7e-7); the training step: softmax outputs 4.8e-6 (1e-5), loss 5e-6 (2e-6), gradients 1.8e-4 (1.5e-5
of the largest), moving statistics 1.2e-7. The asserted tolerances leave a margin of 5x or more.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import traverse_util  # noqa: E402

try:
    import keras
except ImportError:  # CI installs it through the `test` extra
    pytest.skip("keras (Keras 3) is not installed: pip install keras, or the package's [test] extra",
                allow_module_level=True)

import adaresnet_jax as ar  # noqa: E402
from adaresnet_jax import keras_weights  # noqa: E402

if keras.backend.backend() != "jax":
    pytest.skip(f"these tests run Keras on its JAX backend, not {keras.backend.backend()!r}",
                allow_module_level=True)

layers = keras.layers
# Keras' own HDF5 writer converts its variables with np.array(x), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


# --------------------------------------------------------------- the seed's network, in Keras 3

class AddWithWeight(layers.Layer):
    """The seed's layer: a trainable scalar, zero-initialised; ``[x, d] -> d + w * x``."""

    def build(self, input_shape):
        self.Weight = self.add_weight(name="Weight", shape=(1,), initializer="zeros", trainable=True)

    def call(self, inputs):
        x, d = inputs
        return d + self.Weight * x


def identity_block(x, filters, kernel_size=3):
    x_skip = x
    x = layers.Conv2D(filters, kernel_size, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(filters, kernel_size, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = AddWithWeight()([x_skip, x])
    return layers.ReLU()(x)


def convolutional_block(x, filters, kernel_size=3, strides=2):
    x_skip = x
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(filters, kernel_size, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x_skip = layers.Conv2D(filters, 1, strides=strides, padding="same")(x_skip)
    x_skip = layers.BatchNormalization()(x_skip)
    x = AddWithWeight()([x_skip, x])
    return layers.ReLU()(x)


def build_custom_resnet(input_shape=(32, 32, 3), num_classes=10, width=64, activation="softmax"):
    """The seed's ``build_custom_resnet``, with its width (64) and head activation as arguments."""
    inputs = layers.Input(shape=input_shape)
    x = layers.Conv2D(width, 7, strides=2, padding="same")(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D(pool_size=3, strides=2, padding="same")(x)
    for filters in (width, 2 * width, 4 * width, 8 * width):
        x = convolutional_block(x, filters)
        x = identity_block(x, filters)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, activation=activation)(x)
    return keras.Model(inputs, outputs)


def perturb(model, seed=0):
    """Non-trivial values for what Keras initialises to constants: skip weights (zeros), biases
    (zeros), BatchNorm scale/offset (1/0) and moving statistics (0/1), so every mapping shows."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            c = layer.gamma.shape
            layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            layer.beta.assign(rng.normal(0, 0.1, c))
            layer.moving_mean.assign(rng.normal(0, 0.2, c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
        elif isinstance(layer, (layers.Conv2D, layers.Dense)) and layer.bias is not None:
            layer.bias.assign(rng.normal(0, 0.05, layer.bias.shape))
        elif len(layer.weights) == 1:  # AddWithWeight
            layer.weights[0].assign(rng.uniform(-1.0, 1.0, (1,)))
    return model


def images(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 32, 32, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------ the tests

def test_paper_full_width_inference_matches_keras():
    """The seed's network at its real width: our ``paper`` with the Keras weights gives its logits."""
    keras.utils.set_random_seed(0)
    km = perturb(build_custom_resnet(activation=None))
    model = ar.create_model("paper", num_classes=10)
    variables = keras_weights.from_keras(km, model=model)
    assert sum(np.size(w) for w in jax.tree.leaves(variables["params"])) == 11_190_738
    x = images(4)
    ours = model.apply(variables, x, train=False)
    theirs = km(x, training=False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_paper_training_step_matches_keras():
    """One training step of the seed's setup (softmax head, categorical cross-entropy, BatchNorm on
    batch statistics, momentum 0.99) against ours (logits, softmax cross-entropy): the outputs, the
    loss, every gradient and every updated moving statistic agree to float32 round-off."""
    keras.utils.set_random_seed(1)
    km = perturb(build_custom_resnet(width=8), seed=1)
    model = ar.create_model("paper", num_classes=10, num_filters=8)
    x, y = images(16, seed=1), np.random.default_rng(1).integers(0, 10, 16)

    def keras_loss(trainable, non_trainable):
        probs, non_trainable = km.stateless_call(trainable, non_trainable, x, training=True)
        loss = keras.losses.categorical_crossentropy(jax.nn.one_hot(y, 10), probs).mean()
        return loss, (probs, non_trainable)

    tv = [v.value for v in km.trainable_variables]
    ntv = [v.value for v in km.non_trainable_variables]
    (k_loss, (k_probs, k_stats)), k_grads = jax.value_and_grad(keras_loss, has_aux=True)(tv, ntv)

    v = keras_weights.from_keras(km, model=model)

    def our_loss(params):
        logits, upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                                  mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, upd["batch_stats"])

    (loss, (logits, stats)), grads = jax.value_and_grad(our_loss, has_aux=True)(v["params"])

    # Keras' gradients and new moving statistics, in our layout.
    k = keras_weights.from_keras(km, trainable=k_grads, non_trainable=k_stats, model=model)
    np.testing.assert_allclose(jax.nn.softmax(logits), k_probs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss, k_loss, rtol=1e-5)
    ours, theirs = (traverse_util.flatten_dict(t, sep="/") for t in (grads, k["params"]))
    assert ours.keys() == theirs.keys()
    largest = max(float(jnp.abs(g).max()) for g in ours.values())
    for key, g in ours.items():
        # 1e-4 of the leaf's largest gradient, or 1e-5 of the largest anywhere: the conv biases
        # before a BatchNorm have an exact gradient of 0, computed as round-off on both sides.
        err = float(jnp.abs(g - theirs[key]).max())
        assert err <= 1e-4 * float(jnp.abs(g).max()) + 1e-5 * largest, (key, err)
    ours, theirs = (traverse_util.flatten_dict(t, sep="/") for t in (stats, k["batch_stats"]))
    assert ours.keys() == theirs.keys()
    for key, s in ours.items():
        np.testing.assert_allclose(s, theirs[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_load_a_saved_seed_model(tmp_path, suffix):
    keras.utils.set_random_seed(2)
    km = perturb(build_custom_resnet(width=4), seed=2)
    path = tmp_path / f"seed{suffix}"
    km.save(path)
    loaded = keras_weights.load_keras(path, model=ar.create_model("paper", num_classes=10, num_filters=4))
    direct = keras_weights.from_keras(km)
    assert jax.tree.structure(loaded) == jax.tree.structure(direct)
    jax.tree.map(np.testing.assert_array_equal, loaded, direct)


def test_mismatched_models_are_refused():
    km = build_custom_resnet(width=4)
    with pytest.raises(ValueError, match="unexpected params/stage1_block1/skip/skip_weight"):
        keras_weights.from_keras(km, model=ar.create_model("paper", num_classes=10, num_filters=4, skip="identity"))
    with pytest.raises(ValueError, match="epsilon 0.001.*ours 1e-05"):
        keras_weights.from_keras(km, model=ar.create_model("paper", num_classes=10, num_filters=4, bn_epsilon=1e-5))
    with pytest.raises(ValueError, match="weights only"):
        keras_weights.load_keras("model.weights.h5")


def test_resnet50_keras_inference_matches_keras_applications():
    """The seed's baseline: keras.applications.ResNet50(weights=None, classes=10) at 32x32."""
    keras.utils.set_random_seed(3)
    km = perturb(keras.applications.ResNet50(weights=None, classes=10, input_shape=(32, 32, 3),
                                             classifier_activation=None), seed=3)
    assert km.count_params() == 23_608_202
    model = ar.create_model("resnet50_keras", num_classes=10, skip="identity")
    variables = keras_weights.from_keras(km, model=model)
    x = images(2, seed=3)
    ours = model.apply(variables, x, train=False)
    theirs = km(x, training=False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
