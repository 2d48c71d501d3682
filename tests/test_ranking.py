"""Ranking tables, top-p selection and top-activating contexts on synthetic stores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from scipy.special import ndtri

from wasserstein_neurons import wasserstein_to_gaussian
from wasserstein_neurons.capture import ActivationStore
from wasserstein_neurons.ranking import (
    count_for_percent,
    first_position_share,
    rank_store,
    top_activating_contexts,
    top_neurons,
)


class _Tok:
    def decode(self, ids):
        return "".join(f" t{i}" for i in ids)


def _make_store(path, arrays: dict, seqlen: int, tokens=None, **meta_extra):
    n_tokens = next(iter(arrays.values())).shape[0]
    hooks = {}
    for name, arr in arrays.items():
        np.save(path / f"{name}.npy", arr)
        hooks[name] = {"shape": list(arr.shape)}
    if tokens is None:
        tokens = np.arange(n_tokens, dtype=np.int32).reshape(-1, seqlen)
    np.save(path / "tokens.npy", tokens)
    meta = {"finished": True, "hooks": hooks, "n_tokens": n_tokens, "seqlen": seqlen, **meta_extra}
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


# --------------------------------------------------------------------------------------------
# token positions: a planted first-position spike
# --------------------------------------------------------------------------------------------

SEQLEN, N_WINDOWS, SPIKED = 100, 40, 5


def direct_share(x: np.ndarray, start: np.ndarray, tail_fraction: float = 0.001) -> float:
    """Share of the tokens with the round(0.1% n) largest |z| (ties included) at a start."""
    x = np.asarray(x, dtype=np.float64)
    z = np.abs((x - x.mean()) / x.std())
    k = max(1, round(tail_fraction * len(x)))
    tail = z >= np.sort(z)[-k]
    return np.count_nonzero(tail & start) / np.count_nonzero(tail)


@pytest.fixture
def spiked(tmp_path):
    """Gaussian neurons; neuron SPIKED is +12 at position 0 of every window, neuron 9 at 3."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((N_WINDOWS * SEQLEN, 20)).astype(np.float32)
    a[::SEQLEN, SPIKED] += 12.0
    a[3::SEQLEN, 9] += 12.0
    tokens = rng.integers(10, 300, size=(N_WINDOWS, SEQLEN)).astype(np.int32)
    tokens[:, 0] = 1  # a BOS in front of every window
    tokens[7, 50] = 2  # an EOS inside window 7
    arrays = {"blocks.2.mlp.hook_pre": a}
    return _make_store(tmp_path, arrays, SEQLEN, tokens=tokens, bos=True, special_ids=[1, 2])


def test_first_pos_share_flags_the_planted_spike(spiked):
    df = rank_store(spiked, progress=False).set_index("neuron")
    x = np.asarray(spiked.array("blocks.2.mlp.hook_pre"))
    start = np.arange(len(x)) % SEQLEN == 0
    for j in range(20):
        assert df.loc[j, "first_pos_share"] == direct_share(x[:, j], start)
    assert df.loc[SPIKED, "first_pos_share"] == 1.0 and df.loc[SPIKED, "position_artefact"]
    assert df.loc[SPIKED, "wd_rank"] in (0, 1)
    assert df["position_artefact"].sum() == 1  # neuron 9's spike is not at the window start
    top = top_neurons(df.reset_index(), 10.0)
    assert top.set_index("neuron").loc[SPIKED, "position_artefact"]


