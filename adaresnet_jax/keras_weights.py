"""Weights from Keras: the seed's AdaResNet code, and ``keras.applications.ResNet50``, to our variables.

>>> variables = from_keras(keras_model, model=ar.create_model("paper", num_classes=10))
>>> variables = load_keras("adaresnet.keras")         # a .keras file, or a full-model .h5 file
>>> logits = ar.create_model("paper", num_classes=10).apply(variables, x, train=False)

The Keras model is read as a graph, not by layer names (the seed's layers have Keras' automatic
names): from the output back to the input, every layer with two inputs closes a residual block.
Of its two paths back to the point where they meet (the block input), the one with more
convolutions is the branch ``F`` (``Conv_0``, ``BatchNorm_0``, ``Conv_1``, ... in order) and the
other the shortcut (nothing, or one 1x1 convolution and BatchNorm: ``proj_conv``, ``proj_bn``). The
merge layer's single weight, if it has one, is the block's ``skip/skip_weight``: the merge must
compute ``branch + w * shortcut``, as the seed's ``AddWithWeight`` and ``AddWithWeight2`` do (a plain
``Add``, as in ResNet50, has none: use ``skip="identity"``). The convolution and BatchNorm before
the first block are ``stem_conv`` and ``stem_bn``, the Dense layer after the last is ``head`` (its
activation, the seed's softmax, is not ours: our models return logits). A new stage starts at every
block with a projection shortcut. Keras kernels are already HWIO / (in, out), as flax's; Keras'
BatchNorm momentum means what flax's does (``new = momentum * old + (1 - momentum) * batch``).

Keras is needed only here (``pip install keras``, Keras 3). If ``KERAS_BACKEND`` is unset and
TensorFlow is not installed, importing this module's functions selects Keras' JAX backend.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def _keras() -> Any:
    if "keras" not in sys.modules and "KERAS_BACKEND" not in os.environ \
            and importlib.util.find_spec("tensorflow") is None:
        os.environ["KERAS_BACKEND"] = "jax"  # Keras' default backend, TensorFlow, is not there
    try:
        import keras
    except ImportError as e:
        raise ImportError("reading Keras models needs Keras 3: pip install keras") from e
    return keras


@functools.cache
def seed_layers() -> dict[str, type]:
    """Keras layers standing in for the seed's ``AddWithWeight`` (zeros) and ``AddWithWeight2``
    (RandomNormal) when its saved models are loaded: ``[x, d] -> d + w * x``, ``w`` of shape (1,)."""
    keras = _keras()

    class AddWithWeight(keras.layers.Layer):
        initializer = "zeros"

        def build(self, input_shape: Any) -> None:
            self.Weight = self.add_weight(name="Weight", shape=(1,), initializer=self.initializer,
                                          trainable=True)

        def call(self, inputs: Sequence[Any]) -> Any:
            x, d = inputs
            return d + self.Weight * x

    class AddWithWeight2(AddWithWeight):
        initializer = "random_normal"

    return {"AddWithWeight": AddWithWeight, "AddWithWeight2": AddWithWeight2}


def load_keras(path: str | os.PathLike, *, model: Any = None,
               custom_objects: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`from_keras` of a saved Keras model: a ``.keras`` file or a full-model ``.h5`` file.

    The seed's custom layers are supplied (:func:`seed_layers`); pass others in ``custom_objects``.
    """
    keras = _keras()
    path = Path(path)
    if path.name.endswith(".weights.h5"):
        raise ValueError(f"{path} holds weights only: build the network in Keras (the seed's "
                         "build_custom_resnet), call model.load_weights(path), then from_keras(model)")
    if not path.exists():
        raise FileNotFoundError(path)
    objects = {**seed_layers(), **(custom_objects or {})}
    keras_model = keras.saving.load_model(path, custom_objects=objects, compile=False)
    return from_keras(keras_model, model=model)


