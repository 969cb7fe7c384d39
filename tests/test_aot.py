"""``train.py --compile-only TARGET`` (adaresnet_jax/aot.py): the run's steps compiled for TPU slices this machine
does not have, through ``train.main`` as a user runs it, and the persistent compilation cache.

The TPU compiler is libtpu (``jax[tpu]``, in the test extra); the GPU one (``jax[cuda12]``, 4.4 GB) is opt-in:
``ADARESNET_GPU_AOT=1``. Tiny network, small images: each compile takes seconds to a minute on 2 busy cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adaresnet_jax import aot, targets
from adaresnet_jax import train as T
from adaresnet_jax.config import parse_config

REPO = Path(__file__).resolve().parents[1]
needs_tpu_compiler = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                        reason="libtpu is not installed: pip install -e '.[test]' brings it")
TINY = ["--model", "tiny", "--width", "4", "--quiet"]


def _report(workdir: Path) -> dict:
    return json.loads((workdir / "compile_report.json").read_text())


def _check_program(p: dict, n_dev: int, batch: int) -> None:
    """What every compiled program's entry holds: memory, cost, collectives, and no CPU algorithm."""
    m = p["memory"]
    assert m["peak"] == m["argument"] + m["output"] - m["alias"] + m["temp"] > 0
    assert p["flops_per_step"] == pytest.approx(p["flops_per_device"] * n_dev)
    assert p["flops_per_image"] == pytest.approx(p["flops_per_step"] / batch)
    assert p["bytes_accessed_per_device"] > 0
    # the data-parallel program reduces over the devices: BatchNorm statistics, gradients, metrics
    assert p["collectives"]["all-reduce"]["count"] > 0 and p["collectives"]["all-reduce"]["result_bytes"] > 0
    # XLA's own convolutions, none of the CPU algorithms of adaresnet_jax.conv (custom_vjp, optimization barriers)
    assert p["convolutions"] > 0
    assert p["cpu_algorithms"] == []
    assert p["compile_s"] > 0


@needs_tpu_compiler
def test_compile_only_single_host_tpu_fits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A resident CIFAR-10 run on a v5e 2x2 slice (4 chips, one host): fits, and the report says what it costs."""
    code = T.main([*TINY, "--dataset", "cifar10", "--max-train", "256", "--max-test", "64", "--eval-batch-size", "64",
                   "--batch-size", "16", "--compile-only", "tpu:v5e:2x2", "--workdir", str(tmp_path)])
    assert code == 0
    r = _report(tmp_path)
    out = capsys.readouterr().out
    assert r["verdict"] in out and r["verdict"].startswith("fits (") and r["fits"]
    assert "a bound, not a measurement" in out
    assert r["target"]["devices"] == 4 and r["target"]["hosts"] == 1 and r["target"]["device_kind"] == "TPU v5 lite"
    assert r["run"]["input"] == "resident" and r["run"]["image_shape"] == [32, 32, 3] and r["run"]["per_device_batch"] == 4
    assert r["run"]["conv_impl"] == "xla"
    train, ev = r["programs"]["train"], r["programs"]["eval"]
    _check_program(train, 4, 16)
    _check_program(ev, 4, 64)
    # the resident training set (256 images, uint8, replicated) is an argument of the train step on every device
    assert train["memory"]["argument"] >= 256 * 32 * 32 * 3
    assert train["memory"]["alias"] > 0  # the donated state
    # the cost analysis counts the network the analytic count counts (plus BatchNorm, loss, optimizer: a bit more)
    assert 1.0 <= r["analytic"]["hlo_over_analytic_train"] < 3.0
    rf = r["roofline"]
    assert rf["step_time_lower_bound_s"] == max(rf["compute_s"], rf["memory_s"]) > 0
    assert rf["images_per_s_upper_bound"] == pytest.approx(16 / rf["step_time_lower_bound_s"])
    assert rf["peak_flops_per_s"] == targets.DEVICES["v5e"].peak_flops["float32"]


@needs_tpu_compiler
def test_compile_only_multi_host_tpu_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A streamed run on a v5e 4x4 slice (16 chips over 4 hosts) at a global batch far past 16 GiB per chip
    (16384 images of 128 px per chip): the TPU compiler refuses the train step, the verdict says "does not fit"
    with the memory the compiler asked for, exit code 4; the eval step (batch 64) still fits."""
    code = T.main([*TINY, "--dataset", "imagenet2012", "--image-size", "128", "--batch-size", "262144",
                   "--eval-batch-size", "64", "--compile-only", "tpu:v5e:4x4", "--workdir", str(tmp_path)])
    assert code == aot.EXIT_DOES_NOT_FIT == 4
    r = _report(tmp_path)
    assert r["target"]["devices"] == 16 and r["target"]["hosts"] == 4
    assert r["run"]["input"] == "streaming" and r["run"]["num_classes"] == 1000 and r["run"]["per_device_batch"] == 16384
    assert not r["fits"] and r["verdict"].startswith("does not fit: needs at least ")
    train = r["programs"]["train"]
    assert "RESOURCE_EXHAUSTED" in train["compile_error"]
    assert r["needed_bytes_per_device"] == train["used_bytes"] > r["target"]["usable_memory_bytes"] == int(15.75 * 2**30)
    # 16384 images per chip: one 128x128x4 float32 feature map of the tiny network is 4 GiB, and a step keeps several
    assert train["used_bytes"] > 2 * 2**30
    assert r["verdict"] in capsys.readouterr().out
    _check_program(r["programs"]["eval"], 16, 64)


