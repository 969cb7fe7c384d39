"""``train.py --compile-only TARGET``: compile a run's train and eval steps for an accelerator this machine does
not have, run nothing, and say whether the run fits and what a step costs (``compile_report.json``).

JAX compiles ahead of time for a TPU slice described by libtpu (``jax[tpu]``) or for GPUs described by XLA's
target-config text (``jax[cuda12]``), from any host. The program is the run's own: the model, dtype, optimizer,
schedule, global batch, sharding over the global 1-D "data" mesh and donation come from the same functions a
run uses (:func:`adaresnet_jax.models.create_model`, :func:`adaresnet_jax.optim.make_optimizer`,
:func:`adaresnet_jax.steps.abstract_state`, :class:`adaresnet_jax.steps.StepOptions`,
:func:`adaresnet_jax.steps.make_eval_step`); only the data are abstract (``jax.ShapeDtypeStruct`` with their
shardings), their shapes taken from :data:`KNOWN_DATASETS` (or read from ``--data-dir`` for other sets).

The report (:func:`compile_run` returns it) holds, per program (``train``, ``eval``):

* ``memory``: per-device bytes of arguments, outputs, aliased outputs (the donated state), temporaries and
  ``peak`` = arguments + outputs - aliased + temporaries, from ``compiled.memory_analysis()``;
* ``flops_per_device``, ``flops_per_step``, ``flops_per_image``, ``bytes_accessed_per_device``: XLA's HLO cost
  analysis (of the compiled program where the backend gives it, TPU; else of the lowered module, GPU);
* ``collectives``: count and result bytes by kind, from the compiled HLO text;
* ``cpu_algorithms``: CPU-only constructs found in the program (must be empty): ``custom_vjp`` calls in the
  jaxpr, ``optimization_barrier`` in the HLO; ``convolutions``: the convolutions XLA emitted;
* ``compile_s``: seconds spent lowering and compiling.

and for the run: ``verdict`` ("fits (X of Y GiB)" or "does not fit: needs X GiB of Y"; the larger program's peak
plus the data a resident run keeps on every device besides that program's arguments), ``analytic`` (the
network's forward FLOPs per image from its jaxpr, x3 for a train step, beside the cost analysis) and
``roofline``: the larger of FLOPs / peak FLOP/s and bytes accessed / HBM bandwidth per device, a LOWER BOUND on
step time and so an UPPER BOUND on images/s, never a measurement. ``--find-max-batch`` adds ``max_batch``: the
largest global batch (a multiple of the device count) whose train step fits, within 1/32, from a linear model
of memory in the batch and bisection (:func:`find_max_batch`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from adaresnet_jax.config import Config
from adaresnet_jax.targets import GIB, Target, gpu_target_config, parse_target

# name: (training images, test images, classes, image shape; None: image_size x image_size x 3)
KNOWN_DATASETS: dict[str, tuple[int, int, int, tuple[int, int, int] | None]] = {
    "cifar10": (50000, 10000, 10, (32, 32, 3)),
    "cifar100": (50000, 10000, 100, (32, 32, 3)),
    "digits": (1438, 359, 10, (8, 8, 1)),  # scikit-learn's 1797 digits, 20% test (data/sources.py)
    "mnist": (60000, 10000, 10, (28, 28, 1)),
    "fashion_mnist": (60000, 10000, 10, (28, 28, 1)),
    "imagenet2012": (1281167, 50000, 1000, None),  # ILSVRC-2012: train and validation (the run's test split)
    "imagenette": (9469, 3925, 10, None),  # fast.ai's Imagenette v2 (TFDS imagenette/full-size-v2)
}
EXIT_DOES_NOT_FIT = 4
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def _usage(msg: str) -> Exception:
    from adaresnet_jax.train import UsageError

    return UsageError(msg)


# ----------------------------------------------------------------------------- the persistent compilation cache

_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_cache_counts = {"hits": 0, "misses": 0}
_listening = False


def _count_cache_event(event: str, **_: Any) -> None:
    if event in _CACHE_EVENTS:
        _cache_counts[_CACHE_EVENTS[event]] += 1


def use_compilation_cache(path: str | None) -> None:
    """Turns on JAX's persistent compilation cache in ``path`` (``--compilation-cache``): every program, however
    fast it compiled (``jax_persistent_cache_min_compile_time_secs`` 0), and on GPU XLA's per-fusion autotune
    results in ``path/xla_gpu_per_fusion_autotune_cache_dir`` (``jax_persistent_cache_enable_xla_caches``). With
    ``path`` None the environment decides ($JAX_COMPILATION_CACHE_DIR, read by JAX itself). Either way the
    cache's hits and misses are counted from then on (:func:`cache_stats`)."""
    import jax

    global _listening
    if path:
        Path(path).expanduser().mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_enable_xla_caches", "xla_gpu_per_fusion_autotune_cache_dir")
    if not _listening:
        jax.monitoring.register_event_listener(_count_cache_event)
        _listening = True


