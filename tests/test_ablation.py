"""Neuron-set selection, row sparsification and exact restore (tiny random models)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from wasserstein_neurons.ablation import (
    AblationConfig,
    collect_calibration,
    parse_strategies,
    run_ablation,
    select_neurons,
    sparsify_neurons,
)


def _table(model, seed=0):
    """A synthetic ranking table for the first-projection hook of every layer."""
    rng = np.random.default_rng(seed)
    frames = []
    for layer in range(model.adapter.n_layers):
        n = model.adapter.d_mlp
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "hook": model.adapter.hook_name(layer, model.adapter.first_role),
                    "neuron": np.arange(n),
                    "wd": rng.random(n),
                    "mean": rng.standard_normal(n),
                    "std": rng.random(n) + 0.1,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _all_weights(model):
    return {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()}


def test_strategies(tiny_model):
    table = _table(tiny_model)
    k = 4
    l1 = table[table.layer == 1].set_index("neuron")
    top = select_neurons("wd-top", table, tiny_model, 1, k)
    assert set(top) == set(l1["wd"].nlargest(k).index)
    bottom = select_neurons("wd-bottom", table, tiny_model, 1, k)
    assert set(bottom) == set(l1["wd"].nsmallest(k).index)
    assert set(select_neurons("variance", table, tiny_model, 1, k)) == set(
        l1["std"].nlargest(k).index
    )
    assert set(select_neurons("mean", table, tiny_model, 1, k)) == set(l1["mean"].nlargest(k).index)
    w = tiny_model.adapter.weight(tiny_model.hf_model, 1, tiny_model.adapter.first_role)
    assert set(select_neurons("norm", None, tiny_model, 1, k)) == set(
        torch.topk(w.norm(dim=1), k).indices.tolist()
    )
    r0 = select_neurons("random", None, tiny_model, 1, k, seed=0)
    assert np.array_equal(r0, select_neurons("random", None, tiny_model, 1, k, seed=0))
    assert not np.array_equal(r0, select_neurons("random", None, tiny_model, 1, k, seed=1))
    assert len(set(r0)) == k


def test_nan_wd_never_selected(tiny_llama):
    table = _table(tiny_llama)
    table.loc[(table.layer == 0) & (table.neuron < 5), "wd"] = np.nan
    assert min(select_neurons("wd-bottom", table, tiny_llama, 0, 10)) >= 5


def test_unknown_strategy_is_clear():
    with pytest.raises(ValueError, match="unknown strategy magic; valid: wd-top"):
        parse_strategies("wd-top,magic")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_sparsify_rows_then_restore_exactly(tiny_model, method):
    model = tiny_model
    windows = torch.randint(0, len(model.tokenizer), (4, 32))
    cache = collect_calibration(model, windows, method, batch_size=2, progress=False)
    before = _all_weights(model)
    selection = {0: np.array([1, 5, 9]), 1: np.array([0, 127])}
    snapshot = sparsify_neurons(model, selection, 0.75, cache, include_down=True)
    adapter = model.adapter
    for layer, neurons in selection.items():
        for role in adapter.neuron_roles:
            w = adapter.weight(model.hf_model, layer, role)
            zeros = (w[neurons] == 0).sum(dim=1)
            assert torch.all(zeros == 48), (role, zeros)  # 75% of 64 inputs
            others = np.setdiff1d(np.arange(w.shape[0]), neurons)
            assert torch.count_nonzero(w[others] == 0) == 0  # untouched random weights
        down = adapter.weight(model.hf_model, layer, "down")
        assert torch.all((down[:, neurons] == 0).sum(dim=0) == 48)
    changed = [k for k, v in _all_weights(model).items() if not torch.equal(v, before[k])]
    assert changed  # something was pruned ...
    snapshot.restore()
    after = _all_weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # ... and restored bit-exactly


def test_run_ablation_restores_and_orders(tiny_llama):
    model = tiny_llama
    table = _table(model)
    windows = torch.randint(0, len(model.tokenizer), (2, 32))
    cache = collect_calibration(model, windows, "magnitude", progress=False)
    before = _all_weights(model)
    cfg = AblationConfig(
        strategies=["wd-top", "random"],
        top_percent=10,
        seeds=2,
        neuron_sparsities=[0.5, 0.9],
        method="magnitude",
    )
    df = run_ablation(model, table, cfg, windows, cache, progress=False)
    assert list(df["strategy"]) == [
        "dense",
        "wd-top",
        "wd-top",
        "random",
        "random",
        "random",
        "random",
    ]
    assert set(df.columns) >= {
        "strategy",
        "seed",
        "top_percent",
        "neuron_sparsity",
        "method",
        "perplexity",
    }
    assert (df["perplexity"] > 1).all() and df["perplexity"].nunique() > 1
    after = _all_weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("neuron_sparsities", [1.0], "sparsity must be in"),
        ("method", "obs", "unknown pruning method"),
        ("top_percent", 0, "top_percent"),
        ("strategies", ["best"], "unknown strategy"),
    ],
)
def test_config_errors(field, value, message):
    cfg = AblationConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()
