"""results/summarize.py: runs of different commits or convolutions are never paired (synthetic run folders)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results"))

import budget_curve  # noqa: E402
import summarize  # noqa: E402

A = [0.50, 0.55, 0.60]
B = [0.52, 0.58, 0.61]


def _run(root: Path, sweep: str, variant: str, seed: int, acc: float, prov: dict | None) -> None:
    d = root / sweep / f"{variant}-seed{seed}"
    d.mkdir(parents=True)
    summary = {"test_acc": acc, "finished": True, "config": {}}
    if prov is not None:
        summary["provenance"] = prov
    (d / "summary.json").write_text(json.dumps(summary))
    rows = [{"epoch": e, "step": e, "test_acc": acc - 0.01 * (3 - e), "train_acc": acc + 0.1} for e in (1, 2, 3)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _sweep(root: Path, prov_a, prov_b) -> summarize.Comparison:
    for seed in range(3):
        _run(root, "s", "identity", seed, A[seed], prov_a(seed))
        _run(root, "s", "learned", seed, B[seed], prov_b(seed))
    return summarize.Comparison("s: learned vs identity", "s", "identity", "s", "learned")


def _prov(commit: str = "abc", conv: str = "tuned", dirty: bool = False):
    return lambda seed: {"commit": commit, "conv_impl": conv, "dirty": dirty}


def test_same_commit_and_convolution_pair_by_seed(tmp_path):
    from scipy import stats as sp

    r = summarize.compare(_sweep(tmp_path, _prov(), _prov()), tmp_path)
    assert r["paired"] and r["note"] == ""
    assert r["res"]["final"]["p"] == pytest.approx(sp.ttest_rel(B, A).pvalue)


@pytest.mark.parametrize("other, why", [(_prov(commit="def"), "commits abc / def"),
                                        (_prov(conv="hybrid"), "conv tuned / hybrid")])
def test_different_commit_or_convolution_is_compared_unpaired(tmp_path, other, why):
    from scipy import stats as sp

    r = summarize.compare(_sweep(tmp_path, _prov(), other), tmp_path)
    assert not r["paired"] and r["note"] == why
    assert r["res"]["final"]["p"] == pytest.approx(sp.ttest_ind(B, A, equal_var=False).pvalue)
    assert "wilcoxon_p" not in r["res"]["final"]


def test_one_mismatched_seed_is_enough_to_refuse(tmp_path):
    mixed = lambda seed: {"commit": "abc" if seed < 2 else "zzz", "conv_impl": "tuned", "dirty": False}  # noqa: E731
    r = summarize.compare(_sweep(tmp_path, _prov(), mixed), tmp_path)
    assert not r["paired"] and "abc / zzz" in r["note"]


def test_old_runs_use_the_sweep_provenance_file_and_unknown_is_unpaired(tmp_path):
    c = _sweep(tmp_path, lambda s: None, lambda s: None)
    assert not summarize.compare(c, tmp_path)["paired"]  # nothing known: never paired
    known = {f"{v}-seed{s}": {"commit": "r1", "conv_impl": "hybrid"} for v in ("identity", "learned") for s in range(3)}
    (tmp_path / "s" / "provenance.json").write_text(json.dumps({"runs": known}))
    assert summarize.compare(c, tmp_path)["paired"]
    known["learned-seed1"]["commit"] = "r2"
    (tmp_path / "s" / "provenance.json").write_text(json.dumps({"runs": known}))
    r = summarize.compare(c, tmp_path)
    assert not r["paired"] and r["note"] == "commits r1 / r2"


def test_dirty_tree_pairs_with_a_note(tmp_path):
    r = summarize.compare(_sweep(tmp_path, _prov(dirty=True), _prov()), tmp_path)
    assert r["paired"] and r["note"] == "dirty tree"


def test_sweeps_tested_every_few_epochs_have_no_last_k_column(tmp_path):
    """A run that skipped test evaluations (--eval-every-steps) has no last-3-epoch mean: its comparison prints
    '-' there and stays out of family L, while the primary endpoint is compared as usual."""
    c = _sweep(tmp_path, _prov(), _prov())
    for d in (tmp_path / "s").iterdir():
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        rows[0]["test_acc"] = None
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = summarize.compare(c, tmp_path)
    assert r["res"]["last_k"] is None and r["res"]["final"]["p"] == pytest.approx(
        summarize.compare(_sweep(tmp_path / "full", _prov(), _prov()), tmp_path / "full")["res"]["final"]["p"])
    holm = summarize.families([r])
    assert holm["L"][0] != holm["L"][0] and holm["P"][0] == pytest.approx(r["res"]["final"]["p"])


def test_committed_tables_are_the_script_output():
    """results/summary.md and budget_curve.md are exactly what summarize.py and budget_curve.py print."""
    committed = (Path(summarize.ROOT) / "summary.md").read_text()
    assert committed == summarize.table() + "\n"
    curve = (Path(summarize.ROOT) / "budget_curve.md").read_text()
    assert curve == budget_curve.table(budget_curve.curve()) + "\n"


def _budget(root: Path, prov_learned) -> None:
    """Three budgets of three seeds: identity at A, learned at B (its provenance from prov_learned), learned-w1 at A."""
    for sweep in budget_curve.EPOCHS.values():
        for seed in range(3):
            _run(root, sweep, "identity", seed, A[seed], _prov()(seed))
            _run(root, sweep, "learned", seed, B[seed], prov_learned(seed))
            _run(root, sweep, "learned-w1", seed, A[seed], _prov()(seed))


def test_budget_curve_pairs_each_budget_by_seed_and_draws_it(tmp_path):
    """results/budget_curve.py: per budget, each seed's final accuracy and the paired gap to identity (the same
    numbers summarize.py's paired rows give), a table row per budget, and the plot."""
    _budget(tmp_path, _prov())
    data = budget_curve.curve(tmp_path)
    assert list(data) == [10, 30, 100]
    gap = data[30]["gap"]["learned"]
    assert data[30]["acc"]["learned"] == pytest.approx([100 * b for b in B])
    assert gap["diff"] == pytest.approx(100 * (sum(B) - sum(A)) / 3) and gap["positive"] == 3
    row = summarize.compare(summarize.Comparison("", budget_curve.EPOCHS[30], "identity", budget_curve.EPOCHS[30],
                                                 "learned"), tmp_path)["res"]["final"]
    assert (gap["lo"], gap["hi"], gap["p"]) == pytest.approx((100 * row["lo"], 100 * row["hi"], row["p"]))
    assert data[100]["gap"]["learned-w1"]["diff"] == 0 and data[100]["gap"]["learned-w1"]["negative"] == 0
    assert budget_curve.table(data).count("\n| 30 (3) | 3 | 55.00") == 1  # steps: the identity run's last row
    budget_curve.plot(data, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_budget_curve_refuses_runs_of_another_commit_and_skips_unfinished_budgets(tmp_path):
    _budget(tmp_path, lambda seed: _prov(commit="other" if seed == 2 else "abc")(seed))
    with pytest.raises(SystemExit, match="cannot be paired.*commit"):
        budget_curve.curve(tmp_path)
    _budget(tmp_path / "ok", _prov())
    for seed in (1, 2):  # the 100-epoch learned-w1 has one finished seed: that budget is left out
        (tmp_path / "ok" / budget_curve.EPOCHS[100] / f"learned-w1-seed{seed}" / "summary.json").unlink()
    assert list(budget_curve.curve(tmp_path / "ok")) == [10, 30]


# sweeps whose runs trained in another sweep's folder (the same flags and commit, other variants) and were moved
RAN_IN = {"paper-full-normal": "paper-full", "lr-cifar-r20-5k": "controls-cifar-r20-5k"}


def test_run_all_commands_reproduce_the_committed_configs():
    """Every default section of results/run_all.sh, parsed as convergence.py and train.py parse it, gives each
    committed run's saved config (its 'auto' convolution read as what provenance.json says it resolved to)."""
    import dataclasses
    import os
    import shlex
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import convergence

    from adaresnet_jax.config import parse_config

    root = Path(summarize.ROOT)
    out = subprocess.run(["bash", str(root / "run_all.sh")], capture_output=True, text=True, check=True,
                         env={**os.environ, "DRY_RUN": "1", "PYTHON": "python"}).stdout
    commands = [shlex.split(line)[3:] for line in out.splitlines() if line.startswith("DRY_RUN")]
    checked, sweeps = 0, set()
    for argv in commands:
        a, rest = convergence.parse_args(argv)
        sweeps.add(a.out.name)
        sweep_file = root / a.out.name / "provenance.json"  # older sweeps; newer runs carry their own
        prov = json.loads(sweep_file.read_text())["runs"] if sweep_file.exists() else {}
        ran_in = RAN_IN.get(a.out.name, a.out.name)
        for variant, flags in a.variants.items():
            cfg = dataclasses.asdict(parse_config(["--preset", a.preset, *rest, *flags, "--quiet"]))
            for seed in range(a.seeds):
                run = f"{variant}-seed{seed}"
                summary = json.loads((root / a.out.name / run / "summary.json").read_text())
                saved = summary["config"]
                if saved["conv_impl"] == "auto":
                    saved["conv_impl"] = (prov.get(run) or summary["provenance"])["conv_impl"]
                assert saved.pop("seed") == seed and saved.pop("workdir").endswith(f"{ran_in}/{run}")
                diff = {k: (v, cfg.get(k)) for k, v in saved.items() if cfg.get(k, "absent") != v}
                assert not diff, f"{a.out.name}/{run}: committed vs run_all.sh {diff}"
                checked += 1
    # the default list is exactly the committed family: every committed sweep but the unreproducible round-1 one
    committed = {p.name for p in root.iterdir() if any(p.glob("*-seed*/summary.json"))}
    assert sweeps == committed - {"paper-5k-round1"} and checked == 222  # every committed run but round 1's 6


@pytest.mark.parametrize("optimizer, extra", [("sgd", ["--momentum", "0.9", "--nesterov", "--weight-decay", "5e-4"]),
                                              ("adam", ["--weight-decay", "1e-4"]), ("adamw", ["--weight-decay", "0.1"])])
def test_skip_lr_mult_zero_freezes_the_skip_weights_exactly(optimizer, extra):
    """The controls' frozen w (--skip-lr-mult 0): after optimiser steps with nonzero gradients the skip weights
    are bit-for-bit their initial values, while kernels move, under every optimiser the presets use."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from adaresnet_jax.config import parse_config
    from adaresnet_jax.optim import make_optimizer

    cfg = parse_config(["--optimizer", optimizer, "--lr", "0.1", "--skip-lr-mult", "0", "--epochs", "2",
                        "--warmup-epochs", "0", *extra])
    tx, _ = make_optimizer(cfg, steps_per_epoch=3)
    params = {"block": {"skip_weight": jnp.array([0.0, 1.0]), "conv": {"kernel": jnp.ones((3, 3))}}}
    state = tx.init(params)
    p = params
    for i in range(4):
        grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5 + i), p)
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(np.asarray(p["block"]["skip_weight"]), [0.0, 1.0])
    assert float(jnp.abs(p["block"]["conv"]["kernel"] - 1).min()) > 1e-3
