"""Accelerators that ``train.py --compile-only TARGET`` compiles for, as data, each figure with its public source.

A TARGET is ``tpu:CHIP:TOPOLOGY`` (``tpu:v5e:2x2``, ``tpu:v5e:16x16``, ``tpu:v4:2x2x2``, ``tpu:v5p:2x2x1``,
``tpu:v6e:4x4``) or ``gpu:CHIP[:SLICESxHOSTSxGPUS]`` (``gpu:h100`` is one GPU, ``gpu:h100:1x1x8`` one host of 8,
``gpu:h100:2x1x8`` two hosts of 8: XLA's GPU topology string is slices x hosts per slice x devices per host).

:data:`DEVICES` holds, per chip: memory, HBM bandwidth and peak dense FLOP/s (``sources`` quotes the page and the
figure for each). The GPU compiler also needs a description of the device (XLA's ``gpu_device_info`` text):
the H100's is the one published in jax-ml/jax issue 28376; the H200's and the A100's are derived from it with
the fields that differ taken from NVIDIA's data sheets (:data:`GPU_CONFIG_CHANGES` lists them).
"""

from __future__ import annotations

import dataclasses
import re

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator chip. ``peak_flops``: dense FLOP/s by compute dtype (no sparsity); ``memory_bytes``: the
    device memory a program may use (see ``memory_note``); ``hbm_bytes_per_s``: peak memory bandwidth."""

    key: str
    name: str
    platform: str  # "tpu" or "gpu"
    memory_bytes: int
    hbm_bytes_per_s: float
    peak_flops: dict[str, float]
    sources: dict[str, str]
    memory_note: str = ""
    peak_note: str = ""
    usable_bytes: int | None = None  # what the compiler lets a program use, where known (else memory_bytes)
    tpu_topology_kwargs: dict | None = None  # extra arguments of get_topology_desc (v4, v5p: megacore chips)


_TPU_F32 = ("XLA's default precision on TPU computes float32 convolutions and matmuls in bfloat16 passes on the "
            "MXU (jax.lax.Precision.DEFAULT), so the bfloat16 peak bounds both dtypes")
_GPU_F32 = ("float32 uses the TF32 tensor-core peak: XLA's default precision on Ampere and Hopper may run float32 "
            "convolutions in TF32 (jax.lax.Precision.DEFAULT), and a lower bound must assume the fastest unit")
_GPU_MEM = ("JAX's GPU client preallocates 75% of device memory (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75; "
            "https://docs.jax.dev/en/latest/gpu_memory_allocation.html): the verdict uses that fraction, or the "
            "environment's value when set")
_MEGACORE = dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1), wrap=(False, False, False))

DEVICES: dict[str, Device] = {d.key: d for d in (
    Device("v5e", "TPU v5e", "tpu", 16 * GIB, 819e9, {"bfloat16": 197e12, "float32": 197e12},
           {"all": "https://cloud.google.com/tpu/docs/v5e: peak compute per chip (bf16) 197 TFLOPs; "
                   "HBM2 capacity and bandwidth 16 GB, 819 GBps"},
           memory_note="16 GB HBM2 per chip, taken as 16 GiB; a program may use 15.75 GiB (\"available HBM (15.75G)\" "
                       "in the out-of-memory message of libtpu 0.0.50.1's compiler)",
           peak_note=_TPU_F32, usable_bytes=int(15.75 * GIB)),
    Device("v4", "TPU v4", "tpu", 32 * GIB, 1200e9, {"bfloat16": 275e12, "float32": 275e12},
           {"all": "https://cloud.google.com/tpu/docs/v4: peak compute per chip (bf16) 275 TFLOPs; "
                   "HBM2 capacity and bandwidth 32 GiB, 1200 GBps"},
           peak_note=_TPU_F32, tpu_topology_kwargs=_MEGACORE),
    Device("v5p", "TPU v5p", "tpu", 95 * 10**9, 2765e9, {"bfloat16": 459e12, "float32": 459e12},
           {"all": "https://cloud.google.com/tpu/docs/v5p: peak compute per chip (bf16) 459 TFLOPs; "
                   "HBM2e capacity and bandwidth 95 GB, 2765 GBps"},
           peak_note=_TPU_F32, tpu_topology_kwargs=_MEGACORE),
    Device("v6e", "TPU v6e (Trillium)", "tpu", 32 * GIB, 1600e9, {"bfloat16": 918e12, "float32": 918e12},
           {"all": "https://cloud.google.com/tpu/docs/v6e: peak compute per chip (bf16) 918 TFLOPs; "
                   "HBM capacity per chip 32 GB; HBM bandwidth per chip 1600 GBps"},
           memory_note="32 GB HBM per chip, taken as 32 GiB", peak_note=_TPU_F32),
    Device("h100", "NVIDIA H100 SXM5 80GB", "gpu", 84929347584, 3.35e12, {"bfloat16": 989.5e12, "float32": 494.5e12},
           {"all": "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM): BF16 tensor core 1,979 TFLOPS and "
                   "TF32 989 TFLOPS with sparsity (half without); GPU memory 80 GB; bandwidth 3.35 TB/s",
            "memory_bytes": "device_memory_size of the gpu_device_info in jax-ml/jax issue 28376"},
           memory_note=_GPU_MEM, peak_note=_GPU_F32),
    Device("h200", "NVIDIA H200 SXM 141GB", "gpu", 141 * 10**9, 4.8e12, {"bfloat16": 989.5e12, "float32": 494.5e12},
           {"all": "https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM): BF16 tensor core 1,979 TFLOPS and "
                   "TF32 989 TFLOPS with sparsity (half without); GPU memory 141 GB; bandwidth 4.8 TB/s"},
           memory_note=_GPU_MEM, peak_note=_GPU_F32),
    Device("a100-80gb", "NVIDIA A100 SXM4 80GB", "gpu", 80 * GIB, 2.039e12, {"bfloat16": 312e12, "float32": 156e12},
           {"all": "https://www.nvidia.com/en-us/data-center/a100/ (A100 80GB SXM): BF16 tensor core 312 TFLOPS, "
                   "TF32 156 TFLOPS (dense); GPU memory 80 GB HBM2e; bandwidth 2,039 GB/s"},
           memory_note=_GPU_MEM, peak_note=_GPU_F32),
)}

# XLA's description of an H100 SXM5 (the gpu_device_info published in jax-ml/jax issue 28376), with the CUDA
# runtime and cuDNN versions of jax[cuda12] 0.12.
H100_CONFIG = """gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 7
}
runtime_version {
  major: 12
  minor: 8
  patch: 0
}
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# The fields in which the H200 and the A100 differ from H100_CONFIG (derived: not published by NVIDIA as XLA text).
GPU_CONFIG_CHANGES: dict[str, dict[str, str]] = {
    "h100": {},
    # H200 SXM: the same GH100 die (132 SMs, 50 MB L2, clocks); memory and bandwidth from the data sheet.
    "h200": {"memory_bandwidth": "4800000000000", "device_memory_size": str(141 * 10**9),
             "device_description_str": '"NVIDIA H200"'},
    # A100 SXM4 80GB (GA100): 108 SMs, 64 FP32 units per SM, 164 KiB shared memory per SM (163 KiB per block
    # opt-in), 40 MB L2, 1.41 GHz boost, compute capability 8.0; NVIDIA A100 data sheet and the CUDA C
    # programming guide's compute-capability table.
    "a100-80gb": {"core_count": "108", "fpus_per_core": "64", "shared_memory_per_core": "167936",
                  "shared_memory_per_block_optin": "166912", "l2_cache_size": "41943040", "clock_rate_ghz": "1.41",
                  "memory_bandwidth": "2039000000000", "device_memory_size": str(80 * GIB),
                  "cuda_compute_capability": "{\n    major: 8\n  }",
                  "device_description_str": '"NVIDIA A100-SXM4-80GB"'},
}


