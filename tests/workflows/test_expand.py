"""``run_expand`` / ``run_grid`` called directly on a tiny local Llama and a text corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from wasserstein_neurons import load_model
from wasserstein_neurons.bridge import native_sdpa
from wasserstein_neurons.evaluate import perplexity
from wasserstein_neurons.pruning import sequential_prune
from wasserstein_neurons.workflows import (
    EvalSettings,
    ExpandConfig,
    PruneConfig,
    eval_windows_for,
    run_eval,
    run_expand,
    run_grid,
    run_prune,
)
from wasserstein_neurons.workflows.expand import RESULT_COLUMNS, parse_sparsity

KEY = ["method", "experts", "pattern"]


def settings(tiny_dir, corpus) -> dict:
    return dict(model=str(tiny_dir), dataset=str(corpus), seqlen=32, eval_tokens=128, batch_size=4)


def expand_cfg(tiny_dir, corpus, out, **kw) -> ExpandConfig:
    base = dict(
        out=str(out),
        nsamples=6,
        kmeans_restarts=2,
        min_cluster_tokens=0,
        sparsity=0.5,
        **settings(tiny_dir, corpus),
    )
    base.update(kw)
    return ExpandConfig(**base)


@pytest.fixture(scope="module")
def expanded(tiny_dir, corpus, tmp_path_factory):
    """run_expand with experts=1 and experts=2 (same windows)."""
    root = tmp_path_factory.mktemp("expand")
    runs = {}
    for k in (1, 2):
        cfg = expand_cfg(tiny_dir, corpus, root / f"k{k}", experts=k)
        runs[k] = (cfg, run_expand(cfg, progress=False))
    return runs


def test_results_rows_and_columns(expanded, tiny_dir, corpus):
    dense_ppl = run_eval(EvalSettings(**settings(tiny_dir, corpus)), progress=False)["perplexity"]
    expected = {1: ["dense", "sparsegpt"], 2: ["dense", "sparse_expansion", "sparsegpt"]}
    for k, (cfg, table) in expanded.items():
        saved = pd.read_csv(f"{cfg.out}/results.csv", dtype={"pattern": str})
        assert tuple(saved.columns) == RESULT_COLUMNS == tuple(table.columns)
        assert saved["method"].tolist() == expected[k]
        assert saved["perplexity"].tolist() == pytest.approx(table["perplexity"].tolist())
        dense, *pruned = saved.to_dict(orient="records")
        assert dense["pattern"] == "dense" and dense["sparsity"] == 0
        assert dense["perplexity"] == pytest.approx(dense_ppl, rel=1e-12)
        assert dense["relative_flops"] == 1 and dense["relative_params"] == 1
        for row in pruned:
            assert row["pattern"] == "0.5" and row["sparsity"] == 0.5
            assert row["perplexity"] != dense["perplexity"]
        sgpt = saved[saved["method"] == "sparsegpt"].iloc[0]
        assert sgpt["experts"] == 1
        assert sgpt["relative_flops"] == pytest.approx(0.5, abs=0.01)
        assert sgpt["params"] < dense["params"]
        assert (saved["nsamples"] == 6).all() and (saved["seqlen"] == 32).all()
        assert (saved["eval_tokens"] == 4 * 31).all()
        config = json.loads(Path(cfg.out, "config.json").read_text())
        assert config["finished"] and config["command"] == "expand"
        assert config["config"]["experts"] == k
        layers = pd.read_csv(f"{cfg.out}/layers.csv")
        assert set(layers["method"]) == set(expected[k][1:])
    # k = 2: the SE row has two experts, ~k x the parameters and about SparseGPT's FLOPs
    _, t2 = expanded[2]
    se = t2[t2["method"] == "sparse_expansion"].iloc[0]
    sgpt = t2[t2["method"] == "sparsegpt"].iloc[0]
    assert se["experts"] == 2
    assert se["params"] > 1.8 * sgpt["params"]
    assert sgpt["flops_per_token"] < se["flops_per_token"] < 1.2 * sgpt["flops_per_token"]
    assert se["perplexity"] != sgpt["perplexity"]
    # the SparseGPT cell does not depend on the number of experts of the run
    _, t1 = expanded[1]
    assert t1.iloc[1]["perplexity"] == sgpt["perplexity"]


def test_sparsegpt_row_is_sequential_prune(expanded, tiny_dir, corpus):
    """k = 1 is SparseGPT: the same calibration windows through ``sequential_prune`` with the
    builder's attention path (native sdpa) give the same perplexity, bit for bit."""
    cfg, table = expanded[2]
    model = load_model(str(tiny_dir))
    cal = cfg.calibration_windows(model)
    evw = eval_windows_for(model, cfg)
    assert tuple(cal.shape) == (6, 32)
    with native_sdpa(model.hf_model):
        sequential_prune(
            model, cal, "sparsegpt", cfg.spec(), batch_size=cfg.batch_size, progress=False
        )
    ppl = perplexity(model, evw, batch_size=cfg.batch_size, progress=False).perplexity
    sgpt = table[table["method"] == "sparsegpt"]["perplexity"].iloc[0]
    assert sgpt == ppl


