"""Ranking tables, top-p selection and top-activating contexts on synthetic stores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from wasserstein_neurons.capture import ActivationStore
from wasserstein_neurons.ranking import (
    count_for_percent,
    rank_store,
    top_activating_contexts,
    top_neurons,
)


class _Tok:
    def decode(self, ids):
        return "".join(f" t{i}" for i in ids)


def _make_store(path, arrays: dict, seqlen: int):
    n_tokens = next(iter(arrays.values())).shape[0]
    hooks = {}
    for name, arr in arrays.items():
        np.save(path / f"{name}.npy", arr)
        hooks[name] = {"shape": list(arr.shape)}
    np.save(path / "tokens.npy", np.arange(n_tokens, dtype=np.int32).reshape(-1, seqlen))
    meta = {"finished": True, "hooks": hooks, "n_tokens": n_tokens, "seqlen": seqlen}
    (path / "meta.json").write_text(json.dumps(meta))
    return ActivationStore.open(path)


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    n = 4000
    a = rng.standard_normal((n, 100)).astype(np.float32)
    a[:, 7] = np.where(rng.random(n) < 0.1, 6.0, 0.0) + 0.1 * rng.standard_normal(n)  # bimodal
    a[:, 42] = rng.exponential(size=n)  # skewed
    a[:, 99] = 1.5  # constant
    b = rng.standard_normal((n, 100)).astype(np.float32)
    b[:, 3] = rng.standard_t(2, size=n)  # heavy tails
    return _make_store(tmp_path, {"blocks.0.mlp.hook_pre": a, "blocks.1.mlp.hook_pre": b}, 100)


def test_rank_table(store):
    df = rank_store(store, progress=False)
    assert list(df.columns[:10]) == [
        "layer",
        "hook",
        "neuron",
        "wd",
        "mean",
        "std",
        "skew",
        "kurtosis",
        "n_tokens",
        "constant",
    ]
    assert len(df) == 200 and (df["n_tokens"] == 4000).all()
    l0 = df[df.layer == 0].set_index("neuron")
    assert l0.loc[7, "wd_rank"] == 0 and l0.loc[42, "wd_rank"] == 1
    assert np.isnan(l0.loc[99, "wd"]) and l0.loc[99, "constant"] and l0.loc[99, "wd_rank"] == 99
    col = store.array("blocks.0.mlp.hook_pre")[:, 42].astype(np.float64)
    assert l0.loc[42, "skew"] == pytest.approx(scipy.stats.skew(col), rel=1e-9)
    assert l0.loc[42, "std"] == pytest.approx(col.std(), rel=1e-9)
    assert df[df.layer == 1].set_index("neuron").loc[3, "wd_rank"] == 0


def test_top_neurons(store):
    df = rank_store(store, progress=False)
    top = top_neurons(df, 3.0)
    assert len(top) == 6 and (top.groupby("hook").size() == 3).all()
    assert set(top[top.layer == 0]["neuron"]) >= {7, 42}
    assert not top["wd"].isna().any()
    bottom = top_neurons(df, 3.0, largest=False)
    assert bottom["wd"].max() < top["wd"].min()
    assert count_for_percent(1536, 3.0) == 46 and count_for_percent(10, 1.0) == 1
    for bad in (0.0, -1.0, 101.0, float("nan")):
        with pytest.raises(ValueError, match="top_percent"):
            top_neurons(df, bad)


def test_top_activating_contexts(store):
    ctx = top_activating_contexts(store, _Tok(), "blocks.1.mlp.hook_pre", [3], k=4, width=5)
    assert set(ctx["tail"]) == {"high", "low"} and len(ctx) == 8
    col = store.array("blocks.1.mlp.hook_pre")[:, 3]
    high = ctx[ctx["tail"] == "high"].sort_values("rank")
    np.testing.assert_array_equal(high["position"], np.argsort(-col, kind="stable")[:4])
    low = ctx[ctx["tail"] == "low"].sort_values("rank")
    assert (np.diff(low["value"]) >= 0).all() and low["value"].iloc[0] == col.min()
    # context never crosses a window boundary and marks the token
    for _, row in ctx.iterrows():
        pos = row["position"]
        assert f"[[ t{pos}]]" in row["context"]
        start = pos - pos % 100
        shown = [int(t[1:]) for t in row["context"].replace("[[", " ").replace("]]", " ").split()]
        assert min(shown) >= start and max(shown) < start + 100


def test_rank_store_reads_float16(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2000, 10)).astype(np.float16)
    s = _make_store(tmp_path, {"blocks.3.mlp.hook_pre": a}, 100)
    df = rank_store(s, progress=False)
    assert isinstance(df, pd.DataFrame) and (df["layer"] == 3).all()
    assert df["wd"].between(0, 0.1).all()
