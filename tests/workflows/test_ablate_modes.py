"""``run_ablate`` with the activation modes on a tiny local Llama and a text corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from wasserstein_neurons import load_model
from wasserstein_neurons.ablation import AblationConfig
from wasserstein_neurons.workflows import AblateConfig, run_ablate

SEQLEN = 32


def _cfg(tiny_dir, corpus, out, **study) -> AblateConfig:
    base = dict(strategies=("wd-top", "random"), top_percent=5.0, seeds=2, method="magnitude")
    return AblateConfig(
        model=str(tiny_dir),
        dataset=str(corpus),
        seqlen=SEQLEN,
        eval_tokens=128,
        batch_size=4,
        nsamples=4,
        rank_tokens=512,
        out=str(out),
        study=AblationConfig(**{**base, **study}),
    )


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir))


def test_activation_modes_run_folder(tiny_dir, corpus, model, tmp_path):
    cfg = _cfg(
        tiny_dir,
        corpus,
        tmp_path / "a",
        modes=("weights", "zero", "threshold"),
        sign="negative",
        activation_sparsities=(0.25, 0.9),
        threshold_scopes=("selected", "all"),
        stats_tokens=64,
    )
    before = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    results = run_ablate(cfg, model=model, progress=False)
    after = model.hf_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    saved = pd.read_csv(Path(cfg.out) / "ablation.csv", keep_default_na=False)
    assert len(saved) == len(results) == 1 + 3 + 3 + (3 * 2 + 2)
    assert list(dict.fromkeys(saved["mode"])) == ["dense", "weights", "zero", "threshold"]
    assert (saved.loc[saved["mode"] == "zero", "sign"] == "negative").all()
    threshold = saved[saved["mode"] == "threshold"]
    assert sorted(set(threshold["activation_sparsity"].astype(float))) == [0.25, 0.9]
    assert (threshold.loc[threshold["scope"] == "all", "strategy"] == "all").all()
    assert (Path(cfg.out) / "ablation.png").stat().st_size > 1000
    config = json.loads((Path(cfg.out) / "config.json").read_text())
    study = config["config"]["study"]
    assert study["modes"] == ["weights", "zero", "threshold"] and study["sign"] == "negative"
    # a threshold at activation sparsity 0.9 on every neuron hurts more than on 5% of them
    t = results[results["mode"] == "threshold"]
    q9 = t[t["activation_sparsity"] == 0.9].groupby("scope")["perplexity"].mean()
    dense = results.iloc[0]["perplexity"]
    assert abs(q9["all"] - dense) > abs(q9["selected"] - dense)


def test_own_ranking_uses_the_hook(tiny_dir, corpus, model, tmp_path):
    cfg = _cfg(tiny_dir, corpus, tmp_path / "b", modes=("mean",), hook="hook_post")
    results = run_ablate(cfg, model=model, progress=False)
    table = pd.read_csv(tmp_path / "b" / "ranking" / "neurons.csv")
    assert set(table["hook"]) == {"blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"}
    assert (results["hook"] == "hook_post").all() and len(results) == 1 + 3


@pytest.mark.parametrize(
    "study, message",
    [
        (dict(modes=("zero", "mask")), "unknown mode mask"),
        (dict(modes=("threshold",), activation_sparsities=(1.0,)), r"must be in \[0, 1\)"),
        (dict(modes=("mean",), sign="positive"), "--sign applies only to --mode zero"),
    ],
)
def test_bad_mode_rejected_before_any_folder(tiny_dir, corpus, tmp_path, study, message):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=message):
        run_ablate(_cfg(tiny_dir, corpus, out, **study), progress=False)
    assert not out.exists()