def test_sparsegpt_row_matches_run_prune(expanded, tiny_dir, corpus, tmp_path):
    """run_prune(sparsegpt) on the same windows: same calibration, same within-layer order and
    spec, only the calibration attention path differs (bridge eager vs native sdpa)."""
    cfg, table = expanded[2]
    row = run_prune(
        PruneConfig(
            out=str(tmp_path / "prune"),
            method="sparsegpt",
            sparsity=cfg.sparsity,
            nsamples=cfg.nsamples,
            seed=cfg.seed,
            **settings(tiny_dir, corpus),
        ),
        progress=False,
    )
    ppl = table.set_index("method")["perplexity"]
    dense, sgpt = ppl["dense"], ppl["sparsegpt"]
    assert row["perplexity_before"] == dense
    assert row["perplexity_after"] == pytest.approx(sgpt, rel=1e-6)


def _magnitude_perplexity(tiny_dir, windows, sparsity=0.5) -> float:
    """Every MLP weight: zero its round(s * numel) smallest |w|; exp(mean NLL) with torch."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                w = lin.weight
                drop = math.floor(sparsity * w.numel() + 0.5)
                w.view(-1)[w.abs().view(-1).argsort()[:drop]] = 0
        logits = hf(windows, use_cache=False).logits.double()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(float(nll))


GRID = dict(grid_sparsities=("0.5",), grid_experts=(1, 2), baselines=("magnitude",))


def test_grid_and_resume(tiny_dir, corpus, tmp_path):
    out = tmp_path / "grid"
    table = run_grid(expand_cfg(tiny_dir, corpus, out, **GRID), progress=False)
    assert tuple(table.columns) == RESULT_COLUMNS
    cells = list(zip(table["method"], table["experts"], table["pattern"], strict=True))
    assert sorted(cells) == sorted(
        [
            ("dense", 1, "dense"),
            ("magnitude", 1, "0.5"),
            ("sparsegpt", 1, "0.5"),
            ("sparse_expansion", 2, "0.5"),
        ]
    )
    saved = pd.read_csv(out / "results.csv", dtype={"pattern": str})
    assert tuple(saved.columns) == RESULT_COLUMNS and len(saved) == 4
    assert (out / "grid.png").stat().st_size > 1000
    config = json.loads((out / "config.json").read_text())
    assert config["finished"] and config["command"] == "expand --grid"
    assert len(config["results"]) == 4

    # the magnitude baseline against pruning by hand
    model = load_model(str(tiny_dir))
    windows = eval_windows_for(model, expand_cfg(tiny_dir, corpus, out))
    mag = saved[saved["method"] == "magnitude"].iloc[0]
    assert mag["perplexity"] == pytest.approx(_magnitude_perplexity(tiny_dir, windows), rel=1e-4)
    assert mag["relative_flops"] == pytest.approx(0.5, abs=1e-6)

    # resume: drop the SE row, mark a kept row; only the dropped cell is computed again
    first = saved.set_index(KEY)
    kept = saved[saved["method"] != "sparse_expansion"].copy()
    kept.loc[kept["method"] == "magnitude", "perplexity"] = 12345.0
    kept.to_csv(out / "results.csv", index=False)
    again = run_grid(expand_cfg(tiny_dir, corpus, out, resume=True, **GRID), progress=False)
    assert len(again) == 4
    after = pd.read_csv(out / "results.csv", dtype={"pattern": str}).set_index(KEY)
    assert sorted(after.index) == sorted(first.index)
    assert after.loc[("magnitude", 1, "0.5"), "perplexity"] == 12345.0  # not recomputed
    for cell in [("dense", 1, "dense"), ("sparsegpt", 1, "0.5")]:
        # timings are measured per run: equal values mean the rows were carried over
        for col in ("perplexity", "build_seconds", "eval_seconds"):
            assert after.loc[cell, col] == first.loc[cell, col], (cell, col)
    se = ("sparse_expansion", 2, "0.5")
    se_new, se_old = after.loc[se], first.loc[se]
    assert se_new["perplexity"] == pytest.approx(se_old["perplexity"], rel=1e-9)
    assert se_new["eval_seconds"] != se_old["eval_seconds"]
    assert json.loads((out / "config.json").read_text())["finished"]


def test_grid_resume_keeps_one_layer_summary_per_cell(tiny_dir, corpus, tmp_path):
    out = tmp_path / "grid"
    grid = dict(grid_sparsities=("0.5",), grid_experts=(1,), baselines=("magnitude",))
    run_grid(expand_cfg(tiny_dir, corpus, out, **grid), progress=False)
    layers = pd.read_csv(out / "layers.csv")
    per_cell = layers.groupby(KEY).size()
    assert (per_cell == 6).all()  # 2 layers x (gate, up, down)
    saved = pd.read_csv(out / "results.csv", dtype={"pattern": str})
    saved[saved["method"] != "sparsegpt"].to_csv(out / "results.csv", index=False)
    run_grid(expand_cfg(tiny_dir, corpus, out, resume=True, **grid), progress=False)
    after = pd.read_csv(out / "layers.csv").groupby(KEY).size()
    assert after.to_dict() == per_cell.to_dict()


@pytest.mark.parametrize(
    "kw, grid, message",
    [
        (dict(prunen=2), False, "malformed n:m"),
        (dict(sparsity=1.0), False, r"sparsity must be in \[0, 1\)"),
        (dict(experts=0), False, "--experts"),
        (dict(nsamples=0), False, "--nsamples"),
        (dict(eval_tokens=16), False, "--eval-tokens"),
        (dict(baselines=("sparsegpt",)), True, "unknown baseline"),
        (dict(grid_sparsities=("2-4",)), True, "malformed"),
        (dict(grid_experts=(1, 0)), True, "expert counts"),
        (dict(grid_experts=()), True, "at least one"),
    ],
)
def test_bad_config_rejected_before_any_folder(tiny_dir, corpus, tmp_path, kw, grid, message):
    out = tmp_path / "run"
    cfg = expand_cfg(tiny_dir, corpus, out, **{"experts": 2, **kw})
    with pytest.raises(ValueError, match=message):
        (run_grid if grid else run_expand)(cfg, progress=False)
    assert not out.exists()


# --------------------------------------------------------------------- more run_expand / run_grid


def run_cfg(tiny_dir, corpus, out, **kw):
    base = dict(
        model=str(tiny_dir),
        dataset=str(corpus),
        seqlen=32,
        eval_tokens=64,
        batch_size=4,
        nsamples=6,
        kmeans_restarts=2,
        min_cluster_tokens=0,
        out=str(out),
    )
    base.update(kw)
    return ExpandConfig(**base)


def test_run_expand_writes_results(tiny_dir, corpus, tmp_path):
    run = run_cfg(
        tiny_dir, corpus, tmp_path / "run", experts=3, sparsity=0.7, save=str(tmp_path / "m")
    )
    table = run_expand(run, progress=False)
    saved = pd.read_csv(tmp_path / "run" / "results.csv")
    assert tuple(saved.columns) == RESULT_COLUMNS
    assert saved["method"].tolist() == ["dense", "sparse_expansion", "sparsegpt"]
    assert saved["experts"].tolist() == [1, 3, 1]
    assert saved.loc[1:, "sparsity"].tolist() == [0.7, 0.7]
    assert (saved["perplexity"] > 1).all() and (saved["flops_per_token"] > 0).all()
    dense, se, sgpt = saved.to_dict(orient="records")
    assert se["params"] > sgpt["params"] and sgpt["params"] < dense["params"]
    assert sgpt["flops_per_token"] == pytest.approx(0.3 * dense["flops_per_token"], rel=0.02)
    assert table["perplexity"].tolist() == pytest.approx(saved["perplexity"].tolist())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["finished"] and config["config"]["experts"] == 3
    assert (tmp_path / "m" / "expansion.json").is_file()


def test_run_grid_and_plot(tiny_dir, corpus, tmp_path):
    from wasserstein_neurons.plotting import plot_expansion_grid

    grid = dict(grid_sparsities=("0.5", "2:4"), grid_experts=(1, 2), baselines=("wanda",))
    table = run_grid(run_cfg(tiny_dir, corpus, tmp_path / "grid", **grid), progress=False)
    assert tuple(table.columns) == RESULT_COLUMNS
    cells = set(zip(table["method"], table["experts"], table["pattern"], strict=True))
    assert cells == {
        ("dense", 1, "dense"),
        *{(m, 1, p) for m in ("wanda", "sparsegpt") for p in ("0.5", "2:4")},
        ("sparse_expansion", 2, "0.5"),
        ("sparse_expansion", 2, "2:4"),
    }
    assert json.loads((tmp_path / "grid" / "config.json").read_text())["finished"]
    assert (tmp_path / "grid" / "grid.png").stat().st_size > 0
    # resume: nothing left to do, the same rows
    again = run_grid(
        run_cfg(tiny_dir, corpus, tmp_path / "grid", resume=True, **grid), progress=False
    )
    assert again["perplexity"].tolist() == pytest.approx(table["perplexity"].tolist())
    fig = plot_expansion_grid(table)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["0.5", "2:4"]


def test_bad_settings_are_rejected(tiny_dir, corpus, tmp_path):
    with pytest.raises(ValueError, match="n:m"):
        run_cfg(tiny_dir, corpus, tmp_path, prunen=2).validate()
    with pytest.raises(ValueError, match="malformed"):
        parse_sparsity("2-4")
    with pytest.raises(ValueError, match="baseline"):
        run_cfg(tiny_dir, corpus, tmp_path, baselines=("sparsegpt",)).validate(grid=True)