def from_keras(keras_model: Any, *, model: Any = None, trainable: Sequence[Any] | None = None,
               non_trainable: Sequence[Any] | None = None) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` for our :class:`~adaresnet_jax.models.ResNet` from a Keras model.

    Args:
      keras_model: a built functional ``keras.Model`` of the seed's network (``paper``) or of
        ``keras.applications.ResNet50`` (``resnet50_keras``); see the module docstring.
      model: our module to check the result against (names, shapes, BatchNorm epsilon and
        momentum); a mismatch raises ``ValueError`` instead of giving silently different outputs.
      trainable / non_trainable: values to use instead of the variables' own, in the order of
        ``keras_model.trainable_variables`` / ``non_trainable_variables`` (Keras' stateless API:
        gradients, or the state ``stateless_call`` returns).
    """
    keras = _keras()
    values = {id(v): v.value for v in keras_model.variables}
    for given, variables in ((trainable, keras_model.trainable_variables),
                             (non_trainable, keras_model.non_trainable_variables)):
        if given is not None:
            if len(given) != len(variables):
                raise ValueError(f"got {len(given)} values for {len(variables)} variables")
            values.update({id(v): x for v, x in zip(variables, given)})

    def value(v: Any) -> jax.Array:
        return jnp.asarray(np.asarray(values[id(v)]))

    head, blocks, stem = _walk(keras_model, keras)
    flat: dict[str, Any] = {}  # "params/stage1_block1/Conv_0/kernel" -> array
    bns: list[Any] = []

    def put(name: str, layer: Any) -> None:
        if isinstance(layer, keras.layers.BatchNormalization):
            bns.append(layer)
            for ours, theirs in (("scale", layer.gamma), ("bias", layer.beta)):
                if theirs is not None:
                    flat[f"params/{name}/{ours}"] = value(theirs)
            flat[f"batch_stats/{name}/mean"] = value(layer.moving_mean)
            flat[f"batch_stats/{name}/var"] = value(layer.moving_variance)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            flat[f"params/{name}/kernel"] = value(layer.kernel)
            if layer.bias is not None:
                flat[f"params/{name}/bias"] = value(layer.bias)
        else:
            raise ValueError(f"Keras layer {layer.name!r} ({type(layer).__name__}) has weights "
                             "but no counterpart in our ResNet")

    _expect(stem, ["Conv2D", "BatchNormalization"], "the stem")
    put("stem_conv", stem[0])
    put("stem_bn", stem[1])
    _expect(head, ["Dense"], "the head")
    put("head", head[0])
    stage, index = 0, 0
    for i, (branch, shortcut, merge) in enumerate(blocks):
        if shortcut or i == 0:
            stage, index = stage + 1, 0
        index += 1
        name = f"stage{stage}_block{index}"
        convs = [layer for layer in branch if isinstance(layer, keras.layers.Conv2D)]
        others = [layer for layer in branch if not isinstance(layer, keras.layers.Conv2D)]
        if len(convs) != len(others):
            raise ValueError(f"block {name}: {len(convs)} convolutions but {len(others)} other "
                             f"weighted layers ({[layer.name for layer in others]})")
        for k, (conv, norm) in enumerate(zip(convs, others)):
            put(f"{name}/Conv_{k}", conv)
            put(f"{name}/BatchNorm_{k}", norm)
        if shortcut:
            _expect(shortcut, ["Conv2D", "BatchNormalization"], f"the shortcut of {name}")
            put(f"{name}/proj_conv", shortcut[0])
            put(f"{name}/proj_bn", shortcut[1])
        if len(merge.weights) > 1:
            raise ValueError(f"merge layer {merge.name!r} has {len(merge.weights)} weights, not one")
        if merge.weights:
            flat[f"params/{name}/skip/skip_weight"] = value(merge.weights[0])
    variables = traverse_util.unflatten_dict(flat, sep="/")
    if model is not None:
        _check(variables, model, keras_model.input_shape, bns)
    return variables


def _walk(keras_model: Any, keras: Any) -> tuple[list[Any], list[tuple[list, list, Any]], list[Any]]:
    """(head layers, blocks in network order as (branch, shortcut, merge), stem layers); every list
    holds the layers with weights in forward order."""
    if len(keras_model.outputs) != 1:
        raise ValueError("expected a functional Keras model with one output")

    def producer(t: Any) -> tuple[Any, list[Any]]:
        op, node_index, _ = t._keras_history
        return op, list(op._inbound_nodes[node_index].input_tensors)

    def path(t: Any) -> list[tuple[Any, Any]]:
        """(tensor, the layer that made it) back from ``t`` to a merge or the model input."""
        out = []
        while True:
            op, inputs = producer(t)
            out.append((t, op))
            if len(inputs) != 1:
                return out
            t = inputs[0]

    def weighted(steps: list[tuple[Any, Any]]) -> list[Any]:
        return [op for _, op in reversed(steps) if op.weights]

    blocks: list[tuple[list, list, Any]] = []
    segment: list[tuple[Any, Any]] = []
    head: list[Any] | None = None
    t = keras_model.outputs[0]
    while True:
        steps = path(t)
        segment += steps[:-1]
        t, op = steps[-1]
        inputs = producer(t)[1]
        if head is None:
            head = weighted(segment)
        if len(inputs) == 0:  # the model input: what is left is the stem
            if not blocks:
                raise ValueError("no residual block (a layer with two inputs) in the Keras model")
            return head, blocks[::-1], weighted(segment + [steps[-1]])
        if len(inputs) != 2:
            raise ValueError(f"layer {op.name!r} has {len(inputs)} inputs: not a residual block")
        a, b = path(inputs[0]), path(inputs[1])
        in_b = {id(x) for x, _ in b}
        meet = next((k for k, (x, _) in enumerate(a) if id(x) in in_b), None)
        if meet is None:
            raise ValueError(f"the two inputs of {op.name!r} do not meet: not a residual block")
        start = a[meet][0]
        a = weighted(a[:meet])
        b = weighted(b[: next(k for k, (x, _) in enumerate(b) if x is start)])
        n_conv = [sum(isinstance(layer, keras.layers.Conv2D) for layer in p) for p in (a, b)]
        if n_conv[0] == n_conv[1]:
            raise ValueError(f"cannot tell the branch from the shortcut of {op.name!r}")
        branch, shortcut = (a, b) if n_conv[0] > n_conv[1] else (b, a)
        blocks.append((branch, shortcut, op))
        t, segment = start, []


def _expect(layers: list[Any], kinds: list[str], where: str) -> None:
    if [type(layer).__name__ for layer in layers] != kinds:
        raise ValueError(f"{where}: expected weighted layers {kinds}, found "
                         f"{[f'{layer.name} ({type(layer).__name__})' for layer in layers]}")


def _check(variables: dict[str, Any], model: Any, input_shape: Sequence[Any], bns: list[Any]) -> None:
    shape = tuple(1 if d is None else d for d in input_shape)
    want = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct(shape, jnp.float32))
    want = {k: v.shape for k, v in traverse_util.flatten_dict(want, sep="/").items()}
    got = {k: v.shape for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
    problems = [f"missing {k}" for k in want if k not in got] + [f"unexpected {k}" for k in got if k not in want]
    problems += [f"{k}: Keras {got[k]}, ours {want[k]}" for k in want if k in got and got[k] != want[k]]
    for bn in bns:
        if (bn.epsilon, bn.momentum) != (model.bn_epsilon, model.bn_momentum):
            problems.append(f"BatchNorm {bn.name!r}: Keras epsilon {bn.epsilon}, momentum {bn.momentum}; "
                            f"ours {model.bn_epsilon}, {model.bn_momentum}")
    if problems:
        raise ValueError(f"the Keras model does not match {type(model).__name__} "
                         f"({len(problems)} differences): " + "; ".join(problems[:6]))
