"""ResNet and AdaResNet as pure Flax Linen modules.

AdaResNet (Hong Su, 2024, arXiv:2408.09958) changes one thing in a residual block: instead of
``act(F(x) + x)`` it computes ``act(F(x) + w * x)`` with ``w`` a trainable scalar per block,
zero-initialised. Here that is one field of one module, ``ResNet.skip``:

* ``"identity"``: ``act(F(x) + x)``, plain ResNet, no extra parameter (:class:`IdentitySkip`);
* ``"learned"``:  ``act(F(x) + w * x)``, AdaResNet (:class:`LearnedSkip`, the default);
* ``"rezero"``:   ``act(x + w * F(x))``, the ReZero placement, Bachlechner et al. 2020 (:class:`ReZeroSkip`).

``x`` is the skip input after the shortcut (1x1 projection + BatchNorm, or zero padding) where the
block changes shape. Which module a block gets, and its initial weight, is decided in one place:
:func:`skip_module`. Inputs are NHWC. ``model.init(rng, x, train=False)`` returns
``{"params", "batch_stats"}``; training applies with ``train=True, mutable=["batch_stats"]``, evaluation
with ``train=False`` (``train`` is keyword-only and required). ``features=True`` returns the pooled
features and each stage's output instead of logits (backbone use, :meth:`ResNet.__call__`).

The modules are plain Flax: ``lax.conv`` and ``nn.max_pool`` by default (``conv_impl="xla"``), no
``custom_vjp``, no optimization barrier and nothing chosen from the host, so ``jax.jvp``, ``jax.hessian``,
``jax.vmap`` and ``jax.export`` for any platform work on them. The CPU algorithms of
:mod:`adaresnet_jax.conv` are an explicit ``conv_impl`` (see :func:`adaresnet_jax.conv.conv_impl_for`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaresnet_jax import conv as conv_lib

SKIP_RULES = ("identity", "learned", "rezero")
SkipRule = Literal["identity", "learned", "rezero"]
SkipInit = float | str | Callable[..., jax.Array]
ModuleDef = Any

# Keras' RandomNormal default, the initialiser of the seed's second skip layer (AddWithWeight2).
KERAS_NORMAL_STDDEV = 0.05


def skip_initializer(init: SkipInit) -> Callable[..., jax.Array]:
    """An initialiser from a constant, ``"normal"`` (N(0, 0.05^2), Keras' default) or a callable."""
    if callable(init):
        return init
    if isinstance(init, str):
        if init == "normal":
            return nn.initializers.normal(KERAS_NORMAL_STDDEV)
        raise ValueError(f"unknown skip_init {init!r}: use a number, 'normal' or an initializer")
    return nn.initializers.constant(float(init))


def _skip_weight(module: nn.Module, like: jax.Array) -> jax.Array:
    """The parameter ``skip_weight``, ``(1,)`` or ``(C,)``, shaped to broadcast against ``like``."""
    shape = (like.shape[-1],) if module.per_channel else (1,)
    w = module.param("skip_weight", skip_initializer(module.weight_init), shape, module.param_dtype)
    return jnp.asarray(w, like.dtype).reshape((1,) * (like.ndim - 1) + shape)


class IdentitySkip(nn.Module):
    """``F(x) + x``: the plain ResNet add, no parameter."""

    @nn.compact
    def __call__(self, branch: jax.Array, x: jax.Array) -> jax.Array:
        return branch + x


class LearnedSkip(nn.Module):
    """``F(x) + w * x``: AdaResNet, the seed's ``AddWithWeight`` layer (also exported as ``WeightedSkip``).

    ``branch`` is ``F(x)``, the residual branch output, and ``x`` the skip input (same shape, NHWC).
    ``w`` is the parameter ``skip_weight`` of shape ``(1,)`` (the seed's) or ``(C,)`` with
    ``per_channel``, initialised by ``weight_init`` (a number, ``"normal"`` or an initialiser).
    """

    weight_init: SkipInit = 0.0
    per_channel: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, branch: jax.Array, x: jax.Array) -> jax.Array:
        return branch + _skip_weight(self, x) * x


