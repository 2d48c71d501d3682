"""``experiments/activation_study.py``: its parts, its table and its verdicts on a synthetic
results table, and a tiny end-to-end run on a local model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "activation_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("activation_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(strategy, mode, ppl, q=float("nan"), scope="", rule="", seed=0):
    return dict(
        strategy=strategy,
        seed=seed,
        mode=mode,
        activation_sparsity=q,
        scope=scope,
        rule=rule,
        perplexity=ppl,
    )


def _results() -> pd.DataFrame:
    rows = [_row("dense", "dense", 10.0, q=0.0)]
    rows += [_row(s, "zero", p) for s, p in (("wd-top", 50), ("random", 12), ("variance", 40))]
    rows += [_row("random", "zero", 14, seed=1)]
    for q, (wd, var) in {0.5: (20, 15), 0.9: (30, 35)}.items():
        rows += [_row("wd-top", "threshold", wd, q, "selected", "channel")]
        rows += [_row("variance", "threshold", var, q, "selected", "channel")]
        rows += [_row("all", "threshold", 100 * q, q, "all", "channel")]
        rows += [_row("wd-top", "threshold", 60 * q, q, "complement", "channel")]
        rows += [_row("random", "threshold", 90 * q, q, "complement", "channel")]
    return pd.DataFrame(rows)


def test_verdicts(study):
    lines = study.verdicts(_results())
    assert lines[0].startswith("zero: wd-top 50.000 vs worst control variance 40.000")
    assert "MORE sensitive" in lines[0]
    assert "threshold @ 0.5" in lines[1] and "MORE sensitive" in lines[1]
    assert "threshold @ 0.9" in lines[2] and "NOT more sensitive" in lines[2]
    assert lines[3] == (
        "whole layer @ 0.5: all neurons 50.000, exempting WD neurons 30.000, "
        "exempting random sets 45.000"
    )
    assert len(lines) == 5


def test_table(study):
    table = study.study_table(_results())
    assert table.loc[("zero", "random"), "-"] == pytest.approx(13.0)  # mean of two seeds
    assert table.loc[("threshold", "all but wd-top"), "0.9"] == pytest.approx(54.0)
    assert table.index[0] == ("dense", "dense")


def test_parts_and_end_to_end(study, tiny_dir, corpus, tmp_path):
    args = study.parse_args(
        [
            "--model",
            str(tiny_dir),
            "--dataset",
            str(corpus),
            "--seqlen",
            "32",
            "--eval-tokens",
            "64",
            "--nsamples",
            "2",
            "--rank-tokens",
            "256",
            "--top-percent",
            "5",
            "--seeds",
            "1",
            "--activation-sparsities",
            "0.5",
            "--parts",
            "layer,uniform",
            "--out",
            str(tmp_path / "s"),
            "--no-progress",
        ]
    )
    results = study.run_study(args)
    assert list(dict.fromkeys(results["part"])) == ["layer", "uniform"]
    layer = results[results["part"] == "layer"]
    assert list(layer["scope"]) == ["", "all", "complement", "complement"]
    assert (tmp_path / "s" / "uniform" / "config.json").is_file()
    with pytest.raises(SystemExit, match="unknown part"):
        study.run_study(study.parse_args(["--parts", "bogus", "--model", str(tiny_dir)]))
