"""Weights from torchvision's ResNets (``resnet18`` ... ``resnet152``) to our variables.

>>> import torchvision                                      # only to get the weights; not needed here
>>> sd = torchvision.models.resnet50(weights="IMAGENET1K_V2").state_dict()
>>> model = ar.create_model("resnet50", num_classes=1000, skip="learned", skip_init=1.0)
>>> variables = from_torchvision(sd, model=model)           # {"params", "batch_stats"}
>>> logits = model.apply(variables, x_nhwc, train=False)   # torchvision's logits, as an AdaResNet

The names are torchvision's (``conv1``, ``bn1``, ``layer{i}.{j}.conv{k}``/``bn{k}``,
``layer{i}.{j}.downsample.0``/``.1``, ``fc``); ours are found on the model itself
(``jax.eval_shape`` of its ``init``): ``stem_conv``/``stem_bn``, ``stage{i}_block{j+1}/Conv_{k-1}`` and
``BatchNorm_{k-1}``, ``proj_conv``/``proj_bn``, ``head``. Convolutions go OIHW -> HWIO, the Linear
layer (out, in) -> Dense (in, out); BatchNorm ``weight``/``bias``/``running_mean``/``running_var``
-> ``scale``/``bias`` and the batch statistics ``mean``/``var``; ``num_batches_tracked`` is ignored.
Our ``resnet18``..``152`` are torchvision's layouts (v1.5: the stride on the bottleneck's 3x3;
padding ``k // 2`` on both sides; 3x3/2 max-pool with padding 1; BatchNorm epsilon 1e-5).

Skip weights (``skip="learned"``, AdaResNet, or ``"rezero"``) are not in a torchvision checkpoint:
they come from the model's own initialiser (``skip_init``). With ``skip_init=1.0`` the block computes
``act(F(x) + 1 * x)``: the converted AdaResNet is exactly the pretrained ResNet at step 0.

Values may be numpy arrays or torch tensors (recognised by their ``detach`` method; torch is never
imported here), or anything ``np.asarray`` takes, e.g. an ``np.load``-ed ``.npz`` of a state dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adaresnet_jax.models import BottleneckBlock, ResNet, network_fields

TORCHVISION_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
HeadChoice = Literal["keep", "new"]

_BLOCK = re.compile(r"stage(\d+)_block(\d+)")
_NUMBERED = re.compile(r"(Conv|BatchNorm)_(\d+)")
_LAYER = re.compile(r"layer(\d+)\.(\d+)\.")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def from_torchvision(state_dict: Mapping[str, Any], *, model: ResNet, head: HeadChoice = "keep",
                     rng: jax.Array | None = None, input_channels: int = 3) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` for ``model`` from a torchvision ResNet ``state_dict``.

    Args:
      state_dict: torchvision's names (``"layer1.0.conv1.weight"``, ...) -> arrays (numpy arrays or
        torch tensors).
      model: our :class:`~adaresnet_jax.models.ResNet`, e.g. ``create_model("resnet50",
        num_classes=1000, skip=...)``; every block and width must match the checkpoint's.
      head: ``"keep"``: the checkpoint's ``fc`` becomes ``head`` (its shape must match
        ``num_classes``); ``"new"``: ``fc`` is ignored and ``head`` is the model's own fresh
        initialisation (fine-tuning on another label set; needs ``rng``).
      rng: key for the values that are not in the checkpoint (skip weights, a new head); default
        ``jax.random.key(0)`` for the skip weights, required with ``head="new"``.
      input_channels: channels of the images the model will see (``conv1`` must have as many).

    Raises:
      ValueError: one line naming the first differences (missing or unexpected names, shapes,
        another depth) and what to pass instead.
    """
    if head not in ("keep", "new"):
        raise ValueError(f"head must be 'keep' (use the checkpoint's fc) or 'new' (a fresh head), got {head!r}")
    if head == "new" and rng is None:
        raise ValueError("head='new' initialises a fresh head: pass rng=jax.random.key(...)")
    _check_layout(model)
    given = {k: _numpy(k, v) for k, v in dict(state_dict).items() if not k.endswith("num_batches_tracked")}
    x = jnp.zeros((1, 8, 8, input_channels), jnp.float32)  # a small input: names and shapes don't depend on size
    target = traverse_util.flatten_dict(
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x))

    names = {path: _torch_name(path) for path in target}
    if head == "new":
        names = {p: (None if n is not None and n.startswith("fc.") else n) for p, n in names.items()}
        given = {k: v for k, v in given.items() if not k.startswith("fc.")}
    want = {n: _torch_shape(target[p].shape) for p, n in names.items() if n is not None}
    _compare(given, want, model, head)

    fresh = _initial_values(model, x, [p for p, n in names.items() if n is None], rng)
    out = {p: jnp.asarray(_flax_value(given[n]), target[p].dtype) if n is not None else fresh[p]
           for p, n in names.items()}
    return traverse_util.unflatten_dict(out)


