"""The ablation study's activation modes (tiny random models): the sweep's settings, the rows,
the weights and hooks afterwards, and bad configurations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_ablation import _all_weights, _table
from test_interventions import _n_hooks

from wasserstein_neurons.ablation import (
    AblationConfig,
    ablation_settings,
    collect_calibration,
    run_ablation,
    select_neurons,
    summarize,
)
from wasserstein_neurons.evaluate import perplexity
from wasserstein_neurons.interventions import collect_activation_stats

ALL_MODES = ("weights", "zero", "mean", "resample", "threshold")


def _study(**kw) -> AblationConfig:
    base: dict = dict(
        strategies=["wd-top", "random"],
        top_percent=10,
        seeds=2,
        method="magnitude",
        modes=ALL_MODES,
        activation_sparsities=[0.5, 0.9],
        threshold_scopes=["selected", "all", "complement"],
    )
    base.update(kw)
    if "threshold" not in base["modes"]:
        del base["activation_sparsities"]
    cfg = AblationConfig(**base)
    cfg.validate()
    return cfg


def test_settings_cover_every_mode():
    cfg = _study(threshold_rules=["channel", "uniform"], neuron_sparsities=[0.5, 0.9])
    settings = ablation_settings(cfg)
    by_mode = {m: [s for s in settings if s.mode == m] for m in ALL_MODES}
    assert len(by_mode["weights"]) == 3 * 2  # (wd-top + 2 random seeds) x 2 sparsities
    for mode in ("zero", "mean", "resample"):
        assert [(s.strategy, s.seed) for s in by_mode[mode]] == [
            ("wd-top", 0),
            ("random", 0),
            ("random", 1),
        ]
    threshold = by_mode["threshold"]
    # selected and complement: 3 sets x 2 rules x 2 sparsities each; all: 2 rules x 2 sparsities
    assert len(threshold) == 2 * (3 * 2 * 2) + 2 * 2
    assert {s.strategy for s in threshold if s.scope == "all"} == {"all"}
    assert all(math.isnan(s.neuron_sparsity) for s in threshold)
    assert all(s.sign == "both" for s in by_mode["zero"])


def test_run_every_mode_restores_weights_and_hooks(tiny_model):
    model = tiny_model
    windows = torch.randint(0, len(model.tokenizer), (2, 32))
    cfg = _study()
    cache = collect_calibration(model, windows, "magnitude", progress=False)
    stats = collect_activation_stats(model, windows, "hook_pre", progress=False)
    before = _all_weights(model)
    df = run_ablation(model, _table(model), cfg, windows, cache, progress=False, stats=stats)
    after = _all_weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit-identical
    assert _n_hooks(model) == 0
    assert df.iloc[0]["mode"] == "dense" and df.iloc[0]["strategy"] == "dense"
    assert len(df) == 1 + len(ablation_settings(cfg))
    assert {"mode", "activation_sparsity", "scope", "rule", "sign", "hook"} <= set(df.columns)
    threshold = df[df["mode"] == "threshold"]
    assert set(threshold["activation_sparsity"]) == {0.5, 0.9}
    assert threshold["neuron_sparsity"].isna().all()
    assert (df.loc[df["mode"] == "weights", "method"] == "magnitude").all()
    assert (df.loc[df["mode"] == "zero", "method"] == "").all()
    # every intervention changes the model, and the dense row is the plain model
    dense = perplexity(model, windows, progress=False).perplexity
    assert df.iloc[0]["perplexity"] == pytest.approx(dense, rel=1e-12)
    assert (df.iloc[1:]["perplexity"] != df.iloc[0]["perplexity"]).all()
    summary = summarize(df)
    assert len(summary) == len(df) - ((df["strategy"] == "random") & (df["seed"] == 1)).sum()
    assert (summary.loc[summary["strategy"] == "random", "count"] == 2).all()  # seeds folded


def test_zero_rows_match_a_manual_intervention(tiny_llama):
    """The ablation's ``zero`` row = the model with those neurons' gate rows zeroed
    (silu(0) = 0, so the neuron's output is 0 exactly), scored independently."""
    model = tiny_llama
    table = _table(model)
    windows = torch.randint(0, len(model.tokenizer), (2, 32))
    cfg = _study(modes=["zero"], strategies=["wd-top"])
    df = run_ablation(model, table, cfg, windows, None, progress=False)
    k = df.iloc[1]["neurons_per_layer"]
    saved = {}
    for layer in range(model.adapter.n_layers):
        neurons = torch.as_tensor(select_neurons("wd-top", table, model, layer, k))
        gate = model.adapter.weight(model.hf_model, layer, "gate")
        saved[layer] = gate[neurons].clone()
        gate[neurons] = 0
    try:
        manual = perplexity(model, windows, progress=False).perplexity
    finally:
        for layer, rows in saved.items():
            model.adapter.weight(model.hf_model, layer, "gate")[
                torch.as_tensor(select_neurons("wd-top", table, model, layer, k))
            ] = rows
    assert df.iloc[1]["perplexity"] == pytest.approx(manual, rel=1e-5)


def test_selection_reads_the_requested_hook(tiny_llama):
    model = tiny_llama
    table = _table(model)
    post = table.assign(hook=table["hook"].str.replace("hook_pre", "hook_post"), wd=-table["wd"])
    both = pd.concat([table, post])
    top_pre = select_neurons("wd-top", both, model, 0, 5)
    top_post = select_neurons("wd-top", both, model, 0, 5, hook="hook_post")
    assert np.array_equal(top_post, select_neurons("wd-bottom", table, model, 0, 5))
    assert not np.array_equal(top_pre, top_post)
    down = model.adapter.weight(model.hf_model, 0, "down")
    assert set(select_neurons("norm", None, model, 0, 5, hook="hook_post")) == set(
        torch.topk(down.norm(dim=0), 5).indices.tolist()
    )
    with pytest.raises(ValueError, match="without hook_pre_linear in its --hooks"):
        select_neurons("wd-top", table, model, 0, 5, hook="hook_pre_linear")


def test_activation_modes_need_their_statistics(tiny_llama):
    windows = torch.randint(0, 300, (2, 16))
    with pytest.raises(ValueError, match="need activation statistics of hook_pre"):
        run_ablation(tiny_llama, None, _study(modes=["mean"]), windows, None, progress=False)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(modes=["weights", "dropout"]), "unknown mode dropout; valid: weights, zero"),
        (dict(modes="threshold", activation_sparsities=[0.5, 1.0]), r"must be in \[0, 1\)"),
        (dict(modes="threshold", activation_sparsities=[-0.5]), r"must be in \[0, 1\)"),
        (dict(modes="mean", sign="negative"), "--sign applies only to --mode zero"),
        (dict(modes="zero", sign="up"), "unknown sign up"),
        (dict(activation_sparsities=[0.5]), "--activation-sparsity applies only to --mode thr"),
        (dict(modes="threshold", threshold_scopes="most"), "unknown threshold scope most"),
        (dict(modes="threshold", threshold_rules="teal"), "unknown threshold rule teal"),
        (dict(hook="hook_resid"), "unknown hook 'hook_resid'"),
        (dict(stats_tokens=0), "stats_tokens"),
    ],
)
def test_bad_activation_config(kw, message):
    with pytest.raises(ValueError, match=message):
        AblationConfig(**kw).validate()


def test_mode_defaults():
    cfg = AblationConfig(modes="zero,threshold")
    cfg.validate()
    assert cfg.modes == ["zero", "threshold"] and list(cfg.activation_sparsities) == [0.5]
    plain = AblationConfig()
    plain.validate()
    assert plain.modes == ["weights"] and list(plain.activation_sparsities) == []
    assert not plain.needs_stats and cfg.needs_stats