def cache_stats() -> dict[str, Any] | None:
    """{"dir", "hits", "misses"} of the persistent compilation cache in this process (None when it is off):
    summary.json's ``compilation_cache``."""
    import jax

    path = jax.config.jax_compilation_cache_dir
    return {"dir": path, **_cache_counts} if path else None


# ----------------------------------------------------------------------------- the host and the target's devices

def prepare_host(target: Target) -> None:
    """Before any JAX backend starts: compile on the CPU client (a GPU plugin would otherwise fail at cuInit on
    a machine without a GPU), and keep libtpu from querying a TPU VM's metadata server."""
    import jax

    if target.device.platform == "gpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    else:
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: no need for libtpu's lock file
    jax.config.update("jax_platforms", "cpu")


def target_devices(target: Target) -> list[Any]:
    """The target's devices (abstract: compile-only) from jax.experimental.topologies; UsageError when the
    compiler for it is not installed."""
    import jax
    from jax.experimental import topologies

    try:
        if target.device.platform == "tpu":
            topo = topologies.get_topology_desc(topology_name=f"{target.device.key}:{target.topology}", platform="tpu",
                                                **(target.device.tpu_topology_kwargs or {}))
        else:
            topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target.device.key),
                                                topology=target.topology)
    except Exception as e:  # noqa: BLE001 - the plugin is missing or refuses the topology
        import importlib.util

        plugin, module = ("tpu", "libtpu") if target.device.platform == "tpu" else ("cuda12", "jax_cuda12_plugin")
        if importlib.util.find_spec(module) is None:
            raise _usage(f"--compile-only {target.spec}: the compiler for it is not installed: pip install "
                         f"'jax[{plugin}]=={jax.__version__}'") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _usage(f"--compile-only {target.spec}: the target could not be described ({first})") from None
    return list(topo.devices)


def _target_model_overrides(cfg: Config, devices: list[Any]) -> tuple[dict[str, Any], Any]:
    """(create_model overrides, compute dtype) for the target ``devices``: ``--dtype auto`` and ``--conv-impl auto``
    resolve for them, never for this host (:func:`adaresnet_jax.conv.conv_impl_for`: XLA's own convolution on a
    TPU or GPU, so no CPU algorithm enters the program); a CPU algorithm asked for a TPU/GPU is refused."""
    try:
        out = cfg.model_overrides(devices)
    except ValueError as e:
        raise _usage(str(e)) from None
    return out, out["dtype"]


# ----------------------------------------------------------------------------- the data's shapes

@dataclasses.dataclass(frozen=True)
class DataShapes:
    """What the compiled programs need to know of the data: no pixel is read for a known data set."""

    image_shape: tuple[int, int, int]
    num_classes: int
    n_train: int
    n_val: int
    n_test: int
    streaming: bool
    source: str  # "known sizes" or "read from --data-dir"


def data_shapes(cfg: Config) -> DataShapes:
    """The shapes of ``cfg``'s data set and input path, from :data:`KNOWN_DATASETS` (nothing read) or, for other
    data sets, read from ``--data-dir`` as a run would; UsageError when neither is possible."""
    size = cfg.image_px
    known = KNOWN_DATASETS.get(cfg.dataset)
    if known is None:
        if cfg.data_dir is None:
            raise _usage(f"--compile-only: the shapes of --dataset {cfg.dataset} are not known without its data: pass "
                         f"--data-dir (it is read, not trained on), or use one of {', '.join(KNOWN_DATASETS)}")
        from adaresnet_jax.data import DataError
        from adaresnet_jax.data.streaming import StreamingData
        from adaresnet_jax.inputs import open_data

        try:
            ds, _ = open_data(cfg, lambda msg: print(msg, file=sys.stderr))
        except DataError as e:
            raise _usage(str(e)) from None
        if isinstance(ds, StreamingData):
            return DataShapes((size, size, 3), ds.num_classes, len(ds.train_idx), len(ds.val_idx), len(ds.test_idx),
                              True, "read from --data-dir")
        return DataShapes(ds.image_shape, ds.num_classes, len(ds.x_train), len(ds.x_val), len(ds.x_test), False,
                          "read from --data-dir")
    from adaresnet_jax.data.streaming import RESIDENT_ONLY

    n, n_test, classes, shape = known
    n_val = max(1, round(cfg.val_split * n)) if cfg.val_split > 0 else 0
    n_train = min(n - n_val, cfg.max_train or n)
    n_test = min(n_test, cfg.max_test or n_test)
    if cfg.dataset in RESIDENT_ONLY:
        if cfg.input == "streaming":
            raise _usage(f"--input streaming reads an image folder or a TFDS data set; --dataset {cfg.dataset} is "
                         "read into memory: use --input resident (or auto)")
        streaming = False
    else:
        decoded_mb = n_train * math.prod(shape or (size, size, 3)) / 2**20
        streaming = cfg.input == "streaming" or (cfg.input == "auto" and decoded_mb > cfg.resident_budget_mb)
    image_shape = (size, size, 3) if streaming or shape is None else shape
    return DataShapes(image_shape, classes, n_train, n_val, n_test, streaming, "known sizes")


