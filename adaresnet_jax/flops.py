"""The network's FLOPs counted from its jaxpr (used by ``--compile-only``'s report and benchmarks/throughput.py)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def model_flops(model: Any, image_shape: tuple[int, int, int]) -> int:
    """Forward FLOPs per image: 2 x multiply-adds of every conv and dot, padding included.

    Counted from the model's jaxpr with XLA's native convolution, so any layer that reaches
    ``lax.conv_general_dilated`` or ``lax.dot_general`` is counted, whatever the network.
    """
    model = model.clone(conv_impl="xla")
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(v, x)
    return _count(jaxpr.jaxpr)


def _count(jaxpr: Any) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        out = int(np.prod(eqn.outvars[0].aval.shape))
        if eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
            total += 2 * out * int(np.prod([rhs[d] for d in spec[1:]]))
        elif eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += 2 * out * int(np.prod([eqn.invars[0].aval.shape[d] for d in contract]))
        for p in eqn.params.values():
            for inner in p if isinstance(p, (list, tuple)) else (p,):
                inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    total += _count(inner)
    return total
