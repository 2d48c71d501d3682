"""``run_rank`` called directly on a tiny local Llama and a text-file corpus."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import ndtr, ndtri
from scipy.stats import wasserstein_distance

from wasserstein_neurons import load_model, wasserstein_to_gaussian
from wasserstein_neurons.bridge import replace_linear
from wasserstein_neurons.data import load_tokens, sample_windows
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
        (dict(exclude_positions=-1), "--exclude-positions must be an integer >= 0"),
        (dict(exclude_positions=SEQLEN), "must be smaller than --seqlen"),
    ],
)
def test_bad_config_rejected_before_any_output(tiny_dir, corpus, tmp_path, kw, message):
    cfg = rank_cfg(tiny_dir, corpus, tmp_path / "run", **kw)
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    with pytest.raises(ValueError, match=message):
        run_rank(cfg, progress=False)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# token positions: a tiny model with a planted first-position spike
# --------------------------------------------------------------------------------------------

SPIKED_LAYER, SPIKED = 1, 17
SPIKED_HOOK = f"blocks.{SPIKED_LAYER}.mlp.hook_pre"


class SpikeAtWindowStart(torch.nn.Module):
    """The gate projection, plus ``value`` on one neuron at position 0 of every window."""

    def __init__(self, linear: torch.nn.Module, neuron: int, value: float):
        super().__init__()
        self.linear, self.neuron, self.value = linear, neuron, value
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, pos, d_model]
        y = self.linear(x)
        spike = torch.zeros_like(y)
        spike[:, 0, self.neuron] = self.value
        return y + spike


@pytest.fixture(scope="module")
def spiked_runs(tiny_dir, corpus, tmp_path_factory):
    """Rank runs of the spiked model with exclude_positions 0 and 1 (same windows)."""
    model = load_model(str(tiny_dir))
    gate = model.adapter.linear(model.hf_model, SPIKED_LAYER, "gate")
    replace_linear(model, SPIKED_LAYER, "gate", SpikeAtWindowStart(gate, SPIKED, 40.0))
    root = tmp_path_factory.mktemp("spiked")
    runs = {
        n: run_rank(
            rank_cfg(tiny_dir, corpus, root / f"x{n}", exclude_positions=n),
            model=model,
            progress=False,
        )
        for n in (0, 1)
    }
    return model, runs


def direct_share(x: np.ndarray, start: np.ndarray) -> float:
    x = x.astype(np.float64)
    z = np.abs(x - x.mean()) / x.std()
    tail = z >= np.sort(z)[-max(1, round(0.001 * len(x)))]
    return np.count_nonzero(tail & start) / np.count_nonzero(tail)


def test_spike_is_flagged_as_a_position_artefact(spiked_runs):
    _, runs = spiked_runs
    res = runs[0]
    row = res.table.set_index(["hook", "neuron"]).loc[(SPIKED_HOOK, SPIKED)]
    assert row["wd_rank"] == 0 and row["first_pos_share"] == 1.0 and row["position_artefact"]
    top = pd.read_csv(res.out / "top_neurons.csv").set_index(["hook", "neuron"])
    assert top.loc[(SPIKED_HOOK, SPIKED), "position_artefact"]
    assert top["position_artefact"].dtype == bool
    # first_pos_share is a direct count of the tail tokens at position 0
    x = np.asarray(res.store.array(SPIKED_HOOK))
    start = res.store.positions() == 0
    shares = res.table[res.table["hook"] == SPIKED_HOOK]["first_pos_share"].to_numpy()
    assert shares.tolist() == [direct_share(x[:, j], start) for j in range(D_MLP)]
    contexts = pd.read_csv(res.out / "top_contexts.csv")
    spiked = contexts[(contexts["neuron"] == SPIKED) & (contexts["tail"] == "high")]
    assert (spiked["window_position"] == 0).all()


def test_exclude_positions_removes_exactly_the_window_starts(spiked_runs):
    _, runs = spiked_runs
    base, res = runs[0], runs[1]
    n_windows = TOKENS // SEQLEN
    assert (res.table["n_tokens"] == TOKENS - n_windows).all()
    keep = res.store.positions() >= 1
    for hook in res.store.hook_names:
        # the same activations were captured; the statistics leave out position 0
        x = np.asarray(res.store.array(hook))
        np.testing.assert_array_equal(x, np.asarray(base.store.array(hook)))
        table = res.table[res.table["hook"] == hook]
        np.testing.assert_array_equal(table["wd"], wasserstein_to_gaussian(x[keep]).numpy())
        np.testing.assert_allclose(table["std"], x[keep].astype(np.float64).std(0), rtol=1e-9)
        start = (res.store.positions() == 1)[keep]
        expected = [direct_share(x[keep, j], start) for j in range(D_MLP)]
        assert table["first_pos_share"].tolist() == expected
    wd = res.table.set_index(["hook", "neuron"]).loc[(SPIKED_HOOK, SPIKED), "wd"]
    assert wd < 0.5 * base.table.set_index(["hook", "neuron"]).loc[(SPIKED_HOOK, SPIKED), "wd"]
    contexts = pd.read_csv(res.out / "top_contexts.csv")
    assert (contexts["window_position"] >= 1).all()
    config = json.loads((res.out / "config.json").read_text())
    assert config["config"]["exclude_positions"] == 1
    assert config["config"]["exclude_special"] is False and config["config"]["bos"] is False
    assert config["n_tokens"] == TOKENS and config["n_tokens_kept"] == TOKENS - n_windows


def test_bos_prepends_and_keeps_the_token_count(tiny_dir, corpus, tmp_path):
    model = load_model(str(tiny_dir))
    res = run_rank(
        rank_cfg(tiny_dir, corpus, tmp_path / "bos", bos=True, exclude_special=True),
        model=model,
        progress=False,
    )
    bos = model.tokenizer.bos_token_id
    tokens = res.store.window_tokens()
    assert tokens.shape == (TOKENS // SEQLEN, SEQLEN) and res.store.n_tokens == TOKENS
    assert (tokens[:, 0] == bos).all() and res.store.bos
    # the same windows as without --bos, shifted right by the BOS
    plain = sample_windows(load_tokens(model.tokenizer, str(corpus)), TOKENS, SEQLEN, seed=0)
    np.testing.assert_array_equal(tokens[:, 1:], plain[:, :-1].numpy())
    # --exclude-special leaves out exactly the BOS rows (the corpus holds no special token)
    assert (res.table["n_tokens"] == TOKENS - TOKENS // SEQLEN).all()
    x = np.asarray(res.store.array("blocks.0.mlp.hook_pre"))
    wd = res.table[res.table["layer"] == 0]["wd"].to_numpy()
    keep = res.store.positions() > 0
    np.testing.assert_array_equal(wd, wasserstein_to_gaussian(x[keep]).numpy())
    config = json.loads((res.out / "config.json").read_text())
    assert config["config"]["bos"] is True and config["config"]["exclude_special"] is True
    assert config["n_tokens"] == TOKENS