def _initial_values(model: ResNet, x: jax.Array, paths: list[tuple[str, ...]],
                    rng: jax.Array | None) -> dict[tuple[str, ...], jax.Array]:
    """The values ``model.init(rng, x, train=False)`` gives the variables at ``paths`` (skip weights, a new head).

    One jitted ``init`` that returns only those: the rest of the network is dead code, which XLA drops,
    so this costs one trace and a small compile instead of running the network's initialisation.
    """
    if not paths:
        return {}

    def init(key: jax.Array) -> dict[tuple[str, ...], jax.Array]:
        flat = traverse_util.flatten_dict(model.init(key, x, train=False))
        return {p: flat[p] for p in paths}

    return jax.jit(init)(jax.random.key(0) if rng is None else rng)


def _numpy(name: str, value: Any) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (duck-typed: ``.detach().cpu()``) or a list."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16 of torch's
            value = value.float()
        value = value.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"state_dict[{name!r}] is a {type(value).__name__}, not an array: {e}") from None


def _check_layout(model: Any) -> None:
    """Refuse a model that would compute something other than torchvision's ResNet with these weights."""
    if not isinstance(model, ResNet):
        raise ValueError(f"model must be an adaresnet_jax ResNet (create_model('resnet50', ...)), got {type(model).__name__}")
    keywords = getattr(model.block_cls, "keywords", {})
    wrong = [f"{field}={value!r} (torchvision: {want!r})" for field, value, want in (
        ("stem", model.stem, "imagenet"), ("padding", model.padding, "symmetric"),
        ("shortcut", model.shortcut, "projection"), ("conv_bias", model.conv_bias, False),
        ("bn_epsilon", model.bn_epsilon, 1e-5), ("stride_in_1x1", keywords.get("stride_in_1x1", False), False),
    ) if value != want]
    if wrong:
        raise ValueError(f"the model differs from torchvision's ResNets in {', '.join(wrong)}: "
                         f"use create_model(name, ...) with name in {TORCHVISION_NAMES} and those fields as they are")


def _torch_name(path: tuple[str, ...]) -> str | None:
    """Torchvision's name of one of our variables (``("params", "stem_conv", "kernel")`` -> ``"conv1.weight"``);
    ``None`` for the skip weights, which torchvision does not have."""
    _, *modules, leaf = path
    if modules[-1] == "skip":
        return None
    if modules == ["stem_conv"] or modules == ["stem_bn"]:
        return f"{'conv1' if modules[0] == 'stem_conv' else 'bn1'}.{_LEAF[leaf]}"
    if modules == ["head"]:
        return f"fc.{_LEAF[leaf]}"
    block = _BLOCK.fullmatch(modules[0])
    if block and len(modules) == 2:
        prefix = f"layer{block[1]}.{int(block[2]) - 1}"
        if modules[1] in ("proj_conv", "proj_bn"):
            return f"{prefix}.downsample.{0 if modules[1] == 'proj_conv' else 1}.{_LEAF[leaf]}"
        numbered = _NUMBERED.fullmatch(modules[1])
        if numbered:
            return f"{prefix}.{'conv' if numbered[1] == 'Conv' else 'bn'}{int(numbered[2]) + 1}.{_LEAF[leaf]}"
    raise ValueError(f"the model's variable {'/'.join(path)} has no torchvision counterpart: "
                     "use create_model(name, ...) with name in " + str(TORCHVISION_NAMES))


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Conv HWIO -> OIHW, Dense (in, out) -> (out, in); vectors as they are."""
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return tuple(reversed(flax_shape))


def _flax_value(a: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_torch_shape` on the values."""
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    return a.T