class ReZeroSkip(nn.Module):
    """``x + w * F(x)``: ReZero (Bachlechner et al., 2020); same parameter as :class:`LearnedSkip`."""

    weight_init: SkipInit = 0.0
    per_channel: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, branch: jax.Array, x: jax.Array) -> jax.Array:
        return x + _skip_weight(self, branch) * branch


WeightedSkip = LearnedSkip  # the name before IdentitySkip/ReZeroSkip existed; kept for compatibility


def skip_module(rule: SkipRule, init: SkipInit = 0.0, *, downsample_init: SkipInit | None = None,
                has_shortcut: bool = False, per_channel: bool = False, param_dtype: Any = jnp.float32,
                name: str | None = None) -> nn.Module:
    """The skip module of one block: the one place where the rule and the initial weight are chosen.

    ``downsample_init`` (if not ``None``) replaces ``init`` only for a ``"learned"`` block that has a
    shortcut (it changes shape); ReZero starts at ``init`` in every block; identity has no weight.
    """
    _check_choice("skip rule", rule, SKIP_RULES)
    if rule == "identity":
        return IdentitySkip(name=name)
    if rule == "learned" and has_shortcut and downsample_init is not None:
        init = downsample_init
    cls = LearnedSkip if rule == "learned" else ReZeroSkip
    return cls(weight_init=init, per_channel=per_channel, param_dtype=param_dtype, name=name)


class _Residual(nn.Module):
    """Shared tail of every block: shortcut, the skip rule, activation."""

    make_skip: Callable[..., nn.Module]  # skip_module with all but has_shortcut (and name) bound
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array]
    shortcut: Literal["projection", "zero_pad"]
    strides: int

    def combine(self, branch: jax.Array, x: jax.Array) -> jax.Array:
        has_shortcut = x.shape != branch.shape
        if has_shortcut:
            x = self.project(x, branch.shape[-1])
        return self.act(self.make_skip(has_shortcut=has_shortcut, name="skip")(branch, x))

    def project(self, x: jax.Array, features: int) -> jax.Array:
        if self.shortcut == "projection":
            x = self.conv(features, (1, 1), (self.strides, self.strides), padding="VALID",
                          name="proj_conv")(x)
            return self.norm(name="proj_bn")(x)
        # He et al. (2016) option A: subsample, then zero-pad the new channels. No parameters.
        x = x[:, :: self.strides, :: self.strides, :]
        extra = features - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class BasicBlock(_Residual):
    """Two 3x3 convolutions (ResNet-18/34, the He CIFAR nets, the seed's network)."""

    filters: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = (self.strides, self.strides)
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), s)(x)))
        y = self.norm()(self.conv(self.filters, (3, 3))(y))
        return self.combine(y, x)


class BottleneckBlock(_Residual):
    """1x1, 3x3, 1x1 x4 (ResNet-50/101/152). The stride is on the 3x3 (torchvision's v1.5) or, with
    ``stride_in_1x1``, on the first 1x1 (the original v1, as Keras' ``ResNet50``)."""

    filters: int = 64
    expansion: int = 4
    stride_in_1x1: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = (self.strides, self.strides)
        s1, s3 = (s, (1, 1)) if self.stride_in_1x1 else ((1, 1), s)
        y = self.act(self.norm()(self.conv(self.filters, (1, 1), s1)(x)))
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), s3)(y)))
        y = self.norm()(self.conv(self.filters * self.expansion, (1, 1))(y))
        return self.combine(y, x)