@pytest.mark.parametrize("n", [1, 4])
def test_exclude_positions_removes_exactly_those_rows(spiked, n):
    x = np.asarray(spiked.array("blocks.2.mlp.hook_pre"))
    keep = np.arange(len(x)) % SEQLEN >= n
    df = rank_store(spiked, progress=False, exclude_positions=n).set_index("neuron")
    expected = wasserstein_to_gaussian(x[keep]).numpy()
    np.testing.assert_array_equal(df["wd"].to_numpy(), expected)
    assert (df["n_tokens"] == keep.sum()).all()
    np.testing.assert_allclose(df["mean"], x[keep].astype(np.float64).mean(axis=0), rtol=1e-9)
    # the spike is gone: neuron SPIKED is as Gaussian as the others (scipy on a quantile grid)
    grid = ndtri((np.arange(100_000) + 0.5) / 100_000)
    xs = x[keep, SPIKED].astype(np.float64)
    w = scipy.stats.wasserstein_distance((xs - xs.mean()) / xs.std(), grid)
    assert df.loc[SPIKED, "wd"] == pytest.approx(w, abs=5e-4) and df.loc[SPIKED, "wd"] < 0.05
    # the window start is now position n
    start = (np.arange(len(x)) % SEQLEN == n)[keep]
    for j in range(20):
        assert df.loc[j, "first_pos_share"] == direct_share(x[keep, j], start)


def test_exclude_special_uses_the_recorded_ids(spiked):
    x = np.asarray(spiked.array("blocks.2.mlp.hook_pre"))
    tokens = spiked.tokens()
    keep = ~np.isin(tokens, [1, 2])
    assert keep.sum() == len(x) - N_WINDOWS - 1
    np.testing.assert_array_equal(spiked.special_mask(), ~keep)
    df = rank_store(spiked, progress=False, exclude_special=True)
    np.testing.assert_array_equal(df["wd"].to_numpy(), wasserstein_to_gaussian(x[keep]).numpy())
    # BOS excluded: the window start is the first token after it
    start = (np.arange(len(x)) % SEQLEN == 1)[keep]
    share = first_position_share(x, start, np.flatnonzero(keep))
    np.testing.assert_array_equal(df["first_pos_share"].to_numpy(), share)
    both = rank_store(spiked, progress=False, exclude_positions=1, exclude_special=True)
    assert (both["n_tokens"] == len(x) - N_WINDOWS - 1).all()  # BOS is position 0


def test_exclude_special_needs_recorded_ids(store):
    with pytest.raises(ValueError, match="records no special token ids"):
        rank_store(store, progress=False, exclude_special=True)
    assert rank_store(store, progress=False, exclude_positions=1)["n_tokens"].eq(3960).all()


def test_contexts_skip_excluded_rows(spiked):
    sel = spiked.select(exclude_positions=1)
    ctx = top_activating_contexts(spiked, _Tok(), "blocks.2.mlp.hook_pre", [SPIKED], k=5)
    high = ctx[ctx["tail"] == "high"]
    assert (high["window_position"] == 0).all()  # the spike, by default
    assert (ctx["position"] == ctx["window"] * SEQLEN + ctx["window_position"]).all()
    ctx = top_activating_contexts(
        spiked, _Tok(), "blocks.2.mlp.hook_pre", [SPIKED], k=5, selection=sel
    )
    assert (ctx["window_position"] >= 1).all() and len(ctx) == 10
    x = np.asarray(spiked.array("blocks.2.mlp.hook_pre"))[sel.rows, SPIKED].astype(np.float64)
    assert ctx[ctx["tail"] == "high"]["value"].max() == x.max()
    z = (x.max() - x.mean()) / x.std()
    assert ctx[ctx["tail"] == "high"]["z"].max() == pytest.approx(z, rel=1e-9)


def test_first_position_share_ties_and_constant():
    x = np.zeros((10, 3))
    x[[0, 5], 0] = 1.0  # a tie at the top: both tokens are in the tail, one starts a window
    x[[1, 2], 1] = [2.0, -2.0]
    start = np.arange(10) % 5 == 0
    share = first_position_share(x, start, tail_fraction=0.1)
    assert share[0] == 1.0 and share[1] == 0.0 and np.isnan(share[2])
    with pytest.raises(ValueError, match="tail_fraction"):
        first_position_share(x, start, tail_fraction=0.0)