def gpu_target_config(key: str) -> str:
    """XLA's target-config text for GPU ``key``: :data:`H100_CONFIG` with :data:`GPU_CONFIG_CHANGES` applied."""
    text = H100_CONFIG
    for field, value in GPU_CONFIG_CHANGES[key].items():
        if field == "cuda_compute_capability":
            text, n = re.subn(r"cuda_compute_capability \{[^}]*\}", f"cuda_compute_capability {value}", text)
        else:
            text, n = re.subn(rf"(?m)^(\s*){field}: .*$", rf"\g<1>{field}: {value}", text)
        assert n == 1, field
    return text


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed TARGET: the chip, its topology string and the number of devices and hosts."""

    spec: str
    device: Device
    topology: str
    num_devices: int
    num_hosts: int | None  # GPUs: from the topology; TPUs: from the topology description (None until built)


_TPU_RE = re.compile(r"tpu:([a-z0-9]+):(\d+(?:x\d+){1,2})")
_GPU_RE = re.compile(r"gpu:([a-z0-9-]+)(?::(\d+)x(\d+)x(\d+))?")
EXAMPLES = "tpu:v5e:2x2, tpu:v5e:16x16, tpu:v4:2x2x2, tpu:v5p:2x2x1, tpu:v6e:4x4, gpu:h100, gpu:h100:1x1x8, " \
           "gpu:h100:2x1x8, gpu:h200, gpu:a100-80gb"


def parse_target(spec: str) -> Target:
    """A :class:`Target` from ``spec``; ValueError (one line, with examples) when it names nothing known."""
    s = spec.strip().lower()
    m = _TPU_RE.fullmatch(s)
    if m:
        chip, topo = m.groups()
        dev = DEVICES.get(chip)
        if dev is None or dev.platform != "tpu":
            raise ValueError(f"--compile-only {spec!r}: unknown TPU {chip!r}; known: "
                             f"{', '.join(k for k, d in DEVICES.items() if d.platform == 'tpu')} (e.g. {EXAMPLES})")
        n = 1
        for d in topo.split("x"):
            n *= int(d)
        return Target(spec, dev, topo, n, None)
    m = _GPU_RE.fullmatch(s)
    if m:
        chip, *dims = m.groups()
        dev = DEVICES.get(chip)
        if dev is None or dev.platform != "gpu":
            raise ValueError(f"--compile-only {spec!r}: unknown GPU {chip!r}; known: "
                             f"{', '.join(k for k, d in DEVICES.items() if d.platform == 'gpu')} (e.g. {EXAMPLES})")
        slices, hosts, per_host = (int(d) for d in dims) if dims[0] else (1, 1, 1)
        if min(slices, hosts, per_host) < 1:
            raise ValueError(f"--compile-only {spec!r}: every dimension of the topology must be at least 1")
        return Target(spec, dev, f"{slices}x{hosts}x{per_host}", slices * hosts * per_host, slices * hosts)
    raise ValueError(f"--compile-only {spec!r} is not a target: use tpu:CHIP:TOPOLOGY or gpu:CHIP[:SLICESxHOSTSxGPUS], "
                     f"e.g. {EXAMPLES}")