# ----------------------------------------------------------------------------- building the run's programs

@dataclasses.dataclass
class Programs:
    """The run's jitted steps and their abstract arguments (see :func:`build`)."""

    train: Any
    train_args: tuple
    eval: Any
    eval_args: tuple
    resident_train_bytes: int  # per device: the training set a resident run keeps on every device
    resident_eval_bytes: int  # per device: the padded evaluation batches a resident run keeps on the devices
    eval_batch: int
    eval_batch_bytes: int  # per device: one evaluation batch (images, labels, mask)
    model: Any


def build(cfg: Config, devices: list[Any], target: Target, shapes: DataShapes, batch_size: int) -> Programs:
    """The run's train step (``on_dataset`` on the resident path, ``on_batch`` when streaming) and eval step, built
    by the trainer's own functions over a mesh of ``devices``, with abstract arguments."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from adaresnet_jax.models import create_model
    from adaresnet_jax.optim import make_optimizer
    from adaresnet_jax.steps import StepOptions, abstract_state, make_eval_step, make_mesh, make_train_step, \
        steps_per_epoch

    cfg = dataclasses.replace(cfg, batch_size=batch_size)
    n_dev = len(devices)
    mesh = make_mesh(devices)
    overrides, dtype = _target_model_overrides(cfg, devices)
    model = create_model(cfg.model, num_classes=shapes.num_classes, skip=cfg.skip, **overrides)
    spe = steps_per_epoch(cfg, shapes.n_train, n_dev)
    tx, _ = make_optimizer(cfg, spe)
    c = shapes.image_shape[-1]
    # the values are constants in the program; a run computes them from its data (same shapes, same cost)
    mean, std = ((0.5,) * c, (0.25,) * c) if cfg.normalize else ((0.0,) * c, (1.0,) * c)
    state = abstract_state(model, tx, shapes.image_shape, mesh=mesh)
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sds = lambda shape, dt, sh: jax.ShapeDtypeStruct(shape, dt, sharding=sh)  # noqa: E731
    opts = StepOptions.for_run(cfg, (mean, std), dtype, steps_per_epoch=spe, streaming=shapes.streaming)
    steps = make_train_step(model, tx, opts, mesh=mesh)
    image_bytes = math.prod(shapes.image_shape)
    if shapes.streaming:
        key = jax.eval_shape(lambda: jax.random.key(0))
        train, train_args = steps.on_batch, (state, sds((batch_size, *shapes.image_shape), jnp.uint8, data),
                                             sds((batch_size,), jnp.int32, data), sds((), key.dtype, repl))
        resident_train = 0
    else:
        n = shapes.n_train
        train, train_args = steps.on_dataset, (state, sds((n, *shapes.image_shape), jnp.uint8, repl),
                                               sds((n,), jnp.int32, repl),
                                               sds((n // batch_size, batch_size), jnp.int32, repl))
        resident_train = n * (image_bytes + 4) + (n // batch_size) * batch_size * 4
    round_up = lambda k: -(-max(k, 1) // n_dev) * n_dev  # noqa: E731
    eval_bs = min(round_up(cfg.eval_batch_size), round_up(max(shapes.n_val, shapes.n_test)))
    ev = make_eval_step(model, mesh=mesh, mean=mean, std=std, dtype=dtype)
    eval_args = (state, sds((eval_bs, *shapes.image_shape), jnp.uint8, data), sds((eval_bs,), jnp.int32, data),
                 sds((eval_bs,), jnp.bool_, data))
    padded = sum(-(-k // eval_bs) * eval_bs for k in (shapes.n_val, shapes.n_test) if k)
    resident_eval = 0 if shapes.streaming else padded * (image_bytes + 4 + 1) // n_dev
    return Programs(train, train_args, ev, eval_args, resident_train, resident_eval, eval_bs,
                    eval_bs * (image_bytes + 4 + 1) // n_dev, model)


# ----------------------------------------------------------------------------- compiling and reading the program

def _first(cost: Any) -> dict[str, float] | None:
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return dict(cost) if cost else None


def _lowered_cost(lowered: Any) -> dict[str, float] | None:
    """XLA's HLO cost analysis of the lowered (global, unpartitioned) module through the CPU client: the GPU
    compiler answers ``cost_analysis()`` with None for a compile-only target."""
    import jax
    from jax._src.lib import xla_client as xc

    try:
        mod = lowered.compiler_ir("hlo").get_hlo_module()
        return _first(xc._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, mod))
    except Exception:  # noqa: BLE001 - an internal API: the report then says the cost is unknown
        return None


def _optimized_cost(compiled: Any) -> dict[str, float] | None:
    """The same analysis of the optimized per-device module (its fusions: the bytes it moves; its cuDNN
    convolutions count zero FLOPs), or None where the executable does not expose it."""
    import jax
    from jax._src.lib import xla_client as xc

    try:
        mod = compiled.runtime_executable().hlo_modules()[0]
        return _first(xc._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, mod))
    except Exception:  # noqa: BLE001
        return None


def _shape_bytes(shape: str) -> int:
    return sum(_DTYPE_BYTES.get(dt, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape))


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "result_bytes"}} of the collectives in an HLO module's text (async ``-start`` halves
    counted once; result bytes as the op's printed result shape: for async starts the buffers it holds)."""
    out: dict[str, dict[str, int]] = {}
    pat = re.compile(r"=\s*(\([^=]*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo_text.splitlines():
        m = pat.search(re.sub(r"/\*.*?\*/", "", line))  # drop the /*index=5*/ comments of long tuples
        if m:
            d = out.setdefault(m[2], {"count": 0, "result_bytes": 0})
            d["count"] += 1
            d["result_bytes"] += _shape_bytes(m[1])
    return out


@dataclasses.dataclass
class Compiled:
    """One compiled program and what the report needs of it."""

    compiled: Any
    lowered: Any
    seconds: float
    jaxpr_text: str


def compile_program(fn: Any, args: tuple) -> Compiled:
    """Traces, lowers and compiles ``fn`` for ``args`` (abstract, with shardings on the target's devices)."""
    t0 = time.perf_counter()
    traced = fn.trace(*args)
    lowered = traced.lower()
    compiled = lowered.compile()
    return Compiled(compiled, lowered, time.perf_counter() - t0, str(traced.jaxpr))


def memory(c: Compiled) -> dict[str, int]:
    """Per-device bytes of the compiled program (``compiled.memory_analysis()``) and their ``peak``."""
    m = c.compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def describe(c: Compiled, n_dev: int, batch: int) -> dict[str, Any]:
    """The report's entry for one program (see the module docstring)."""
    text = c.compiled.as_text() or ""
    lowered_text = c.lowered.as_text()
    cost, source = _first(c.compiled.cost_analysis()), "compiled program (per device)"
    if cost and cost.get("flops", 0) > 0:
        per_dev = cost["flops"]
        bytes_dev = cost.get("bytes accessed")
    else:
        cost, opt = _lowered_cost(c.lowered), _optimized_cost(c.compiled)
        source = ("lowered module for FLOPs (global, divided by the device count); optimized per-device module for "
                  "bytes accessed")
        per_dev = cost["flops"] / n_dev if cost and "flops" in cost else None
        bytes_dev = opt.get("bytes accessed") if opt else None
    cpu = [name for name, found in (("custom_vjp", "custom_vjp_call" in c.jaxpr_text),
                                    ("optimization_barrier", "optimization_barrier" in lowered_text
                                     or "opt-barrier" in text)) if found]
    return {
        "memory": memory(c), "compile_s": round(c.seconds, 2),
        "flops_per_device": per_dev, "flops_per_step": per_dev * n_dev if per_dev else None,
        "flops_per_image": per_dev * n_dev / batch if per_dev else None,
        "bytes_accessed_per_device": bytes_dev, "cost_source": source,
        "collectives": collectives(text),
        "convolutions": text.count(" convolution(") + len(re.findall(r'custom_call_target="__cudnn\$conv', text)),
        "custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))),
        "cpu_algorithms": cpu,
    }


# ----------------------------------------------------------------------------- the report

def usable_memory(target: Target) -> int:
    """Bytes a program may use on one device: the GPU client's preallocated fraction of the memory, or what the
    TPU compiler makes available (``Device.usable_bytes``, else the HBM)."""
    dev = target.device
    if dev.platform == "gpu":
        frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
        return int(dev.memory_bytes * frac)
    return dev.usable_bytes or dev.memory_bytes


def verdict(needed: int | None, available: int, refused: bool = False) -> str:
    """"fits (X of Y GiB)" or "does not fit: needs X GiB of Y" (``refused``: the compiler gave up for lack of memory)."""
    if needed is None:
        return f"does not fit: the compiler ran out of the device's {available / GIB:.2f} GiB"
    if needed <= available and not refused:
        return f"fits ({needed / GIB:.2f} of {available / GIB:.2f} GiB)"
    if refused:
        return f"does not fit: needs at least {needed / GIB:.2f} GiB of {available / GIB:.2f} (the compiler ran out of memory)"
    return f"does not fit: needs {needed / GIB:.2f} GiB of {available / GIB:.2f}"


def roofline(flops_per_device: float | None, bytes_per_device: float | None, target: Target, dtype_name: str,
             batch: int) -> dict[str, Any] | None:
    """A lower bound on step time, max(FLOPs / peak, bytes / HBM bandwidth) per device, and the upper bound on
    images/s it implies. Never a measurement."""
    if not flops_per_device:
        return None
    dev = target.device
    peak = dev.peak_flops[dtype_name]
    compute_s = flops_per_device / peak
    memory_s = bytes_per_device / dev.hbm_bytes_per_s if bytes_per_device else 0.0
    step = max(compute_s, memory_s)
    return {"kind": "bound (compiled, never run)", "peak_flops_per_s": peak,
            "peak_name": f"{dev.name} dense {dtype_name} peak", "hbm_bytes_per_s": dev.hbm_bytes_per_s,
            "compute_s": compute_s, "memory_s": memory_s, "limited_by": "compute" if compute_s >= memory_s else "memory",
            "step_time_lower_bound_s": step, "images_per_s_upper_bound": batch / step,
            "images_per_s_per_device_upper_bound": batch / step / target.num_devices,
            "note": dev.peak_note}


def _fits(report_programs: dict[str, dict[str, Any]], progs: Programs) -> int:
    """Bytes needed per device: the larger program's peak plus the resident data besides its arguments."""
    train = report_programs["train"]["memory"]["peak"] + progs.resident_eval_bytes
    ev = report_programs.get("eval")
    if ev is None:
        return train
    rest = progs.resident_train_bytes + max(progs.resident_eval_bytes - progs.eval_batch_bytes, 0)
    return max(train, ev["memory"]["peak"] + rest)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(message: str) -> dict[str, Any] | None:
    """The compiler's refusal of a program that does not fit in the device's memory (the TPU compiler fails with
    RESOURCE_EXHAUSTED instead of returning a program), as {"compile_error", "used_bytes"} (the temporaries it
    says the program needs, a lower bound on the total; None when the message gives no figure); None for other
    errors."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    # libtpu 0.0.50: "the total memory required for HLO temporaries (411.44G) exceeds available HBM (15.75G)"
    m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
    used = int(float(m[1]) * _UNITS[m[2]]) if m else None
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return {"compile_error": " ".join(lines[:3])[:600], "used_bytes": used}


def _compile_described(fn: Any, args: tuple, n_dev: int, batch: int) -> dict[str, Any]:
    try:
        return describe(compile_program(fn, args), n_dev, batch)
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory refusal is a result
        oom = out_of_memory(str(e))
        if oom is None:
            raise
        return {**oom, "memory": {"peak": oom["used_bytes"]}}


def compile_once(cfg: Config, target: Target, devices: list[Any], shapes: DataShapes, batch: int, *,
                 with_eval: bool = True) -> tuple[dict[str, Any], int | None, Programs]:
    """({program: entry}, bytes needed per device, programs) for a global batch ``batch``. A program the compiler
    refused for lack of memory has ``compile_error`` (and the bytes it would have used, when the message says);
    the bytes needed are then those, or None when unknown."""
    progs = build(cfg, devices, target, shapes, batch)
    out = {"train": _compile_described(progs.train, progs.train_args, len(devices), batch)}
    if with_eval:
        out["eval"] = _compile_described(progs.eval, progs.eval_args, len(devices), progs.eval_batch)
    if any(p["memory"]["peak"] is None for p in out.values()):
        return out, None, progs
    if any("compile_error" in p for p in out.values()):  # the refused program's temporaries alone
        return out, max(p["memory"]["peak"] for p in out.values() if "compile_error" in p), progs
    return out, _fits(out, progs), progs


MAX_BATCH_RELATIVE_RESOLUTION = 32  # the search stops once the bracket is within 1/32 of the batch that fits
_MODEL_TRIES = 6  # tries placed by the linear model of memory in the batch before plain bisection takes over


def max_batch_resolution(batch: int, n_dev: int) -> int:
    """The bracket width at which :func:`find_max_batch` stops, for a largest fitting ``batch``: max(the device
    count, ``batch`` / 32 rounded down to a multiple of the device count)."""
    return max(n_dev, batch // MAX_BATCH_RELATIVE_RESOLUTION // n_dev * n_dev)


def _line_reaches(p0: tuple[int, int], p1: tuple[int, int], avail: int) -> float | None:
    """The batch at which the line through two (batch, bytes needed) points reaches ``avail`` bytes; None when
    it does not rise with the batch."""
    (b0, n0), (b1, n1) = sorted((p0, p1))
    if b1 == b0 or n1 <= n0:
        return None
    return b0 + (avail - n0) * (b1 - b0) / (n1 - n0)


def find_max_batch(cfg: Config, target: Target, devices: list[Any], shapes: DataShapes, say: Any, start: int,
                   known: dict[int, tuple[int | None, bool]] | None = None) -> dict[str, Any]:
    """The largest global batch (a multiple of the device count, at most the training set) whose train step
    fits, to within :func:`max_batch_resolution`. Each try compiles the train step; ``known`` gives tries
    already compiled ({batch: (bytes needed per device or None, the compiler refused it)}: the run's own batch).

    The bytes a step needs grow about linearly with the batch. From the start batch the search doubles (or
    halves, when the start does not fit) once; then each try goes where the line through two compiled tries
    (the largest that fits and the smallest that does not, by regula falsi with the Illinois correction, else
    the two nearest the limit on one side) reaches the usable memory, half a resolution below, kept at least one
    resolution inside the bracket so that a right prediction is closed by the next try. Before a bracket exists,
    two such tries on the same side of the limit are followed by a plain step (doubling while nothing failed,
    halving while nothing fitted); after ``_MODEL_TRIES`` of them, or when no line rises, bisection finishes.

    Returns {"max_batch" (None: not even one image per device fits), "first_that_does_not_fit" (None: the
    whole training set fits), "capped_by_training_set", "resolution" ({"rule", "bound": the resolution at the
    result, "gap": first_that_does_not_fit - max_batch}), "tries" (in order: {"batch", "needed_bytes" per
    device or None, "fits", "how": given/start/double/halve/model/bisect}), "compiles" (run by the search),
    "usable_bytes", "search_s"}. ``max_batch`` and ``first_that_does_not_fit`` are both among the tries, the
    first compiled and fitting, the second compiled and not fitting.
    """
    t0 = time.perf_counter()
    n_dev, avail = len(devices), usable_memory(target)
    cap = shapes.n_train // n_dev * n_dev
    known = dict(known or {})
    tries: list[dict[str, Any]] = []
    need: dict[int, int | None] = {}
    ok: dict[int, bool] = {}

    def fits(b: int, how: str) -> bool:
        if b in known:
            n, refused = known[b]
            how = "given"
        else:
            progs, n, _ = compile_once(cfg, target, devices, shapes, b, with_eval=False)
            refused = "compile_error" in progs["train"]
        need[b], ok[b] = n, n is not None and n <= avail and not refused
        tries.append({"batch": b, "needed_bytes": n, "fits": ok[b], "how": how})
        say(f"  batch {b} ({how}): {verdict(n, avail, refused)}")
        return ok[b]

    def line(stale: int, stale_fit: bool) -> float | None:
        """Where the bytes needed reach ``avail``: by regula falsi between the largest try that fits and the
        smallest that does not (Illinois: the end that stayed put through ``stale`` > 1 model tries in a row has
        its excess halved per extra try), else by the line through the two tries nearest the limit on one side."""
        good = [b for b in sorted(need) if ok[b]]
        bad = [b for b in sorted(need) if not ok[b] and need[b] is not None]
        if good and bad:
            (g, eg), (h, eh) = (good[-1], need[good[-1]] - avail), (bad[0], need[bad[0]] - avail)  # type: ignore[operator]
            if eh <= 0 or eg > 0:
                return None
            shrink = 0.5 ** max(stale - 1, 0)
            eg, eh = (eg, eh * shrink) if stale_fit else (eg * shrink, eh)
            return g + (h - g) * -eg / (eh - eg) if eh > eg else None
        pts = good[-2:] if len(good) >= 2 else bad[:2]
        return _line_reaches((pts[0], need[pts[0]]), (pts[1], need[pts[1]]), avail) if len(pts) == 2 else None  # type: ignore[arg-type]

    down = lambda x: int(x) // n_dev * n_dev  # noqa: E731 - a multiple of the device count, rounded down
    b = max(n_dev, min(down(start), cap))
    lo, hi = (b, None) if fits(b, "start") else (0, b)
    model_tries = 0
    while True:
        res = max_batch_resolution(lo, n_dev)
        if (hi is None and lo == cap) or (hi is not None and (hi <= n_dev or (lo and hi - lo <= res))):
            break
        c, how = None, ""
        stale = 0  # model tries in a row, the last ones, that all landed on the side of the last one
        while stale < len(tries) and tries[-1 - stale]["how"] == "model" and tries[-1 - stale]["fits"] == tries[-1]["fits"]:
            stale += 1
        bracketed = bool(lo) and hi is not None
        p = line(stale, tries[-1]["fits"]) if model_tries < _MODEL_TRIES and (bracketed or stale < 2) else None
        if p is not None:
            low, high = (lo + res if lo else n_dev), (hi - res if hi is not None else cap)
            if low <= high:
                c, how = min(max(down(p - res / 2), low), high), "model"
                model_tries += 1
        if c is None or c in ok:
            c, how = ((min(2 * lo, cap), "double") if hi is None else (down(hi // 2), "halve") if not lo
                      else (down((lo + hi) // 2), "bisect"))
        if fits(c, how):
            lo = c
        else:
            hi = c if hi is None else min(hi, c)
    return {"max_batch": lo or None, "first_that_does_not_fit": hi, "capped_by_training_set": hi is None,
            "resolution": {"rule": f"first_that_does_not_fit - max_batch <= max(devices, max_batch / "
                                   f"{MAX_BATCH_RELATIVE_RESOLUTION} rounded down to a multiple of the devices)",
                           "bound": max_batch_resolution(lo, n_dev), "gap": None if hi is None else hi - lo},
            "tries": tries, "compiles": sum(t["how"] != "given" for t in tries), "usable_bytes": avail,
            "search_s": round(time.perf_counter() - t0, 1)}


def compile_run(cfg: Config) -> dict[str, Any]:
    """``train.py --compile-only``: compiles the run for ``cfg.compile_only``, prints the summary and writes
    ``compile_report.json`` into the workdir; returns the report (``report["fits"]``). Raises UsageError for bad
    input."""
    try:
        target = parse_target(cfg.compile_only or "")
    except ValueError as e:
        raise _usage(str(e)) from None
    prepare_host(target)
    import jax

    shapes = data_shapes(cfg)
    devices = target_devices(target)
    overrides, _ = _target_model_overrides(cfg, devices)  # a CPU algorithm for a TPU/GPU is refused here
    n_dev, bs = len(devices), cfg.batch_size
    if bs % n_dev:
        raise _usage(f"batch_size {bs} is not divisible by the {n_dev} devices of {target.spec}: use a multiple of {n_dev}")
    if bs > shapes.n_train:
        raise _usage(f"batch_size {bs} exceeds the {shapes.n_train} training images: lower --batch-size")
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    hosts = len({getattr(d, "process_index", 0) for d in devices})
    say(f"compiling {cfg.model} (batch {bs}, {shapes.image_shape[0]}x{shapes.image_shape[1]}, "
        f"{'streaming' if shapes.streaming else 'resident'} input) for {target.spec}: {n_dev} x "
        f"{devices[0].device_kind} over {hosts} host{'s' * (hosts != 1)}")
    programs, needed, progs = compile_once(cfg, target, devices, shapes, bs)
    avail = usable_memory(target)
    refused = any("compile_error" in p for p in programs.values())
    fits = needed is not None and needed <= avail and not refused
    dtype_name = cfg.compute_dtype_for(devices)
    from adaresnet_jax.flops import model_flops

    fwd = model_flops(progs.model, shapes.image_shape)
    train = programs["train"]
    report: dict[str, Any] = {
        "kind": "compiled for the target, never run on it",
        "target": {"spec": target.spec, "device": target.device.name, "devices": n_dev, "hosts": hosts,
                   "device_kind": devices[0].device_kind, "topology": target.topology,
                   "memory_bytes": target.device.memory_bytes, "usable_memory_bytes": avail,
                   "memory_note": target.device.memory_note, "sources": target.device.sources},
        "run": {"model": cfg.model, "skip": cfg.skip, "dtype": dtype_name, "global_batch": bs,
                "per_device_batch": bs // n_dev, "eval_batch": progs.eval_batch, "image_shape": list(shapes.image_shape),
                "num_classes": shapes.num_classes, "train_images": shapes.n_train,
                "input": "streaming" if shapes.streaming else "resident", "shapes_from": shapes.source,
                "optimizer": cfg.optimizer, "conv_impl": overrides["conv_impl"]},
        "programs": programs,
        "resident_data_bytes_per_device": {"train_set": progs.resident_train_bytes, "eval_set": progs.resident_eval_bytes},
        "needed_bytes_per_device": needed, "fits": fits, "verdict": verdict(needed, avail, refused),
        "analytic": {"forward_flops_per_image": fwd, "train_flops_per_image": 3 * fwd,
                     "hlo_over_analytic_train": train["flops_per_image"] / (3 * fwd) if train.get("flops_per_image") else None,
                     "note": "2 x multiply-adds of every convolution and dense layer (padding included); a train "
                             "step counted as 3 forward passes"},
        "roofline": roofline(train.get("flops_per_device"), train.get("bytes_accessed_per_device"), target, dtype_name, bs),
        "versions": {"jax": jax.__version__},
        "compile_s": round(sum(p.get("compile_s", 0.0) for p in programs.values()), 2),
    }
    if cfg.find_max_batch:
        say(f"finding the largest batch that fits on {target.spec} (each try compiles the train step):")
        tr = programs["train"]
        first = None if tr["memory"]["peak"] is None else tr["memory"]["peak"] if "compile_error" in tr else _fits({"train": tr}, progs)
        report["max_batch"] = find_max_batch(cfg, target, devices, shapes, say, bs, known={bs: (first, "compile_error" in tr)})
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "compile_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_text(report))
    say(f"report: {workdir / 'compile_report.json'}")
    return report


def summary_text(r: dict[str, Any]) -> str:
    """The report in a few readable lines."""
    t, run, tr = r["target"], r["run"], r["programs"]["train"]
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    lines = [f"{run['model']} ({run['dtype']}, global batch {run['global_batch']}, {run['per_device_batch']} per device) "
             f"on {t['spec']} ({t['devices']} x {t['device_kind']}, {t['hosts']} host{'s' * (t['hosts'] != 1)}): "
             f"{r['verdict']} [compiled, not run]"]
    for name, p in r["programs"].items():
        m = p["memory"]
        if "compile_error" in p:
            lines.append(f"  {name} step: the compiler refused it: {p['compile_error'][:300]}")
        else:
            lines.append(f"  {name} step per device: arguments {g(m['argument'])}, outputs {g(m['output'])} "
                         f"({g(m['alias'])} aliased), temporaries {g(m['temp'])}, peak {g(m['peak'])}")
    lines.append(f"  resident data per device (training set, evaluation batches): "
                 f"{g(sum(r['resident_data_bytes_per_device'].values()))}; eval batch {run['eval_batch']}")
    if "compile_error" in tr:
        return "\n".join(lines)
    if tr["flops_per_image"]:
        a = r["analytic"]
        lines.append(f"  FLOPs: {tr['flops_per_step'] / 1e12:.3f} TFLOP per step, {tr['flops_per_image'] / 1e9:.2f} "
                     f"GFLOP per image (HLO cost analysis); analytic 3 x forward {a['train_flops_per_image'] / 1e9:.2f} "
                     f"GFLOP (ratio {a['hlo_over_analytic_train']:.2f})")
    col = ", ".join(f"{v['count']} {k} ({v['result_bytes'] / 2**20:.1f} MiB)" for k, v in tr["collectives"].items())
    lines.append(f"  collectives in the train step: {col or 'none'}; compile {r['compile_s']:.1f} s")
    rf = r["roofline"]
    if rf:
        lines.append(f"  roofline bound: step >= {rf['step_time_lower_bound_s'] * 1e3:.2f} ms ({rf['limited_by']}: "
                     f"{rf['peak_name']} {rf['peak_flops_per_s'] / 1e12:.1f} TFLOP/s, HBM "
                     f"{rf['hbm_bytes_per_s'] / 1e12:.2f} TB/s), so at most {rf['images_per_s_upper_bound']:.0f} images/s "
                     f"({rf['images_per_s_per_device_upper_bound']:.0f} per device): a bound, not a measurement")
    if tr["cpu_algorithms"]:
        lines.append(f"  WARNING: CPU-only constructs in the program: {', '.join(tr['cpu_algorithms'])}")
    if "max_batch" in r:
        mb = r["max_batch"]
        last = ("the whole training set: no larger batch exists" if mb["capped_by_training_set"]
                else f"the next one tried, {mb['first_that_does_not_fit']}, does not")
        lines.append(f"  largest batch that fits: {mb['max_batch']} ({last}; resolution {mb['resolution']['bound']}, "
                     f"{len(mb['tries'])} tries, {mb['compiles']} compiled by the search in {mb['search_s']:.0f} s)")
    return "\n".join(lines)
