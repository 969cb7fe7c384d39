"""The benchmark scripts in their smallest configuration: outputs complete and well-formed.

Speed is never asserted here; benchmarks/README.md has the measured numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import conv_profile  # noqa: E402
import convergence  # noqa: E402
import stats  # noqa: E402
import step_profile  # noqa: E402
import throughput  # noqa: E402
import vs_pytorch  # noqa: E402

import adaresnet_jax as ar  # noqa: E402


def test_model_flops_are_counted_the_usual_way():
    # 2 x multiply-adds of every conv and dense layer, padding positions included.
    assert throughput.model_flops(ar.create_model("paper", num_classes=10), (32, 32, 3)) == 34_842_624
    r18 = throughput.model_flops(ar.create_model("resnet18_cifar", num_classes=10), (32, 32, 3))
    assert abs(r18 / 1.11e9 - 1) < 0.01
    # torchvision's ResNet-50 at 224x224: 4.09 G multiply-adds (1000 classes).
    r50 = throughput.model_flops(ar.create_model("resnet50", num_classes=1000), (224, 224, 3))
    assert abs(r50 / 2 / 4.09e9 - 1) < 0.01


def test_throughput_smallest_run(tmp_path, capsys):
    """The report's summaries, ratios and MFU recomputed from its raw timings with numpy; the table printed
    once (one row per contender)."""
    out = tmp_path / "tp.json"
    report = throughput.main(["--models", "tiny", "--skips", "identity,learned", "--conv-impl", "xla,hybrid",
                              "--batch-sizes", "8", "--rounds", "2", "--steps", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    by_key = {(r["skip"], r["conv_impl"]): r for r in saved["results"]}
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert saved["backend"] == "cpu" and saved["peak_flops_per_s"] > 0 and "jax" in saved["versions"]
    assert {(r["skip"], r["conv_impl"]) for r in saved["results"]} == {
        (s, c) for s in ("identity", "learned") for c in ("xla", "hybrid")}
    for r in saved["results"]:
        assert len(r["train_images_per_s"]) == 2 and len(r["eval_images_per_s"]) == 2
        assert all(v > 0 for v in r["train_images_per_s"] + r["eval_images_per_s"])
        for kind in ("train", "eval"):
            raw = r[f"{kind}_images_per_s"]
            assert r[kind]["median"] == pytest.approx(np.median(raw)) and r[kind]["min"] == min(raw)
            ref = by_key[("identity", r["conv_impl"])][f"{kind}_images_per_s"]
            want = np.median(np.asarray(raw) / np.asarray(ref))
            assert r[f"{kind}_ratio_vs_identity"]["median"] == pytest.approx(want)
        assert r["train_mfu"] == pytest.approx(3 * r["model_flops_per_image"] * r["train"]["median"]
                                               / saved["peak_flops_per_s"])
    table = capsys.readouterr().out
    assert table.count("| tiny |") == 4 and table.count("train / identity") == 1, table


def test_throughput_writes_no_file_unless_asked(tmp_path, monkeypatch, capsys):
    """Without --out nothing is written (no untracked JSON under benchmarks/results/); the line says so."""
    results = Path(throughput.__file__).parent / "results"
    before = sorted(results.iterdir())
    monkeypatch.chdir(tmp_path)
    throughput.main(["--models", "tiny", "--skips", "identity", "--conv-impl", "xla", "--batch-sizes", "8",
                     "--rounds", "1", "--steps", "1", "--no-peak"])
    assert sorted(results.iterdir()) == before and list(tmp_path.iterdir()) == []
    out = capsys.readouterr().out
    assert "raw timings: not kept (pass --out FILE)" in out and out.count("| tiny |") == 1


def test_convergence_with_sparse_evaluation(tmp_path):
    """Runs that evaluate every few epochs (--eval-every-steps) have rows without test accuracy: the report's
    time-to-target and last-k use only evaluated epochs, and the plots are drawn."""
    out = tmp_path / "sparse"
    args = ["--preset", "quick", "--seeds", "1", "--out", str(out), "--targets", "0.0", "--skips", "identity,learned",
            "--model", "tiny", "--epochs", "3", "--max-train", "128", "--max-test", "64", "--batch-size", "32",
            "--val-split", "0", "--eval-every-steps", "8"]
    result = convergence.main(args)
    rows = convergence.read_jsonl(out / "learned-seed0" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[0]["test_acc"] is None
    assert [r["epoch"] for r in convergence.evaluated(rows)] == [2, 3]
    rule = result["rules"]["learned"]
    assert rule["reach"][0]["epochs"] == [2]  # target 0: the first evaluated epoch, not epoch 1
    assert rule["last_k"] == [pytest.approx((rows[1]["test_acc"] + rows[2]["test_acc"]) / 2)]
    assert (out / "accuracy.png").stat().st_size > 0


def test_throughput_rejects_bad_flags():
    with pytest.raises(SystemExit) as e:
        throughput.main(["--models", "resnet9000"])
    assert e.value.code == 2


def test_convergence_smallest_sweep_and_resume(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--preset", "quick", "--seeds", "2", "--out", str(out), "--targets", "0.2,0.99",
            "--model", "tiny", "--epochs", "1", "--max-train", "128", "--max-test", "64", "--batch-size", "32"]
    result = convergence.main(args)
    for skip in ("identity", "learned"):
        rule = result["rules"][skip]
        assert len(rule["test_acc"]) == 2 and all(0 <= a <= 1 for a in rule["test_acc"])
        assert rule["images_per_sec"] > 0 and [t["target"] for t in rule["reach"]] == [0.2, 0.99]
        for seed in range(2):
            assert (out / f"{skip}-seed{seed}" / "summary.json").exists()
    assert result["rules"]["identity"]["skip_weights"] == {}
    assert set(result["rules"]["learned"]["skip_weights"]) == {"stage1/block1", "stage2/block1"}
    w = result["rules"]["learned"]["vs_base"]
    a, b = result["rules"]["identity"]["test_acc"], result["rules"]["learned"]["test_acc"]
    _assert_welch_matches_scipy(a, b, w)
    for name in ("convergence.json", "convergence.md", "accuracy.png", "skip_weights.png"):
        assert (out / name).stat().st_size > 0
    assert "| learned |" in (out / "convergence.md").read_text()
    # A finished sweep is not trained again: rerunning only rebuilds the report.
    mtimes = {p: p.stat().st_mtime for p in out.glob("*/summary.json")}
    again = convergence.main(args)
    assert {p: p.stat().st_mtime for p in out.glob("*/summary.json")} == mtimes
    assert again["rules"]["learned"]["test_acc"] == result["rules"]["learned"]["test_acc"]
    # --replot only reads: the same report and plots, and an error (no training) for a run that is missing.
    (out / "accuracy.png").unlink()
    redrawn = convergence.main(args + ["--replot"])
    assert redrawn["rules"]["learned"]["test_acc"] == result["rules"]["learned"]["test_acc"]
    assert (out / "accuracy.png").stat().st_size > 0 and redrawn["command"] == result["command"]
    with pytest.raises(SystemExit, match="no finished run"):
        convergence.main([*args[:3], "3", *args[4:], "--replot"])
    assert not (out / "identity-seed2").exists()
    # Runs of one commit and convolution pair; the report says so.
    assert result["rules"]["learned"]["pairable"] and result["rules"]["learned"]["pairing_note"] in ("", "dirty tree")
    # A report of identity skips alone (the seed's ResNet-50 baseline) has no skip-weight table.
    assert "skip weights" in result["table"]
    alone = convergence.main(args + ["--skips", "identity"])
    assert "skip weights" not in alone["table"] and "| identity |" in alone["table"]
    assert alone["rules"]["identity"]["test_acc"] == result["rules"]["identity"]["test_acc"]


def _assert_welch_matches_scipy(a, b, w):
    """stats.welch(a, b) against scipy's Welch test of b - a: difference, interval and p (NaN where scipy's is)."""
    from scipy import stats as sp

    assert w["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    if np.std(a) == 0 and np.std(b) == 0:
        assert math.isnan(w["p"])
        return
    ref = sp.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert (w["lo"], w["hi"], w["p"]) == pytest.approx((ci.low, ci.high, ref.pvalue), rel=1e-9, abs=1e-12)


def test_welch_and_paired_intervals_match_scipy():
    from scipy import stats as sp

    a, b = [0.80, 0.82, 0.81, 0.79], [0.84, 0.83, 0.86, 0.85]
    _assert_welch_matches_scipy(a, b, stats.welch(a, b))
    _assert_welch_matches_scipy([0.5, 0.7, 0.6], [0.9, 0.4], stats.welch([0.5, 0.7, 0.6], [0.9, 0.4]))
    d = stats.paired(a, b)
    ref = sp.ttest_rel(b, a)
    ci = ref.confidence_interval(0.95)
    assert (d["diff"], d["lo"], d["hi"], d["p"]) == pytest.approx((0.04, ci.low, ci.high, ref.pvalue), rel=1e-9)
    assert d["wilcoxon_p"] == pytest.approx(sp.wilcoxon([y - x for x, y in zip(a, b)]).pvalue)
    assert (d["positive"], d["negative"], d["n"]) == (4, 0, 4)
    # The pairing matters: seeds that move together give a much narrower paired interval.
    a2, b2 = [0.70, 0.80, 0.90], [0.71, 0.81, 0.92]
    assert stats.paired(a2, b2)["hi"] - stats.paired(a2, b2)["lo"] < (stats.welch(a2, b2)["hi"] - stats.welch(a2, b2)["lo"]) / 5


@pytest.mark.parametrize("n_test", [359, 360, 10_000])
def test_wilcoxon_sees_tied_and_zero_differences_as_scipy_does_on_counts(n_test):
    """Accuracies are image counts over the test-set size: equal count differences must tie, and a zero
    difference must be dropped, as scipy does on the integer counts themselves (the independent
    reference). Float differences of equal counts disagree in the last bits and used to rank apart."""
    from scipy import stats as sp

    # digits-10seeds, identity and learned-w1: correct test images of 359 per seed (ties at 1, 2, 3 and a 0)
    base = [352, 349, 350, 346, 350, 349, 353, 354, 354, 349]
    other = [352, 350, 352, 348, 349, 350, 350, 353, 353, 352]
    diff = [y - x for x, y in zip(base, other)]
    a, b = [c / n_test for c in base], [c / n_test for c in other]
    if n_test == 359:  # the trap is real here: scipy on the raw float differences gives 0.449, not 0.574
        assert sp.wilcoxon([y - x for x, y in zip(a, b)]).pvalue != pytest.approx(sp.wilcoxon(diff).pvalue)
    d = stats.paired(a, b)
    ref = sp.wilcoxon(diff)  # zero_method="wilcox", tie-corrected: the count differences are exact
    assert d["wilcoxon_p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert (d["positive"], d["negative"]) == (5, 4)
    # More ties, and two zeros: still what scipy gives on the counts.
    diff2 = [-11, 0, -3, -6, -2, -9, -18, -12, 0, 2, -3, -3]
    base2 = [300 + 7 * i for i in range(12)]
    p2 = stats.paired([c / n_test for c in base2], [(c + k) / n_test for c, k in zip(base2, diff2)])["wilcoxon_p"]
    assert p2 == pytest.approx(sp.wilcoxon(diff2).pvalue, rel=1e-12)
    # All differences zero: no test (NaN), not p = 1.
    assert math.isnan(stats.paired(a, a)["wilcoxon_p"])


def test_zero_standard_error_gives_nan_not_zero():
    assert math.isnan(stats.welch([0.5, 0.5], [0.6, 0.6])["p"])
    same_diff = stats.paired([0.5, 0.25, 0.75], [0.75, 0.5, 1.0])  # every difference exactly +0.25: se 0
    assert math.isnan(same_diff["p"]) and same_diff["diff"] == 0.25 and same_diff["positive"] == 3
    assert math.isnan(stats.paired([0.5], [0.6])["p"])
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired([0.5, 0.6], [0.6])


def test_holm_adjustment():
    # Holm (1979): sorted p times (m - rank), made monotone, capped at 1; NaN is not a test.
    assert stats.holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.last_k_mean([0.1, 0.2, 0.3, 0.4], 3) == pytest.approx(0.3)


def test_convergence_variants_and_paired_report(tmp_path):
    """Variants with their own flags (learned from w0 = 1): the paired analysis and last-k columns, the
    initial skip weights at epoch 0 of the trajectories, and a colour that is the variant's own."""
    out = tmp_path / "sweep"
    args = ["--preset", "quick", "--seeds", "2", "--out", str(out), "--last-k", "2", "--model", "tiny",
            "--epochs", "2", "--max-train", "128", "--max-test", "64", "--batch-size", "32",
            "--variants", "identity=--skip identity;learned-w1=--skip learned --skip-init 1"]
    result = convergence.main(args)
    r = result["rules"]["learned-w1"]
    assert r["vs_base_paired"]["n"] == 2 and len(r["last_k"]) == 2
    assert r["last_k_vs_base_paired"]["diff"] == pytest.approx(
        sum(r["last_k"]) / 2 - sum(result["rules"]["identity"]["last_k"]) / 2)
    summary = json.loads((out / "learned-w1-seed0" / "summary.json").read_text())
    assert summary["skip_weights_init"] == {"stage1/block1": 1.0, "stage2/block1": 1.0}
    assert summary["config"]["skip_init"] == 1.0
    assert "paired" in result["table"] and "last 2 epochs" in result["table"] and "| learned-w1 |" in result["table"]
    assert convergence.color("identity", ["identity", "x"]) == "#000000" != convergence.color("x", ["identity", "x"])
    assert len(set(convergence.COLORS.values())) == len(convergence.COLORS)  # every named variant its own colour


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_in_smoke_mode(tmp_path):
    # benchmarks/gpu.sh has to work the first time it meets a GPU: SMOKE=1 runs every step of it
    # (both throughput runs, the convergence run on a CIFAR-10-shaped npz, the summary) on CPU.
    rng = np.random.default_rng(0)
    data = tmp_path / "cifar.npz"
    np.savez(data, x_train=rng.integers(0, 256, (64, 32, 32, 3), np.uint8), y_train=rng.integers(0, 10, 64),
             x_test=rng.integers(0, 256, (64, 32, 32, 3), np.uint8), y_test=rng.integers(0, 10, 64))
    out = tmp_path / "gpu"
    env = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "CIFAR10_NPZ": str(data)}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
    proc = subprocess.run(["bash", str(script), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.split("===== summary =====")[1]
    assert summary.count("| tiny |") == 2 + 6  # bf16: 2 skips; f32: 2 skips x 3 conv impls
    assert "| learned |" in summary  # the convergence table
    for name in ("throughput-bf16.json", "throughput-f32.json", "convergence/convergence.json"):
        assert json.loads((out / name).read_text())
    rows = json.loads((out / "throughput-bf16.json").read_text())["results"]
    assert {r["dtype"] for r in rows} == {"bfloat16"} and {r["skip"] for r in rows} == {"identity", "learned"}


@pytest.mark.slow
def test_gpu_science_script_runs_end_to_end_with_tiny_models(tmp_path):
    """results/gpu_science.sh (the GPU part of RESULTS.md) with EXTRA making every run tiny, on CPU: every
    section runs and writes its sweep table, so a GPU lease is not spent finding a typo."""
    rng = np.random.default_rng(0)
    data = tmp_path / "cifar.npz"
    np.savez(data, x_train=rng.integers(0, 256, (64, 32, 32, 3), np.uint8), y_train=rng.integers(0, 10, 64),
             x_test=rng.integers(0, 256, (32, 32, 32, 3), np.uint8), y_test=rng.integers(0, 10, 32))
    out = tmp_path / "science"
    env = {**os.environ, "PYTHON": sys.executable, "CIFAR10_NPZ": str(data), "OUT": str(out), "SEEDS": "1",
           "EXTRA": "--model tiny --epochs 1 --max-train 48 --max-test 32 --batch-size 16 --val-split 0.25"}
    script = Path(__file__).resolve().parents[1] / "results" / "gpu_science.sh"
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = sorted(p.parent.name for p in out.glob("*/convergence.json"))
    assert sweeps == ["depth-full-resnet110", "depth-full-resnet20", "depth-full-resnet56", "paper-full",
                      "paper-full-resnet50keras"]
    depth = json.loads((out / "depth-full-resnet56" / "convergence.json").read_text())
    assert set(depth["rules"]) == {"identity", "learned", "learned-w1", "rezero"}
    assert depth["config"]["dtype"] == "bfloat16" and depth["config"]["preset"] == "cifar"


TORCH_PYTHON = os.environ.get("TORCH_PYTHON")  # an interpreter with torch (benchmarks/README.md); else skipped


def _vs_pytorch_smallest(tmp_path, *extra):
    out = tmp_path / "vs.json"
    report = vs_pytorch.main(["--models", "resnet20", "--batch", "8", "--rounds", "2", "--steps", "1",
                              "--out", str(out), *extra])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"]))
    (res,) = report["results"]
    assert "error" not in res, res
    assert res["params"] == vs_pytorch.EXPECTED_PARAMS["resnet20"] + 9 and res["skip_weights"] == 9
    return res


@pytest.mark.slow
def test_vs_pytorch_measures_the_jax_step_alone(tmp_path, capsys):
    """Without --torch-python: the JAX contenders only, each in its own process, rounds interleaved."""
    res = _vs_pytorch_smallest(tmp_path, "--conv-impl", "auto,xla")
    assert set(res["contenders"]) == {"jax:auto", "jax:xla"}
    for row in res["contenders"].values():
        assert len(row["images_per_s"]) == 2 and all(v > 0 for v in row["images_per_s"])
        assert row["peak_flops_per_s"] > 0 and row["mfu"] > 0 and row["info"]["compile_s"] > 0
    assert res["contenders"]["jax:auto"]["ratio_vs_jax:xla"]["median"] > 0
    out = capsys.readouterr().out
    assert "PyTorch not measured" in out and "| resnet20 | jax:xla |" in out


@pytest.mark.slow
@pytest.mark.skipif(not TORCH_PYTHON, reason="set TORCH_PYTHON to an interpreter with torch")
def test_vs_pytorch_against_torch(tmp_path):
    """The PyTorch network has the JAX one's parameter count and, with the JAX parameters, its train-mode logits."""
    res = _vs_pytorch_smallest(tmp_path, "--torch-python", TORCH_PYTHON, "--torch-modes", "eager")
    assert set(res["contenders"]) == {"jax:auto", "torch:eager"} and res["logits_max_rel_diff"] < 1e-3
    assert res["contenders"]["jax:auto"]["ratio_vs_torch:eager"]["median"] > 0


@pytest.mark.skipif(not TORCH_PYTHON, reason="set TORCH_PYTHON to an interpreter with torch")
def test_torch_networks_have_the_projects_parameter_counts():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import torch_resnets as t; "
            "print({n: t.num_params(t.create(n, 'identity')) for n in ('paper', 'resnet18', 'resnet18_cifar', "
            "'resnet56', 'resnet20')})")
    out = subprocess.run([TORCH_PYTHON, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert eval(out) == vs_pytorch.EXPECTED_PARAMS  # noqa: S307 - a dict literal printed by the line above


@pytest.mark.slow
def test_conv_profile_times_every_pass_of_every_layer(capsys):
    """Every distinct convolution of the network, each pass by every algorithm that applies; tuned's plan is
    one of them, and the per-pass best is never slower than any fixed choice."""
    report = conv_profile.main(["--model", "tiny", "--batch", "4", "--rounds", "1", "--clock", "cpu"])
    assert len(report["rows"]) >= 3
    for row in report["rows"]:
        for part, algs in row["ms"].items():
            assert row["plan"][part] in algs and "xla" in algs
    t = report["totals_ms"]
    assert set(t) == {"xla", "hybrid", "tuned", "best"}
    for part in conv_profile.PARTS:  # the totals recomputed from the rows' own timings
        rows = report["rows"]
        assert t["xla"][part] == pytest.approx(sum(r["count"] * r["ms"][part]["xla"] for r in rows))
        assert t["tuned"][part] == pytest.approx(sum(r["count"] * r["ms"][part][r["plan"][part]] for r in rows))
        assert t["best"][part] == pytest.approx(sum(r["count"] * min(r["ms"][part].values()) for r in rows))
    assert "network total" in capsys.readouterr().out


@pytest.mark.parametrize("op,want", [
    ("jit(f)/jvp(ResNet)/stage1_block1/Conv_0/conv_general_dilated", "conv forward"),
    ("jit(f)/jvp(ResNet)/stem_conv/conv_general_dilated", "conv forward"),
    ("jit(f)/transpose(jvp(ResNet))/stage1_block1/Conv_1/kernel_grad/while/body/dot_general", "conv kernel gradient"),
    ("jit(f)/transpose(jvp(ResNet))/stage1_block1/Conv_1/input_grad/conv_general_dilated", "conv input gradient"),
    ("jit(f)/transpose(jvp(ResNet))/stage1_block1/Conv_1/transpose(jvp())/conv_general_dilated",
     "conv backward (both)"),
    ("jit(f)/jvp(ResNet)/stage2_block3/BatchNorm_1/sub", "BatchNorm forward"),
    ("jit(f)/transpose(jvp(ResNet))/stem_bn/reduce_sum", "BatchNorm backward"),
    ("jit(f)/jvp(ResNet)/stage1_block1/stage1_block1.combine/jit(relu)/max", "ReLU, pooling, skip: forward"),
    ("jit(f)/transpose(jvp(ResNet))/stage1_block1/stage1_block1.combine/skip/reduce_sum",
     "ReLU, pooling, skip: backward"),
    ("jit(f)/optax/sgd/mul", "other"), ("", "other"),
])
def test_step_profile_groups_operations_by_part(op, want):
    assert step_profile.group(op) == want


def test_step_profile_smallest_run(tmp_path, capsys):
    """The trace of a tiny network's step: every group present, the tuned backward's halves told apart."""
    out = tmp_path / "p.json"
    r = step_profile.main(["--model", "tiny", "--batch", "8", "--steps", "1", "--conv-impl", "tuned",
                           "--out", str(out)])
    g = r["groups_ms"]
    assert set(g) == set(step_profile.GROUPS) and r["wall_ms_per_step"] > 0
    for part in ("conv forward", "conv input gradient", "conv kernel gradient", "BatchNorm forward", "other"):
        assert g[part] > 0, part
    # tuned names both halves of its backward pass: no convolution or matrix product is left unnamed (what
    # remains in "conv backward (both)" is the adds of gradient contributions)
    unnamed = [op for group, op, _ in r["ops_ms"] if group == "conv backward (both)"]
    assert not [op for op in unnamed if "conv_general_dilated" in op or "dot_general" in op], unnamed
    assert json.loads(out.read_text())["model"] == "tiny"
    assert "| conv kernel gradient |" in capsys.readouterr().out


@pytest.mark.skipif(not TORCH_PYTHON, reason="set TORCH_PYTHON to an interpreter with torch")
def test_torch_conv_layers_times_three_passes_in_both_layouts(tmp_path):
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "torch_conv_layers.py")
    out = tmp_path / "t.json"
    subprocess.run([TORCH_PYTHON, script, "--layers", "8x8x4->8/1,8x8x4->8/2", "--batch", "2", "--rounds", "1",
                    "--out", str(out)], check=True, capture_output=True, text=True)
    layers = json.loads(out.read_text())["layers"]
    assert set(layers) == {"8x8x4->8/1", "8x8x4->8/2"}
    assert all(len(v) == 6 and all(t[0] > 0 for t in v.values()) for v in layers.values())
    bad = subprocess.run([TORCH_PYTHON, script, "--layers", "8x8"], capture_output=True, text=True)
    assert bad.returncode != 0 and "write HxWxC->K/S" in bad.stderr
