"""Training configuration: one frozen, keyword-only dataclass, named presets, and the command line.

Every field of :class:`Config` is a command-line flag (``batch_size`` -> ``--batch-size``; booleans as
``--flag/--no-flag``). A flag left unset takes its neutral default: the network's or the optimiser's
own standard value (``--model resnet18_cifar`` alone builds the full-width network; ``--lr`` unset is
0.1 for SGD and 1e-3 for Adam). ``--preset`` (see :mod:`adaresnet_jax.presets`) replaces some of those
defaults, and explicit flags override the preset::

    python train.py --preset quick                         # digits, ~1 min on 2 CPU cores
    python train.py --preset paper                         # the seed's experiment (AdaResNet), CIFAR-10
    python train.py --preset paper --skip identity ...      # the same with a plain ResNet
    python train.py --model resnet18_cifar --dataset cifar10 --workdir runs/r18   # neutral defaults
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from adaresnet_jax.cli import OneLineParser
from adaresnet_jax.models import MODEL_NAMES, SKIP_RULES
from adaresnet_jax.presets import PRESETS

Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "cosine", "step", "onecycle"]
DType = Literal["float32", "bfloat16", "auto"]
InputPath = Literal["auto", "resident", "streaming"]
ConvImpl = Literal["auto", "xla", "slice_dot", "hybrid", "tuned", "tuned_single_device"]
EvalFrom = Literal["latest", "best"]

# Fields that may differ between a run and its resumption (they do not change the trained model).
# `epochs` is here so a finished run can be extended; with a schedule that depends on the total step
# count (cosine, step, onecycle) the extension then follows the new schedule from the resumed step.
RESUME_SAFE_FIELDS = frozenset({
    "preset", "epochs", "stop_after_epochs", "workdir", "data_dir", "quiet", "eval_only", "eval_from",
    "keep_checkpoints", "checkpoint_every", "coordinator", "num_processes", "process_id", "distributed",
    "eval_batch_size", "stop_timeout", "heartbeat_timeout", "stop_after_steps", "input_workers", "log_every_steps",
    "eval_every_steps", "checkpoint_every_steps", "checkpoint_every_minutes", "compilation_cache",
})
# Schedules whose value at a step depends on the total number of steps (so on --epochs).
TOTAL_STEP_SCHEDULES = frozenset({"cosine", "step", "onecycle"})
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}


def _f(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a training run depends on. The defaults are neutral; presets override some of them."""

    preset: str | None = _f(None, "preset whose values replace the neutral defaults (explicit flags override it)",
                            choices=tuple(PRESETS))
    # model
    model: str = _f("resnet20", "network name", choices=MODEL_NAMES)
    skip: str = _f("learned", "residual rule: identity (ResNet), learned (AdaResNet), rezero", choices=SKIP_RULES)
    skip_init: float | None = _f(None, "initial skip weight (none: the network's default, 0 for AdaResNet)")
    downsample_skip_init: str | None = _f(None, "initial skip weight of learned blocks with a shortcut: a number or "
                                                "'normal' (Keras' RandomNormal(0.05), the seed script's variant)")
    skip_per_channel: bool = _f(False, "one skip weight per channel instead of one per block")
    width: int | None = _f(None, "width of the first stage (num_filters); none: the network's own")
    conv_impl: ConvImpl = _f("auto", "convolution implementation for the mesh's devices (auto: tuned on CPU devices, "
                                     "xla on GPU/TPU; the CPU ones are refused there; see adaresnet_jax.conv.conv_impl_for)")
    dtype: DType = _f("float32", "compute dtype; parameters stay float32 (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    # data
    dataset: str = _f("cifar10", "digits, npz, cifar10, cifar100 (downloaded when --data-dir is unset), a TFDS "
                                 "image-classification name, or any name for an image folder given by --data-dir")
    data_dir: str | None = _f(None, "an image folder (train/<class>/*.jpg and val/<class>/*.jpg), an .npz, a CIFAR "
                                    "python archive/folder, or a TFDS data dir (none for cifar10/100: the download "
                                    "cache, $ADARESNET_DATA or ~/.cache/adaresnet_jax)")
    val_split: float = _f(0.1, "fraction of the training set held out for validation (0: none)")
    max_train: int | None = _f(None, "keep only the first N training images (quick experiments)")
    max_test: int | None = _f(None, "keep only the first N test images (quick experiments)")
    augment: bool = _f(False, "random crop and horizontal flip inside the step (see --crop-pad, --flip)")
    crop_pad: int = _f(4, "zero padding (pixels per side) of the random crop when augmenting; 0: no crop")
    flip: bool = _f(True, "random horizontal flip when augmenting")
    normalize: bool = _f(True, "per-channel mean/std normalisation (off: inputs scaled to [0, 1])")
    drop_last: bool = _f(True, "drop each epoch's last partial batch (off: train it, as Keras' fit does)")
    # input path (see adaresnet_jax/data/streaming.py)
    input: InputPath = _f("auto", "resident: the uint8 training set on every device, batches gathered in the step "
                                  "(fast; small sets); streaming: read, decode and augment on the host with grain "
                                  "(image folders, TFDS ArrayRecord; any size); auto: resident when the decoded "
                                  "training set fits --resident-budget-mb")
    resident_budget_mb: float = _f(2048.0, "largest decoded training set (MB, uint8) that --input auto keeps resident")
    image_size: int | None = _f(None, "square image size of image folders and streamed sets (none: 224)")
    eval_crop: float = _f(0.875, "image folders and streamed sets: evaluation (and streaming without --augment) "
                                 "resizes the short side to image_size / eval_crop and center-crops (224/256)")
    min_crop_area: float = _f(0.08, "streaming --augment: smallest area fraction of the Inception-style "
                                    "random-resized crop (aspect 3/4-4/3), then a flip (see --flip)")
    input_workers: int | None = _f(None, "streaming: grain worker processes decoding images (0: threads in this "
                                         "process; none: one per CPU core, at most 32)")
    max_bad_images: float = _f(0.01, "streaming: fraction of unreadable images skipped (counted in metrics.jsonl); "
                                     "more exits with code 2")
    # optimisation
    epochs: int = _f(10, "number of training epochs")
    batch_size: int = _f(128, "global batch size over all devices of all processes")
    optimizer: Optimizer = _f("sgd", "optimizer")
    lr: float | None = _f(None, "peak learning rate (none: 0.1 for sgd, 0.001 for adam/adamw)")
    lr_batch: int | None = _f(None, "when set, --lr is the rate at this batch size and the peak rate is lr x "
                                    "batch_size / lr_batch (Goyal et al. 2017's linear scaling)")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "Nesterov momentum for SGD")
    adam_eps: float = _f(1e-8, "epsilon of adam/adamw (Keras uses 1e-7)")
    weight_decay: float = _f(0.0, "weight decay of conv/dense kernels (never skip weights, BN or biases)")
    schedule: Schedule = _f("constant", "learning-rate schedule (step: x0.1 at 50%% and 75%%)")
    warmup_epochs: float = _f(0.0, "linear warm-up from 0 (constant, cosine, step schedules)")
    grad_clip: float = _f(0.0, "clip gradients to this global norm (0: off)")
    skip_lr_mult: float = _f(1.0, "learning-rate multiplier of the skip weights")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    seed: int = _f(0, "seed of initialisation, data order, augmentation and the validation split")
    init_from: str | None = _f(None, "start from a torchvision ResNet state_dict saved as .npz (names -> arrays; "
                                     "--model resnet18..152) with a new head; ignored when resuming")
    # run, checkpoints, output
    workdir: str = _f("runs/default", "output folder: checkpoints, metrics.jsonl, summary.json, plots")
    quiet: bool = _f(False, "one log line per epoch instead of a progress bar (always so when stderr is not a terminal)")
    eval_only: bool = _f(False, "evaluate a checkpoint of --workdir on val/test and exit")
    eval_from: EvalFrom = _f("latest", "checkpoint that --eval-only evaluates")
    eval_batch_size: int = _f(512, "evaluation batch size (rounded up to a multiple of the device count)")
    keep_checkpoints: int = _f(2, "how many of the latest checkpoints to keep")
    checkpoint_every: int = _f(1, "save a checkpoint every N epochs (and always after the last)")
    checkpoint_every_steps: int | None = _f(None, "save a checkpoint every N steps instead of --checkpoint-every epochs")
    checkpoint_every_minutes: float | None = _f(None, "also save when this many minutes have passed since the last "
                                                      "save (checked at each log step, process 0's clock)")
    log_every_steps: int | None = _f(None, "a metrics.jsonl row (train loss/acc since the last row) every N steps "
                                           "(none: every epoch)")
    eval_every_steps: int | None = _f(None, "evaluate on val/test every N steps (none: every epoch)")
    stop_after_epochs: int | None = _f(None, "stop (with a checkpoint) after this many epochs; "
                                             "the schedule still runs over --epochs")
    stop_after_steps: int | None = _f(None, "stop (with a checkpoint) after this many steps (mid-epoch allowed)")
    stop_timeout: float = _f(300.0, "seconds after SIGTERM within which the run must have saved and exited; "
                                    "past it (or on a second SIGTERM) it exits with code 3 without saving")
    # ahead-of-time compilation (see adaresnet_jax/aot.py) and the compilation cache
    compile_only: str | None = _f(None, "compile the run's train and eval steps for TARGET (tpu:v5e:2x2, tpu:v5e:16x16, "
                                        "gpu:h100, gpu:h100:2x1x8, ...; see adaresnet_jax/targets.py), run nothing, "
                                        "write compile_report.json in --workdir; exit code 4 if it does not fit")
    find_max_batch: bool = _f(False, "with --compile-only: also find the largest global batch that fits (bisection)")
    compilation_cache: str | None = _f(None, "persistent compilation cache folder: jax_compilation_cache_dir (every "
                                             "program, however fast it compiled) and, on GPU, XLA's per-fusion "
                                             "autotune results (also: $JAX_COMPILATION_CACHE_DIR)")
    # multi-host
    coordinator: str | None = _f(None, "address host:port of process 0 for jax.distributed.initialize")
    num_processes: int | None = _f(None, "number of processes of a multi-host run")
    process_id: int | None = _f(None, "id of this process in a multi-host run")
    distributed: bool = _f(False, "call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)")
    heartbeat_timeout: int = _f(100, "seconds without a heartbeat after which a multi-host run declares a "
                                     "process dead and every process exits")

    def __post_init__(self) -> None:
        validate(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def peak_lr(self) -> float:
        """``lr`` (or the optimizer's usual value when it is unset), times batch_size / lr_batch if that is set."""
        lr = DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        return lr * self.batch_size / self.lr_batch if self.lr_batch else lr

    @property
    def compute_dtype(self) -> str:
        """``dtype`` with "auto" resolved for this process's devices (``compute_dtype_for(jax.devices())``)."""
        import jax

        return self.compute_dtype_for(jax.devices())

    @property
    def image_px(self) -> int:
        """The square image size of image folders and streamed sets: ``image_size``, or 224 when unset."""
        return self.image_size or 224

    def compute_dtype_for(self, devices: Any) -> str:
        """``dtype`` with "auto" resolved for ``devices`` (a Mesh or jax.Device list): float32 on CPU, else bfloat16."""
        from adaresnet_jax.conv import compute_dtype_for

        return compute_dtype_for(devices, self.dtype)

    def model_overrides(self, devices: Any = None) -> dict[str, Any]:
        """Keyword overrides for :func:`adaresnet_jax.models.create_model` (besides name/classes/skip), with
        ``conv_impl`` and the compute dtype resolved for ``devices`` (a Mesh or devices; none: ``jax.devices()``)."""
        import jax
        import jax.numpy as jnp

        from adaresnet_jax.conv import conv_impl_for

        devices = jax.devices() if devices is None else devices
        out: dict[str, Any] = {"conv_impl": conv_impl_for(devices, self.conv_impl), "param_dtype": jnp.float32,
                               "dtype": jnp.bfloat16 if self.compute_dtype_for(devices) == "bfloat16" else jnp.float32}
        if self.width is not None:
            out["num_filters"] = self.width
        if self.skip_init is not None:
            out["skip_init"] = self.skip_init
        if self.downsample_skip_init is not None:
            d = self.downsample_skip_init
            out["downsample_skip_init"] = d if d == "normal" else float(d)
        if self.skip_per_channel:
            out["skip_per_channel"] = True
        return out


def validate(cfg: Config) -> None:
    """Raises ValueError (one line) for values out of range or not among a field's choices."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        choices = _choices(f)
        if choices and v not in choices and not (v is None and f.default is None):
            raise ValueError(f"{f.name} is {v!r}; valid choices: {', '.join(map(str, choices))}")
    positive = ("epochs", "batch_size", "eval_batch_size", "keep_checkpoints", "checkpoint_every",
                "width", "max_train", "max_test", "stop_after_epochs", "num_processes", "heartbeat_timeout",
                "image_size", "lr_batch", "stop_after_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps")
    for name in positive:
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ValueError(f"{name} is {v}: it must be a positive integer")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"lr is {cfg.lr}: it must be positive")
    if not (cfg.adam_eps > 0 and cfg.stop_timeout > 0):
        raise ValueError(f"adam_eps ({cfg.adam_eps}) and stop_timeout ({cfg.stop_timeout}) must be positive")
    for name in ("weight_decay", "warmup_epochs", "grad_clip", "skip_lr_mult", "momentum", "crop_pad"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} is {getattr(cfg, name)}: it must be >= 0")
    if not (0 < cfg.eval_crop <= 1 and 0 < cfg.min_crop_area <= 1 and 0 <= cfg.max_bad_images < 1):
        raise ValueError(f"eval_crop ({cfg.eval_crop}) and min_crop_area ({cfg.min_crop_area}) must be in (0, 1], "
                         f"max_bad_images ({cfg.max_bad_images}) in [0, 1)")
    if cfg.input_workers is not None and cfg.input_workers < 0:
        raise ValueError(f"input_workers is {cfg.input_workers}: it must be >= 0 (0: threads, no worker processes)")
    if not cfg.resident_budget_mb >= 0 or not (cfg.checkpoint_every_minutes is None or cfg.checkpoint_every_minutes > 0):
        raise ValueError(f"resident_budget_mb ({cfg.resident_budget_mb}) must be >= 0 and checkpoint_every_minutes "
                         f"({cfg.checkpoint_every_minutes}) positive")
    if not 0 <= cfg.label_smoothing < 1:
        raise ValueError(f"label_smoothing is {cfg.label_smoothing}: it must be in [0, 1)")
    if not 0 <= cfg.val_split < 1:
        raise ValueError(f"val_split is {cfg.val_split}: it must be in [0, 1) (0 disables validation)")
    d = cfg.downsample_skip_init
    if d is not None and d != "normal":
        try:
            float(d)
        except ValueError:
            raise ValueError(f"downsample_skip_init is {d!r}: use a number or 'normal'") from None
    name = cfg.dataset
    if name.startswith(("/", ".", "~")) or name.endswith((".npz", ".tar.gz", ".tgz", ".tar")) or (
            "/" in name and Path(name).exists()):  # (TFDS names may hold a "/": "imagenette/320px-v2")
        raise ValueError(f"--dataset {name!r} looks like a path: pass the file or folder with --data-dir, and "
                         "the data set's name with --dataset (cifar10, cifar100, npz or a TFDS name)")
    if name == "digits" and cfg.data_dir is not None:
        raise ValueError(f"--data-dir {cfg.data_dir!r} would be ignored by --dataset digits (scikit-learn's "
                         "embedded digits): drop --data-dir, or name the data set it holds with --dataset "
                         "(npz, cifar10, cifar100 or a TFDS name)")
    if cfg.find_max_batch and not cfg.compile_only:
        raise ValueError("--find-max-batch needs --compile-only TARGET (it compiles, it does not train)")
    if cfg.eval_from == "best" and cfg.val_split == 0 and cfg.eval_only:
        raise ValueError("eval_from='best' needs a validation split (val_split > 0)")


def _choices(f: dataclasses.Field) -> tuple | None:
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"])
    tp = typing.get_type_hints(Config)[f.name]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


# ----------------------------------------------------------------------------- command line

_EPILOG = """presets (--preset NAME; explicit flags override the preset's values; see adaresnet_jax/presets.py):
  quick  digits (embedded), resnet20 at width 8, Adam 3e-3 cosine, batch 64, 15 epochs (~1 min on 2 CPU cores)
  paper  the seed's experiment: paper network, learned skip, Adam 1e-3 (eps 1e-7) constant, batch 32 with the
         last partial batch, 10 epochs, inputs in [0, 1], no augmentation, CIFAR-10, no validation split
  cifar  resnet18_cifar on CIFAR-10: SGD Nesterov lr 0.1 at batch 128, cosine with 1 warm-up
         epoch, weight decay 5e-4, label smoothing 0.1, crop (pad 4) + flip, 30 epochs, 10% validation
  imagenet  resnet50 on ImageNet (image folder or TFDS imagenet2012), streamed: SGD Nesterov lr 0.1 x batch/256,
         batch 1024, 5 warm-up epochs then cosine to 0, 90 epochs, weight decay 1e-4, label smoothing 0.1,
         224 px Inception crop + flip, bf16 on GPU/TPU (float32 on CPU), 1% of train held out (minival)
  imagenette  resnet50 at 128 px on Imagenette (10 ImageNet classes), the imagenet recipe for 20 epochs:
         minutes on one GPU
Without --preset every flag has its neutral default (shown per flag, with what each preset sets).

examples:
  python train.py --preset quick
  python train.py --preset paper --workdir runs/paper          # downloads CIFAR-10 once (~170 MB)
  python train.py --preset paper --skip identity --data-dir cifar-10-python.tar.gz --workdir runs/resnet
  python train.py --workdir runs/paper --eval-only             # the run's own config, latest checkpoint
  python train.py --preset imagenet --skip identity --data-dir /data/imagenet   # train/<class>/*.JPEG, val/...
  python train.py --preset imagenet --data-dir ~/tensorflow_datasets           # TFDS imagenet2012 (ArrayRecord)
  python train.py --preset imagenet --skip identity --compile-only tpu:v5e:16x16  # will it fit? (needs jax[tpu])

Rerunning a command on its workdir resumes from the latest checkpoint; SIGTERM saves one and exits 0.
Exit codes: 0 done (or stopped by SIGTERM), 1 non-finite loss or a failure, 2 bad input,
3 no clean stop within --stop-timeout of SIGTERM (or a second SIGTERM), 4 --compile-only: it does not fit.
Multi-host: --coordinator/--num-processes/--process-id, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/
JAX_PROCESS_ID, or --distributed (auto-detection on TPU pods, SLURM); the workdir must be shared."""


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


def _defaults_text(f: dataclasses.Field) -> str:
    """'default: X; quick: Y, paper: Z': the neutral default, then each preset that sets the field."""
    by_preset = ", ".join(f"{name}: {vals[f.name]}" for name, vals in PRESETS.items() if f.name in vals)
    return f"default: {f.default}" + (f"; {by_preset}" if by_preset else "")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """An argparse parser with one flag per Config field; unset flags are absent from the namespace."""
    p = OneLineParser(prog=prog, description="Train ResNet / AdaResNet (learned skip weights) with JAX.",
                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        base, optional = _parse_type(hints[f.name])
        help_ = f"{f.metadata['help']} ({_defaults_text(f)})"
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
    preset = ns.get("preset")
    try:
        return Config(**{**(PRESETS[preset] if preset else {}), **ns})
    except ValueError as e:
        parser.error(str(e))