def test_targets_parse_and_configs() -> None:
    """TARGET strings, one-line errors for unknown ones, and the derived GPU target configs."""
    t = targets.parse_target("tpu:v5e:16x16")
    assert (t.device.key, t.topology, t.num_devices) == ("v5e", "16x16", 256)
    t = targets.parse_target("gpu:h100:2x1x8")
    assert (t.num_devices, t.num_hosts, t.topology) == (16, 2, "2x1x8")
    assert targets.parse_target("gpu:a100-80gb").topology == "1x1x1"
    for bad in ("tpu:v9:2x2", "gpu:h100:8", "h100", "gpu:rtx4090"):
        with pytest.raises(ValueError, match="compile-only"):
            targets.parse_target(bad)
    a100 = targets.gpu_target_config("a100-80gb")
    assert "core_count: 108" in a100 and "major: 8" in a100 and "major: 9\n  }\n  registers" not in a100
    assert "memory_bandwidth: 4800000000000" in targets.gpu_target_config("h200")
    assert targets.gpu_target_config("h100") == targets.H100_CONFIG
    for d in targets.DEVICES.values():
        assert d.sources["all"].startswith("https://") and d.peak_flops["bfloat16"] >= d.peak_flops["float32"]


def test_compile_only_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Bad targets and unknown data shapes: one line, exit code 2, nothing compiled."""
    assert T.main([*TINY, "--compile-only", "tpu:v5e", "--workdir", str(tmp_path)]) == 2
    assert "is not a target" in capsys.readouterr().err
    assert T.main([*TINY, "--dataset", "my_set", "--compile-only", "tpu:v5e:2x2", "--workdir", str(tmp_path)]) == 2
    assert "pass --data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config([*TINY, "--find-max-batch"])


@pytest.mark.skipif(os.environ.get("ADARESNET_GPU_AOT") != "1",
                    reason="opt-in: set ADARESNET_GPU_AOT=1 with jax[cuda12] installed (4.4 GB)")
def test_compile_only_gpu(tmp_path: Path) -> None:
    """One host of 8 H100s (and one A100 for the derived config): cuDNN convolutions, all-reduces, a verdict."""
    for spec, n in (("gpu:h100:1x1x8", 8), ("gpu:a100-80gb", 1)):
        out = subprocess.run([sys.executable, "train.py", *TINY, "--dataset", "cifar10", "--max-train", "256",
                              "--max-test", "64", "--eval-batch-size", "64", "--batch-size", "64", "--compile-only", spec,
                              "--workdir", str(tmp_path / spec)], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        r = _report(tmp_path / spec)
        assert r["fits"] and r["target"]["devices"] == n
        train = r["programs"]["train"]
        assert train["cost_source"].startswith("lowered module") and train["flops_per_image"] > 0
        assert any(c.startswith("__cudnn$conv") for c in train["custom_calls"])
        assert train["cpu_algorithms"] == []
        if n > 1:
            assert train["collectives"]["all-reduce"]["count"] > 0


def test_compilation_cache_reused_by_a_second_process(tmp_path: Path) -> None:
    """--compilation-cache DIR: the first run fills DIR (misses, no hits), a second process with the same command
    loads its programs from there (summary.json counts the cache's hits)."""
    cache, env = tmp_path / "cache", {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "train.py", *TINY, "--dataset", "digits", "--max-train", "64", "--max-test", "32",
           "--batch-size", "32", "--eval-batch-size", "32", "--epochs", "1", "--compilation-cache", str(cache)]
    stats = []
    for i in range(2):
        out = subprocess.run([*cmd, "--workdir", str(tmp_path / f"run{i}")], cwd=REPO, env=env, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        stats.append(json.loads((tmp_path / f"run{i}" / "summary.json").read_text())["compilation_cache"])
        if i == 0:
            entries = sorted(p.name for p in cache.iterdir())
    assert stats[0]["dir"] == str(cache) and stats[0]["hits"] == 0 and stats[0]["misses"] > 0
    assert stats[1]["hits"] >= stats[0]["misses"] - 1 and stats[1]["misses"] <= 1
    assert entries and set(entries) <= {p.name for p in cache.iterdir()}


def _search(need_of: Any, n_dev: int, start: int, n_train: int, avail: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    """aot.find_max_batch with the compiler replaced by ``need_of(batch)`` bytes per device."""
    def compile_once(cfg: Any, target: Any, devices: Any, shapes: Any, batch: int, with_eval: bool = True) -> tuple:
        return {"train": {"memory": {"peak": need_of(batch)}}}, need_of(batch), None

    monkeypatch.setattr(aot, "compile_once", compile_once)
    monkeypatch.setattr(aot, "usable_memory", lambda target: avail)
    shapes = aot.DataShapes((32, 32, 3), 10, n_train, 0, 0, False, "known sizes")
    return aot.find_max_batch(None, targets.parse_target("tpu:v5e:2x2"), list(range(n_dev)), shapes, lambda msg: None,
                              start)  # type: ignore[arg-type]


def _check_search(r: dict, n_dev: int, avail: int) -> None:
    """The search's contract, from its own tries: max_batch was compiled and fits, first_that_does_not_fit was
    compiled and does not, and they are within the stated resolution."""
    tries = {t["batch"]: t for t in r["tries"]}
    assert len(tries) == len(r["tries"])  # no batch compiled twice
    assert all(b % n_dev == 0 for b in tries)
    lo, hi = r["max_batch"], r["first_that_does_not_fit"]
    if lo is not None:
        assert tries[lo]["fits"] and tries[lo]["needed_bytes"] <= avail
    if hi is not None:
        assert not tries[hi]["fits"]
    if lo is not None and hi is not None:
        assert 0 < hi - lo == r["resolution"]["gap"] <= aot.max_batch_resolution(lo, n_dev) == r["resolution"]["bound"]
        assert aot.max_batch_resolution(lo, n_dev) == max(n_dev, lo // 32 // n_dev * n_dev)


@pytest.mark.parametrize("n_dev,start,n_train,per_image,curve", [
    (4, 128, 50000, 2e6, 0.0),  # linear: start, double, the line's prediction, one try to close
    (256, 1024, 1281167, 5e7, 0.0),  # a pod
    (1, 32, 45000, 3e5, 0.4),  # convex (the line overshoots; regula falsi and bisection catch up)
    (8, 65536, 1281167, 2e7, -0.2),  # concave, and the start does not fit (the search halves first)
    (4, 32, 2000, 1e5, 0.0),  # the whole training set fits
    (4, 64, 50000, 2e11, 0.0),  # not even one image per device fits
])
def test_find_max_batch_search(monkeypatch: pytest.MonkeyPatch, n_dev: int, start: int, n_train: int, per_image: float,
                               curve: float) -> None:
    """The search against memory curves whose largest fitting batch is known exactly (brute force over every
    multiple of the device count): its answer is that batch or within the resolution below it, in few compiles."""
    avail = 16 * 2**30

    def need_of(b: int) -> int:
        x = per_image * b / n_dev
        return int(2**30 + x * (1 + curve * min(x / avail, 2)))

    r = _search(need_of, n_dev, start, n_train, avail, monkeypatch)
    _check_search(r, n_dev, avail)
    cap = n_train // n_dev * n_dev
    fitting = [b for b in range(n_dev, cap + 1, n_dev) if need_of(b) <= avail]
    truth = fitting[-1] if fitting else None
    if truth is None:
        assert r["max_batch"] is None and r["first_that_does_not_fit"] == n_dev
    elif truth == cap:
        assert r["max_batch"] == cap and r["capped_by_training_set"] and r["first_that_does_not_fit"] is None
    else:
        assert truth - aot.max_batch_resolution(truth, n_dev) <= r["max_batch"] <= truth < r["first_that_does_not_fit"]
    assert r["compiles"] <= (5 if curve == 0 else 8)


@needs_tpu_compiler
def test_find_max_batch_tiny_tpu(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--find-max-batch`` through train.main for a tiny network on a v5e 2x2 slice, with the usable memory set
    just below what the train step needs at the whole training set (compiled once here first, so the limit
    falls inside the searched range whatever the compiler's figures): the report's largest batch was compiled
    and fits, the first that does not fit was compiled and does not, within the stated resolution, and the
    search took few compiles (the run's own compile of its batch is reused)."""
    flags = [*TINY, "--dataset", "digits", "--eval-batch-size", "64", "--compile-only", "tpu:v5e:2x2"]
    cfg = parse_config([*flags, "--batch-size", "256"])
    target = targets.parse_target("tpu:v5e:2x2")
    aot.prepare_host(target)
    devices, shapes = aot.target_devices(target), aot.data_shapes(cfg)
    cap = shapes.n_train // 4 * 4
    _, need_cap, _ = aot.compile_once(cfg, target, devices, shapes, cap, with_eval=False)
    assert need_cap is not None
    limit = need_cap - 1
    monkeypatch.setattr(aot, "usable_memory", lambda target: limit)
    code = T.main([*flags, "--batch-size", "256", "--find-max-batch", "--workdir", str(tmp_path)])
    r = _report(tmp_path)
    assert code == (0 if r["fits"] else aot.EXIT_DOES_NOT_FIT)
    mb = r["max_batch"]
    _check_search(mb, 4, limit)
    assert mb["usable_bytes"] == limit and not mb["capped_by_training_set"]
    assert mb["tries"][0] == {"batch": 256, "needed_bytes": mb["tries"][0]["needed_bytes"], "fits": mb["tries"][0]["fits"],
                              "how": "given"}
    assert mb["compiles"] == len(mb["tries"]) - 1 <= 8
    if cap in {t["batch"] for t in mb["tries"]}:
        assert not next(t for t in mb["tries"] if t["batch"] == cap)["fits"]
    assert f"largest batch that fits: {mb['max_batch']}" in capsys.readouterr().out
