"""``sweep``: models x workflows x grids as trials into one results table (issue 13)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import save_tiny_model

from wasserstein_neurons.cli import main
from wasserstein_neurons.workflows import PruneConfig, run_prune
from wasserstein_neurons.workflows.sweep import load_sweep, run_sweep


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", seed=1)


def _file(tmp_path, models, corpus, **extra) -> str:
    spec = {
        "models": [str(m) for m in models],
        "settings": {"dataset": str(corpus), "seqlen": 32, "eval_tokens": 256, "nsamples": 4},
        "runs": [
            {"workflow": "prune", "grid": {"method": ["magnitude"], "sparsity": [0.5, 0.7]}},
            {"workflow": "rank", "settings": {"tokens": 256}},
        ],
        **extra,
    }
    path = tmp_path / f"sweep{len(list(tmp_path.glob('sweep*')))}.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_sweep_runs_every_combination(tiny_dir, tiny_gpt2_dir, corpus, tmp_path):
    out = tmp_path / "sweep"
    sweep = load_sweep(_file(tmp_path, [tiny_dir, tiny_gpt2_dir], corpus), out=str(out))
    table = run_sweep(sweep, progress=False)
    assert table["trial"].nunique() == 2 * 3  # (2 prune points + 1 rank) per model
    prune = table[table["workflow"] == "prune"]
    assert len(prune) == 4 and set(prune["model"]) == {str(tiny_dir), str(tiny_gpt2_dir)}
    assert len(table[table["workflow"] == "rank"]) == 2 * 2  # one row per layer and model
    # a trial is exactly the workflow run on its own
    alone = run_prune(
        PruneConfig(
            model=str(tiny_dir),
            dataset=str(corpus),
            seqlen=32,
            eval_tokens=256,
            nsamples=4,
            method="magnitude",
            sparsity=0.7,
            out=str(tmp_path / "alone"),
        ),
        progress=False,
    )
    row = prune[(prune["model"] == str(tiny_dir)) & (prune["sparsity"] == 0.7)].iloc[0]
    assert row["perplexity_after"] == pytest.approx(alone["perplexity_after"], rel=1e-9)
    assert json.loads((out / "config.json").read_text())["finished"]
    for trial in table["trial"].unique():
        assert json.loads((out / "trials" / trial / "config.json").read_text())["finished"]
    saved = pd.read_csv(out / "results.csv")
    assert list(saved["trial"]) == list(table["trial"])


def test_resume_adds_only_new_trials(tiny_dir, tiny_gpt2_dir, corpus, tmp_path):
    out = tmp_path / "sweep"
    first = run_sweep(load_sweep(_file(tmp_path, [tiny_dir], corpus), out=str(out)), False)
    stamps = {t: (out / "trials" / t / "config.json").stat().st_mtime_ns for t in first["trial"]}
    both = load_sweep(_file(tmp_path, [tiny_dir, tiny_gpt2_dir], corpus), out=str(out), resume=True)
    table = run_sweep(both, progress=False)
    assert table["trial"].nunique() == 6
    for trial, stamp in stamps.items():  # the first trials were not run again
        assert (out / "trials" / trial / "config.json").stat().st_mtime_ns == stamp
    changed = load_sweep(
        _file(tmp_path, [tiny_dir], corpus, settings={"dataset": str(corpus), "seqlen": 64}),
        out=str(out),
        resume=True,
    )
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(changed, progress=False)


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"modles": ["x"]}, "unknown key 'modles'"),
        (
            {"models": ["x"], "runs": [{"workflow": "prune", "grdi": {}}]},
            "runs[0]: unknown key 'grdi'",
        ),
        ({"models": ["x"], "runs": [{"workflow": "prnue"}]}, "runs[0].workflow must be one of"),
        (
            {"models": ["x"], "runs": [{"workflow": "prune", "grid": {"sparsty": [0.5]}}]},
            "unknown key 'sparsty'",
        ),
        (
            {"models": ["x"], "runs": [{"workflow": "prune", "grid": {"sparsity": [1.5]}}]},
            "sparsity",
        ),
        ({"models": [], "runs": []}, "at least one"),
        ({"models": ["x"], "runs": [{"workflow": "rank"}], "engine": "spark"}, "unknown engine"),
    ],
)
def test_bad_sweep_file_is_one_line(tmp_path, capsys, spec, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not (tmp_path / "out").exists()
