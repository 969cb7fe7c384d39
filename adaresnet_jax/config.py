"""Training configuration: one frozen, keyword-only dataclass, named presets, and the command line.

Every field of :class:`Config` is a command-line flag (``batch_size`` -> ``--batch-size``; booleans as
``--flag/--no-flag``); ``--preset`` picks the starting values and explicit flags override them::

    python train.py --preset quick                         # digits, ~1 min on 2 CPU cores
    python train.py --preset paper --data-dir data/cifar10  # the seed's experiment (AdaResNet)
    python train.py --preset paper --skip identity ...      # the same with a plain ResNet
    python train.py --preset cifar --data-dir data/cifar10 --workdir runs/c10

Presets (see :data:`PRESETS`):

* ``quick``: digits (embedded 8x8 images), ResNet-20 at width 8, Adam 3e-3 with cosine decay,
  batch 64, 15 epochs, 10% validation; about a minute on 2 CPU cores.
* ``paper``: the seed's experiment: the ``paper`` network, learned skip, Adam 1e-3 constant,
  batch 32, 10 epochs, inputs scaled to [0, 1], no augmentation, no weight decay, CIFAR-10.
* ``cifar``: ``resnet18_cifar`` on CIFAR-10: SGD Nesterov 0.9, lr 0.1 at batch 128, cosine with
  1 warm-up epoch, weight decay 5e-4 (kernels only), label smoothing 0.1, crop (pad 4) and flip,
  per-channel normalisation, 30 epochs, 10% validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any, Literal

from adaresnet_jax.models import MODEL_NAMES, SKIP_RULES

Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "cosine", "step", "onecycle"]
DType = Literal["float32", "bfloat16"]
ConvImpl = Literal["auto", "xla", "slice_dot", "hybrid"]
EvalFrom = Literal["latest", "best"]

# Fields that may differ between a run and its resumption (they do not change the trained model).
# `epochs` is here so a finished run can be extended; with a schedule that depends on the total step
# count (cosine, step, onecycle) the extension then follows the new schedule from the resumed step.
RESUME_SAFE_FIELDS = frozenset({
    "preset", "epochs", "stop_after_epochs", "workdir", "data_dir", "quiet", "eval_only", "eval_from",
    "keep_checkpoints", "checkpoint_every", "coordinator", "num_processes", "process_id", "distributed",
    "eval_batch_size",
})


def _f(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a training run depends on. Defaults are the ``quick`` preset."""

    preset: str = _f("quick", "preset applied first; explicit flags override it", choices=("quick", "paper", "cifar"))
    # model
    model: str = _f("resnet20", "network name", choices=MODEL_NAMES)
    skip: str = _f("learned", "residual rule: identity (ResNet), learned (AdaResNet), rezero", choices=SKIP_RULES)
    skip_init: float | None = _f(None, "initial skip weight (none: the network's default, 0 for AdaResNet)")
    width: int | None = _f(8, "width of the first stage (num_filters); none: the network's default")
    conv_impl: ConvImpl = _f("auto", "convolution implementation (auto: hybrid on CPU, xla elsewhere; see adaresnet_jax.conv)")
    dtype: DType = _f("float32", "compute dtype; parameters stay float32")
    # data
    dataset: str = _f("digits", "digits, npz, cifar10, cifar100 or a TFDS image-classification name")
    data_dir: str | None = _f(None, "an .npz, a CIFAR python archive/folder, or a TFDS data dir")
    val_split: float = _f(0.1, "fraction of the training set held out for validation (0: none)")
    max_train: int | None = _f(None, "keep only the first N training images (quick experiments)")
    max_test: int | None = _f(None, "keep only the first N test images (quick experiments)")
    augment: bool = _f(False, "random crop and horizontal flip inside the step (see --crop-pad, --flip)")
    crop_pad: int = _f(4, "zero padding (pixels per side) of the random crop when augmenting; 0: no crop")
    flip: bool = _f(True, "random horizontal flip when augmenting")
    normalize: bool = _f(True, "per-channel mean/std normalisation (off: inputs scaled to [0, 1])")
    # optimisation
    epochs: int = _f(15, "number of training epochs (the last partial batch of each is dropped)")
    batch_size: int = _f(64, "global batch size over all devices of all processes")
    optimizer: Optimizer = _f("adam", "optimizer")
    lr: float = _f(3e-3, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum for SGD")
    weight_decay: float = _f(0.0, "weight decay of conv/dense kernels (never skip weights, BN or biases)")
    schedule: Schedule = _f("cosine", "learning-rate schedule (step: x0.1 at 50%% and 75%%)")
    warmup_epochs: float = _f(0.0, "linear warm-up from 0 (constant, cosine, step schedules)")
    grad_clip: float = _f(0.0, "clip gradients to this global norm (0: off)")
    skip_lr_mult: float = _f(1.0, "learning-rate multiplier of the skip weights")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    seed: int = _f(0, "seed of initialisation, data order, augmentation and the validation split")
    # run, checkpoints, output
    workdir: str = _f("runs/quick", "output folder: checkpoints, metrics.jsonl, summary.json, plots")
    quiet: bool = _f(False, "one log line per epoch instead of a progress bar")
    eval_only: bool = _f(False, "evaluate a checkpoint of --workdir on val/test and exit")
    eval_from: EvalFrom = _f("latest", "checkpoint that --eval-only evaluates")
    eval_batch_size: int = _f(512, "evaluation batch size (rounded up to a multiple of the device count)")
    keep_checkpoints: int = _f(2, "how many of the latest checkpoints to keep")
    checkpoint_every: int = _f(1, "save a checkpoint every N epochs (and always after the last)")
    stop_after_epochs: int | None = _f(None, "stop (with a checkpoint) after this many epochs; "
                                             "the schedule still runs over --epochs")
    # multi-host
    coordinator: str | None = _f(None, "address host:port of process 0 for jax.distributed.initialize")
    num_processes: int | None = _f(None, "number of processes of a multi-host run")
    process_id: int | None = _f(None, "id of this process in a multi-host run")
    distributed: bool = _f(False, "call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)")

    def __post_init__(self) -> None:
        validate(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def model_overrides(self) -> dict[str, Any]:
        """Keyword overrides for :func:`adaresnet_jax.models.create_model` (besides name/classes/skip)."""
        import jax.numpy as jnp

        out: dict[str, Any] = {"conv_impl": self.conv_impl, "param_dtype": jnp.float32,
                               "dtype": jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32}
        if self.width is not None:
            out["num_filters"] = self.width
        if self.skip_init is not None:
            out["skip_init"] = self.skip_init
        return out


def validate(cfg: Config) -> None:
    """Raises ValueError (one line) for values out of range or not among a field's choices."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        choices = _choices(f)
        if choices and v not in choices:
            raise ValueError(f"{f.name} is {v!r}; valid choices: {', '.join(map(str, choices))}")
    positive = ("epochs", "batch_size", "eval_batch_size", "keep_checkpoints", "checkpoint_every",
                "width", "max_train", "max_test", "stop_after_epochs", "num_processes")
    for name in positive:
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ValueError(f"{name} is {v}: it must be a positive integer")
    if not cfg.lr > 0:
        raise ValueError(f"lr is {cfg.lr}: it must be positive")
    for name in ("weight_decay", "warmup_epochs", "grad_clip", "skip_lr_mult", "momentum", "crop_pad"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} is {getattr(cfg, name)}: it must be >= 0")
    if not 0 <= cfg.label_smoothing < 1:
        raise ValueError(f"label_smoothing is {cfg.label_smoothing}: it must be in [0, 1)")
    if not 0 <= cfg.val_split < 1:
        raise ValueError(f"val_split is {cfg.val_split}: it must be in [0, 1) (0 disables validation)")
    if cfg.eval_from == "best" and cfg.val_split == 0 and cfg.eval_only:
        raise ValueError("eval_from='best' needs a validation split (val_split > 0)")


def _choices(f: dataclasses.Field) -> tuple | None:
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"])
    tp = typing.get_type_hints(Config)[f.name]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


PRESETS: dict[str, Config] = {
    "quick": Config(),
    "paper": Config(
        preset="paper", model="paper", skip="learned", width=None, dataset="cifar10", val_split=0.0,
        augment=False, normalize=False, epochs=10, batch_size=32, optimizer="adam", lr=1e-3,
        schedule="constant", warmup_epochs=0.0, weight_decay=0.0, label_smoothing=0.0, workdir="runs/paper"),
    "cifar": Config(
        preset="cifar", model="resnet18_cifar", width=None, dataset="cifar10", val_split=0.1,
        augment=True, crop_pad=4, flip=True, normalize=True, epochs=30, batch_size=128, optimizer="sgd",
        lr=0.1, momentum=0.9, nesterov=True, schedule="cosine", warmup_epochs=1.0, weight_decay=5e-4,
        label_smoothing=0.1, workdir="runs/cifar"),
}


# ----------------------------------------------------------------------------- command line

_EPILOG = """presets (--preset; explicit flags override the preset's values):
  quick  digits, resnet20 at width 8, Adam 3e-3 cosine, batch 64, 15 epochs (~40 s on 2 CPU cores)
  paper  the seed's experiment: paper network, learned skip, Adam 1e-3 constant, batch 32,
         10 epochs, inputs in [0, 1], no augmentation, CIFAR-10 (no validation split)
  cifar  resnet18_cifar on CIFAR-10: SGD Nesterov lr 0.1 at batch 128, cosine with 1 warm-up
         epoch, weight decay 5e-4, label smoothing 0.1, crop (pad 4) + flip, 30 epochs, 10% validation

examples:
  python train.py --preset quick
  python train.py --preset paper --data-dir data/cifar-10-python.tar.gz --workdir runs/paper
  python train.py --preset paper --skip identity --data-dir data/cifar-10-python.tar.gz --workdir runs/resnet
  python train.py --workdir runs/paper --eval-only          # the run's own config, latest checkpoint

Rerunning a command on its workdir resumes from the latest checkpoint; SIGTERM saves one and exits 0.
Exit codes: 0 done (or stopped by SIGTERM), 1 non-finite loss, 2 bad input.
Multi-host: --coordinator/--num-processes/--process-id, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/
JAX_PROCESS_ID, or --distributed (auto-detection on TPU pods, SLURM); the workdir must be shared."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_type(tp: Any):  # noqa: ANN202
    """(base type, optional) of a field annotation like ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _converter(base: Any, optional: bool, name: str):  # noqa: ANN202
    def convert(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {base.__name__} value {text!r} for --{name}") from None
    convert.__name__ = base.__name__
    return convert


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """An argparse parser with one flag per Config field; unset flags are absent from the namespace."""
    p = _Parser(prog=prog, description="Train ResNet / AdaResNet (learned skip weights) with JAX.",
                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        base, optional = _parse_type(hints[f.name])
        quick = getattr(PRESETS["quick"], f.name) if "PRESETS" in globals() else f.default
        help_ = f"{f.metadata['help']} ({'default' if f.name == 'preset' else 'quick preset'}: {quick})"
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
            continue
        choices = _choices(f)
        if typing.get_origin(base) is Literal:
            base = str
        p.add_argument(flag, type=_converter(base, optional, f.name), choices=choices,
                       metavar=None if choices else f.name.upper(), help=help_)
    return p


def parse_config(argv: list[str] | None = None, prog: str = "train.py") -> Config:
    """Config from command-line flags: the preset's values, then every explicitly given flag.

    Raises SystemExit(2) with a one-line message for unknown flags, bad choices or out-of-range values.
    """
    parser = build_parser(prog)
    ns = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    base = PRESETS[ns.pop("preset", "quick")]
    try:
        return dataclasses.replace(base, **ns)
    except ValueError as e:
        parser.error(str(e))
