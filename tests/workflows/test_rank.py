"""``run_rank`` called directly on a tiny local Llama and a text-file corpus."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
from scipy.special import ndtr, ndtri
from scipy.stats import wasserstein_distance

from wasserstein_neurons import wasserstein_to_gaussian
from wasserstein_neurons.ranking import count_for_percent
from wasserstein_neurons.runs import RunExistsError
from wasserstein_neurons.workflows import RankConfig, RankResult, run_rank

TOKENS, SEQLEN, D_MLP, N_LAYERS = 1024, 32, 128, 2


def rank_cfg(tiny_dir, corpus, out, **kw) -> RankConfig:
    base = dict(
        out=str(out),
        model=str(tiny_dir),
        dataset=str(corpus),
        tokens=TOKENS,
        seqlen=SEQLEN,
        batch_size=8,
        top_percent=5.0,
    )
    base.update(kw)
    return RankConfig(**base)


@pytest.fixture(scope="module")
def ranked(tiny_dir, corpus, tmp_path_factory) -> tuple[RankConfig, RankResult]:
    cfg = rank_cfg(tiny_dir, corpus, tmp_path_factory.mktemp("rank") / "run")
    return cfg, run_rank(cfg, progress=False)


def exact_w1(x: np.ndarray) -> float:
    """W1(z-scored x, N(0, 1)) by the piecewise integral over the empirical quantile steps.

    On the i-th step ``[a_i, b_i] = Phi^-1([(i-1)/n, i/n])`` the quantile equals ``z_(i)``, and
    ``int_a^b |z - t| phi(t) dt = 2 G(c) - G(a) - G(b)`` with ``G(t) = z Phi(t) + phi(t)``,
    ``c = clip(z, a, b)``.
    """
    x = np.sort(np.asarray(x, dtype=np.float64))
    z = (x - x.mean()) / x.std()  # population std
    n = len(z)
    edges = ndtri(np.arange(n + 1) / n)  # -inf ... +inf
    a, b = edges[:-1], edges[1:]
    c = np.clip(z, a, b)

    def G(t):
        return z * ndtr(t) + np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)

    return float(np.sum(2 * G(c) - G(a) - G(b)))


def test_neurons_table_one_row_per_hook_and_neuron(ranked):
    cfg, res = ranked
    df = pd.read_csv(res.out / "neurons.csv")
    hooks = [f"blocks.{layer}.mlp.hook_pre" for layer in range(N_LAYERS)]
    assert sorted(df["hook"].unique()) == hooks
    assert len(df) == N_LAYERS * D_MLP
    assert not df.duplicated(["hook", "neuron"]).any()
    for hook, group in df.groupby("hook"):
        assert sorted(group["neuron"]) == list(range(D_MLP))
        assert (group["layer"] == int(hook.split(".")[1])).all()
    assert (df["n_tokens"] == TOKENS).all()
    assert df["wd"].notna().all() and (df["wd"] > 0).all()
    # the returned table is what was written
    np.testing.assert_allclose(
        res.table.sort_values(["hook", "neuron"])["wd"].to_numpy(),
        df.sort_values(["hook", "neuron"])["wd"].to_numpy(),
        rtol=1e-12,
    )


def test_wd_matches_independent_recomputation(ranked):
    _, res = ranked
    assert res.store is not None and res.store.n_tokens == TOKENS
    table = res.table.set_index(["hook", "neuron"])
    rng = np.random.default_rng(0)
    for hook in res.store.hook_names:
        acts = np.asarray(res.store.array(hook))
        assert acts.shape == (TOKENS, D_MLP)
        top = int(table.loc[hook]["wd"].idxmax())
        cols = sorted({top, *rng.choice(D_MLP, size=3, replace=False).tolist()})
        lib = wasserstein_to_gaussian(acts[:, cols]).numpy()
        for j, w_lib in zip(cols, lib, strict=True):
            x = acts[:, j].astype(np.float64)
            wd = table.loc[(hook, j), "wd"]
            assert wd == pytest.approx(float(w_lib), rel=1e-9)
            assert wd == pytest.approx(exact_w1(x), rel=1e-9, abs=1e-12)
            # and the closed form itself against scipy on a dense grid of Gaussian quantiles
            z = (x - x.mean()) / x.std()
            grid = ndtri((np.arange(200_000) + 0.5) / 200_000)
            assert wd == pytest.approx(wasserstein_distance(z, grid), abs=2e-4)
            assert table.loc[(hook, j), "mean"] == pytest.approx(x.mean(), rel=1e-5, abs=1e-7)
            assert table.loc[(hook, j), "std"] == pytest.approx(x.std(), rel=1e-5)


def test_is_top_marks_top_percent_per_hook(ranked):
    cfg, res = ranked
    df = pd.read_csv(res.out / "neurons.csv")
    k = count_for_percent(D_MLP, cfg.top_percent)
    assert k == 6  # round(5% of 128)
    for _, group in df.groupby("hook"):
        top = group[group["is_top"]]
        assert len(top) == k
        assert top["wd"].min() > group.loc[~group["is_top"], "wd"].max()
        assert set(top["wd_rank"]) == set(range(k))
    listed = pd.read_csv(res.out / "top_neurons.csv")
    assert set(zip(listed["hook"], listed["neuron"], strict=True)) == set(
        zip(df.loc[df["is_top"], "hook"], df.loc[df["is_top"], "neuron"], strict=True)
    )


def test_config_json_finished_and_records_config(ranked, tiny_dir):
    cfg, res = ranked
    config = json.loads((res.out / "config.json").read_text())
    assert config["finished"] is True and config["command"] == "rank"
    assert config["config"] == asdict(cfg)
    assert config["model"]["name"] == str(tiny_dir)
    assert config["model"]["d_mlp"] == D_MLP and config["model"]["n_layers"] == N_LAYERS
    assert config["n_tokens"] == TOKENS
    assert sorted(config["hooks"]) == sorted(res.store.hook_names)
    assert (res.out / "activations" / "meta.json").is_file()
    assert (res.out / "wd_by_layer.png").stat().st_size > 1000


def test_existing_run_refused_then_overwritten(tiny_dir, corpus, tmp_path):
    out = tmp_path / "run"
    first = run_rank(rank_cfg(tiny_dir, corpus, out, tokens=256), progress=False)
    before = (out / "neurons.csv").read_bytes()
    with pytest.raises(RunExistsError, match="already holds a finished run"):
        run_rank(rank_cfg(tiny_dir, corpus, out, tokens=256, seed=1), progress=False)
    assert issubclass(RunExistsError, FileExistsError)
    assert (out / "neurons.csv").read_bytes() == before
    assert json.loads((out / "config.json").read_text())["finished"]

    second = run_rank(
        rank_cfg(tiny_dir, corpus, out, tokens=256, seed=1, overwrite=True, keep_activations=False),
        progress=False,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["finished"] and config["config"]["seed"] == 1
    assert second.store is None and not (out / "activations").exists()
    assert (out / "neurons.csv").read_bytes() != before  # other windows, other distances
    assert not np.array_equal(first.table["wd"].to_numpy(), second.table["wd"].to_numpy())


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(top_percent=0), "top_percent"),
        (dict(top_percent=150), "top_percent"),
        (dict(top_percent=float("nan")), "top_percent"),
        (dict(method="magic"), "unknown method"),
        (dict(tokens=16, seqlen=32), "--tokens"),
    ],
)
def test_bad_config_rejected_before_any_output(tiny_dir, corpus, tmp_path, kw, message):
    cfg = rank_cfg(tiny_dir, corpus, tmp_path / "run", **kw)
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    with pytest.raises(ValueError, match=message):
        run_rank(cfg, progress=False)
    assert not (tmp_path / "run").exists()