def _compare(given: dict[str, np.ndarray], want: dict[str, tuple[int, ...]], model: ResNet, head: str) -> None:
    """One ``ValueError`` line for the first differences between the checkpoint and the model."""
    theirs, ours = _architecture(given), (tuple(model.stage_sizes), _is_bottleneck(model.block_cls))
    missing = [k for k in sorted(want, key=_order) if k not in given]
    unexpected = [k for k in given if k not in want]
    shapes = [k for k in given if k in want and given[k].shape != want[k]]  # in the state dict's order
    if not (missing or unexpected or shapes):
        return
    if theirs != ours and theirs[0]:
        named = next((n for n in TORCHVISION_NAMES if _architecture_of(n) == theirs), None)
        hint = f"the state_dict is torchvision's {named}: pass create_model({named!r}, ...)" if named else \
            f"pass a model with stage_sizes={theirs[0]}"
        kind = {True: "Bottleneck", False: "BasicBlock"}
        if theirs[1] != ours[1]:
            first = f"the state_dict has {kind[theirs[1]]}s, the model {kind[ours[1]]}s"
        elif len(theirs[0]) != len(ours[0]):
            first = f"the state_dict has {len(theirs[0])} stages, the model {len(ours[0])}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(theirs[0], ours[0])) if a != b)
            a, b = theirs[0][i], ours[0][i]
            has = f"has layer{i + 1}.{b}.*" if a > b else f"has no layer{i + 1}.{a}.*"
            first = f"the state_dict {has} but the model expects {b} blocks in stage {i + 1}"
        raise ValueError(f"{first} (state_dict: {theirs[0]} blocks; model: {ours[0]}): {hint}")
    problems = [f"{k}: state_dict {tuple(given[k].shape)}, model expects {want[k]}" for k in shapes]
    problems += [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    if shapes and all(k.startswith("fc.") for k in shapes) and not (missing or unexpected):
        hint = (f"the checkpoint's fc has {given['fc.weight'].shape[0]} classes, the model {model.num_classes}: "
                "pass head='new' (with rng=) to start a fresh head, or the checkpoint's num_classes")
    elif unexpected and all(k.startswith("module.") for k in unexpected):
        hint = "strip the 'module.' prefix (DataParallel) from the names"
    elif shapes == ["conv1.weight"] and given[shapes[0]].shape[::2] == want[shapes[0]][::2]:
        hint = (f"the checkpoint's conv1 takes {given[shapes[0]].shape[1]} input channels, the images have "
                f"{want[shapes[0]][1]}: pass images with {given[shapes[0]].shape[1]} channels")
    elif shapes:
        hint = "pass a model of the checkpoint's widths (num_filters)"
    else:
        hint = "pass torchvision's own names (torchvision.models.resnetNN().state_dict()), nothing renamed or dropped"
    raise ValueError(f"the state_dict does not match the model ({len(problems)} difference{'s' * (len(problems) != 1)}): "
                     f"{'; '.join(problems[:3])}{more}: {hint}")


def _order(name: str) -> tuple[int, ...]:
    """torchvision's order of its names: stem, layer by layer and block by block, fc."""
    group = 0 if name.startswith(("conv1.", "bn1.")) else 2 if name.startswith("fc.") else 1
    return (group, *(int(d) for d in re.findall(r"\d+", name)))


def _architecture(given: Mapping[str, Any]) -> tuple[tuple[int, ...], bool]:
    """(blocks per stage, bottleneck?) of a torchvision state dict, from its ``layer{i}.{j}.`` names."""
    blocks: dict[int, int] = {}
    for k in given:
        m = _LAYER.match(k)
        if m:
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    stages = tuple(blocks.get(i, 0) for i in range(1, max(blocks, default=0) + 1))
    return stages, any(re.match(r"layer\d+\.\d+\.conv3\.", k) for k in given)


def _architecture_of(name: str) -> tuple[tuple[int, ...], bool]:
    spec = network_fields(name)
    return tuple(spec["stage_sizes"]), _is_bottleneck(spec.get("block_cls"))


def _is_bottleneck(block_cls: Any) -> bool:
    cls = getattr(block_cls, "func", block_cls)
    return isinstance(cls, type) and issubclass(cls, BottleneckBlock)
