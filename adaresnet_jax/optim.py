"""Optimisers and learning-rate schedules from a :class:`~adaresnet_jax.config.Config`, through optax.

``make_optimizer(cfg, steps_per_epoch) -> (tx, schedule)``: optional global-norm clipping, weight decay
of conv/dense kernels only (``optax.add_decayed_weights`` before SGD/Adam, AdamW's own masked decay),
the optimizer, then a learning-rate multiplier on the skip weights (``skip_lr_mult``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from adaresnet_jax.config import Config


def _leaf_mask(name: str) -> Callable[[Any], Any]:
    return lambda params: jax.tree_util.tree_map_with_path(lambda p, _: getattr(p[-1], "key", None) == name, params)


decay_mask = _leaf_mask("kernel")  # conv/dense kernels only: never skip weights, BN scale/bias, biases
skip_mask = _leaf_mask("skip_weight")


def make_schedule(cfg: Config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate per global step: constant, cosine, step (x0.1 at 50%/75%) or onecycle."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    if cfg.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total, cfg.peak_lr)
    warm = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    rest = total - warm
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.peak_lr, rest)
    elif cfg.schedule == "step":
        main = optax.piecewise_constant_schedule(
            cfg.peak_lr, {max(1, int(f * total) - warm): 0.1 for f in (0.5, 0.75)})
    else:
        main = optax.constant_schedule(cfg.peak_lr)
    if warm <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.peak_lr, warm), main], [warm])


def make_optimizer(cfg: Config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule): optional clipping, L2 decay of kernels (sgd/adam, coupled) or
    adamw's own masked decay, the optimizer, then the skip weights' learning-rate multiplier."""
    schedule = make_schedule(cfg, steps_per_epoch)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    if cfg.weight_decay > 0 and cfg.optimizer != "adamw":
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    if cfg.optimizer == "sgd":
        momentum = cfg.momentum if cfg.momentum > 0 else None
        parts.append(optax.sgd(schedule, momentum=momentum, nesterov=bool(momentum and cfg.nesterov)))
    elif cfg.optimizer == "adam":
        parts.append(optax.adam(schedule, eps=cfg.adam_eps))
    else:
        parts.append(optax.adamw(schedule, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, mask=decay_mask))
    if cfg.skip_lr_mult != 1.0:
        parts.append(optax.masked(optax.scale(cfg.skip_lr_mult), skip_mask))
    return optax.chain(*parts), schedule