class ResNet(nn.Module):
    """A ResNet whose residual rule is the field ``skip`` (see the module docstring).

    Attributes:
      stage_sizes: blocks per stage; stage ``i`` has ``num_filters * 2**i`` filters.
      block_cls: :class:`BasicBlock` or :class:`BottleneckBlock` (or a partial of one, as
        ``resnet50_keras``'s ``BottleneckBlock`` with ``stride_in_1x1=True``).
      num_classes: size of the final Dense layer.
      num_filters: width of the stem and of the first stage.
      stage_strides: stride of the first block of each stage.
      stem: ``"imagenet"`` (7x7/2 conv, BN, act, 3x3/2 max-pool) or ``"cifar"`` (3x3/1, BN, act).
      padding: ``"same"`` (TF/Keras: the extra pad on the high side) or ``"symmetric"`` (PyTorch,
        and Keras' explicit ``ZeroPadding2D`` then ``"valid"``).
      shortcut: ``"projection"`` (1x1 conv + BN) or ``"zero_pad"`` (He et al. option A).
      skip: ``"identity"``, ``"learned"`` (AdaResNet) or ``"rezero"``.
      skip_init: initial skip weight: a number, ``"normal"`` or an initialiser.
      downsample_skip_init: initial weight of ``"learned"`` blocks that have a shortcut (change
        shape); ``None``: ``skip_init``. Never used by ReZero or by a block without a shortcut.
      skip_per_channel: one skip weight per channel instead of one per block.
      dtype / param_dtype: compute and parameter dtypes (bf16 compute, f32 params works).
      bn_momentum / bn_epsilon: BatchNorm settings (flax convention: 0.9 is PyTorch's 0.1).
      kernel_init: conv kernel initialiser.
      head_init: kernel initialiser of the final Dense layer (its bias starts at zero).
      conv_bias: whether convolutions carry a bias.
      conv_impl: ``"xla"`` (``lax.conv``, the default), or a CPU algorithm for CPU devices only:
        ``"slice_dot"``, ``"hybrid"``, ``"tuned"``, ``"tuned_single_device"`` (see :mod:`adaresnet_jax.conv`;
        ``conv_impl_for(mesh)`` picks one for the devices a step runs on).
      act: activation after every BN of the branch and after the add.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef = BasicBlock
    num_classes: int = 10
    num_filters: int = 64
    stage_strides: Sequence[int] = (1, 2, 2, 2)
    stem: Literal["imagenet", "cifar"] = "imagenet"
    padding: Literal["same", "symmetric"] = "symmetric"
    shortcut: Literal["projection", "zero_pad"] = "projection"
    skip: SkipRule = "learned"
    skip_init: SkipInit = 0.0
    downsample_skip_init: SkipInit | None = None
    skip_per_channel: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    kernel_init: Callable[..., jax.Array] = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    head_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()  # flax's Dense default
    conv_bias: bool = False
    conv_impl: str = "xla"
    act: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool | None = None,
                 features: bool = False) -> jax.Array | dict[str, jax.Array]:
        """Logits ``(N, num_classes)`` float32 of an NHWC batch ``x`` ``(N, H, W, C)``.

        ``train`` (keyword, required): ``True`` uses batch statistics and updates ``batch_stats`` (apply
        with ``mutable=["batch_stats"]``), ``False`` uses the running averages (evaluation).
        ``features=True``: instead of logits, a dict of ``"stem"`` (the stem's output), ``"stage1"`` ...
        ``"stageK"`` (each stage's output, ``(N, H_i, W_i, num_filters * 2**(i-1) * expansion)``) and
        ``"pooled"`` (``(N, C_last)``, the global average the head reads: ``head(pooled)`` is the logits),
        in the compute dtype. The head is not called then (initialised that way, the model has no head).
        """
        if train is None or not isinstance(train, bool):
            raise TypeError(f"ResNet needs train=True or train=False, got {train!r}: pass train=True (training, "
                            "with mutable=['batch_stats']) or train=False (evaluation)")
        _check_choice("skip rule", self.skip, SKIP_RULES)
        _check_num_classes(self.num_classes)
        if self.conv_impl == "auto":
            raise ValueError("conv_impl='auto' depends on the devices: pass "
                             "conv_impl=adaresnet_jax.conv.conv_impl_for(mesh_or_devices) or a name (default 'xla')")
        _check_choice("conv_impl", self.conv_impl, conv_lib.CONV_IMPLS)
        if x.ndim != 4:
            raise ValueError(f"expected an NHWC batch of rank 4, got shape {tuple(x.shape)}: "
                             "add a batch axis (x[None]) or a channel axis (x[..., None])")
        if len(self.stage_strides) != len(self.stage_sizes):
            raise ValueError(f"stage_strides {tuple(self.stage_strides)} needs one stride per stage "
                             f"of stage_sizes {tuple(self.stage_sizes)}")
        impl = self.conv_impl
        conv = functools.partial(
            _conv, use_bias=self.conv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, symmetric=self.padding == "symmetric",
            conv_general_dilated=conv_lib.conv_fn(impl))
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
            epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype)

        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = self.act(norm(name="stem_bn")(conv(self.num_filters, (7, 7), (2, 2), name="stem_conv")(x)))
            if self.padding == "symmetric":
                x = conv_lib.max_pool_fn(impl)(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
            else:
                x = conv_lib.max_pool_fn(impl)(x, (3, 3), (2, 2), padding="SAME")
        else:
            x = self.act(norm(name="stem_bn")(conv(self.num_filters, (3, 3), name="stem_conv")(x)))
        outputs = {"stem": x}

        make_skip = functools.partial(
            skip_module, self.skip, self.skip_init, downsample_init=self.downsample_skip_init,
            per_channel=self.skip_per_channel, param_dtype=self.param_dtype)
        for i, (size, stride) in enumerate(zip(self.stage_sizes, self.stage_strides)):
            for j in range(size):
                x = conv_lib.block_input(x, impl)
                x = self.block_cls(
                    filters=self.num_filters * 2**i, strides=stride if j == 0 else 1, conv=conv,
                    norm=norm, act=self.act, make_skip=make_skip, shortcut=self.shortcut,
                    name=f"stage{i + 1}_block{j + 1}")(x)
            outputs[f"stage{i + 1}"] = x

        x = jnp.mean(x, axis=(1, 2))
        if features:
            return {**outputs, "pooled": x}
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=self.head_init, name="head")(x)
        return jnp.asarray(x, jnp.float32)


def _conv(features: int, kernel_size: tuple[int, int], strides: tuple[int, int] = (1, 1), *,
          padding: Any = None, symmetric: bool, **kwargs: Any) -> nn.Conv:
    """``nn.Conv``; ``symmetric`` pads ``k // 2`` each side (PyTorch), else lax's ``"SAME"``."""
    if padding is None:
        padding = tuple((k // 2, k // 2) for k in kernel_size) if symmetric else "SAME"
    return nn.Conv(features, kernel_size, strides, padding=padding, **kwargs)


# ---------------------------------------------------------------------------- named networks

# Keras' defaults: 'same' padding, conv bias, glorot_uniform kernels (conv and Dense), BatchNorm
# momentum 0.99 (the same convention as flax's: new = 0.99 * old + 0.01 * batch) and epsilon 1e-3.
_KERAS = dict(padding="same", bn_momentum=0.99, bn_epsilon=1e-3, conv_bias=True,
              kernel_init=nn.initializers.glorot_uniform(), head_init=nn.initializers.glorot_uniform())

_NETWORKS: dict[str, dict[str, Any]] = {
    # The seed document's Keras network: 8 blocks, every stage (64 too) opens with a stride-2
    # projection block; AddWithWeight(initializer='zeros') in every block. Its script's variant
    # (AddWithWeight2, RandomNormal(0.05), in the downsampling blocks): downsample_skip_init="normal".
    "paper": dict(stage_sizes=(2, 2, 2, 2), stage_strides=(2, 2, 2, 2), **_KERAS),
    # The seed's baseline: keras.applications.ResNet50(weights=None, classes=10). ResNet v1 (stride
    # in the first 1x1); explicit zero padding then 'valid' is our "symmetric" (the max-pool's zero
    # padding follows a ReLU, so it equals our -inf padding); BN epsilon 1.001e-5.
    "resnet50_keras": dict(stage_sizes=(3, 4, 6, 3),
                           block_cls=functools.partial(BottleneckBlock, stride_in_1x1=True),
                           **{**_KERAS, "padding": "symmetric", "bn_epsilon": 1.001e-5}),
    "resnet18": dict(stage_sizes=(2, 2, 2, 2)),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3)),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock),
    "resnet152": dict(stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock),
    "resnet18_cifar": dict(stage_sizes=(2, 2, 2, 2), stem="cifar"),
    **{f"resnet{6 * n + 2}": dict(stage_sizes=(n, n, n), stage_strides=(1, 2, 2), num_filters=16,
                                  stem="cifar", shortcut="zero_pad") for n in (3, 5, 7, 9, 18)},
    # Test-sized: same code paths (CIFAR stem, projection shortcut, two stages), tiny widths.
    "tiny": dict(stage_sizes=(1, 1), stage_strides=(1, 2), num_filters=4, stem="cifar"),
}
MODEL_NAMES: tuple[str, ...] = tuple(_NETWORKS)


def network_fields(name: str) -> dict[str, Any]:
    """A copy of the :class:`ResNet` fields that define the named network (stage sizes, block class, stem, ...)."""
    if name not in _NETWORKS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return dict(_NETWORKS[name])


def create_model(name: str, *, num_classes: int, skip: SkipRule = "learned", **overrides: Any) -> ResNet:
    """The named network as a :class:`ResNet` module; ``overrides`` replace any of its fields.

    >>> m = create_model("paper", num_classes=10)                     # AdaResNet, the seed's net
    >>> m = create_model("paper", num_classes=10, downsample_skip_init="normal")  # its script's variant
    >>> m = create_model("resnet50", num_classes=1000, skip="identity", dtype=jnp.bfloat16)
    """
    _check_choice("model name", name, MODEL_NAMES)
    _check_choice("skip rule", skip, SKIP_RULES)
    _check_num_classes(num_classes)
    fields = set(ResNet.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ResNet field(s) {unknown}; valid fields: {sorted(fields)}")
    return ResNet(**{**_NETWORKS[name], "num_classes": num_classes, "skip": skip, **overrides})


_BLOCK = re.compile(r"stage(\d+)_block(\d+)")


def skip_weights(params: Any) -> dict[str, jax.Array]:
    """Every skip weight in ``params``, in network order, keyed by its block's path: ``"stage2/block1"``
    for a top-level ResNet, ``"backbone/stage2/block1"`` for a ResNet at ``backbone`` inside another module.
    Empty for ``skip="identity"``.

    Accepts Linen variables (``variables`` or ``variables["params"]``, any nesting) and NNX state
    (``nnx.state(model)`` of a module built with ``nnx.bridge.ToNNX``, or any nnx.State): the values are
    arrays (``(1,)``, or ``(C,)`` with ``skip_per_channel``), not ``nnx.Param`` wrappers.
    """
    found = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):  # nnx.Param: a path ending in .value
        keys = [_key_name(k) for k in path]
        if "skip_weight" not in keys:
            continue
        at = keys.index("skip_weight")
        blocks = [n for n in range(at) if _BLOCK.fullmatch(keys[n])]
        if not blocks or keys[blocks[-1] + 1:at] != ["skip"]:
            continue
        b = blocks[-1]
        prefix = tuple(k for k in keys[:b] if k != "params")
        m = _BLOCK.fullmatch(keys[b])
        found.append((prefix, int(m[1]), int(m[2]), leaf))
    found.sort(key=lambda f: f[:3])
    return {"/".join((*p, f"stage{i}", f"block{j}")): w for p, i, j, w in found}


def _key_name(k: Any) -> str:
    """A pytree path entry as text: a dict key, an attribute name or a sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _check_choice(what: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")


def _check_num_classes(n: Any) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {n!r}")
