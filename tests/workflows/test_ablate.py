"""``run_ablate`` / ``load_ranking`` called directly on a tiny local Llama and a text corpus."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from wasserstein_neurons import load_model
from wasserstein_neurons.ablation import AblationConfig
from wasserstein_neurons.pruning import n_to_prune
from wasserstein_neurons.ranking import count_for_percent
from wasserstein_neurons.workflows import (
    AblateConfig,
    EvalSettings,
    RankConfig,
    eval_windows_for,
    load_ranking,
    run_ablate,
    run_eval,
    run_rank,
)

SEQLEN, EVAL_TOKENS, BATCH, RANK_TOKENS = 32, 128, 4, 512
STUDY = dict(
    strategies=("wd-top", "random", "wd-bottom"),
    top_percent=5.0,
    neuron_sparsities=(0.5, 0.9),
    method="magnitude",
    seeds=2,
)


def common(tiny_dir, corpus) -> dict:
    return dict(
        model=str(tiny_dir),
        dataset=str(corpus),
        seqlen=SEQLEN,
        eval_tokens=EVAL_TOKENS,
        batch_size=BATCH,
    )


def ablate_cfg(tiny_dir, corpus, out, study=None, **kw) -> AblateConfig:
    base = dict(
        out=str(out),
        study=AblationConfig(**(study or STUDY)),
        rank_tokens=RANK_TOKENS,
        nsamples=4,
        **common(tiny_dir, corpus),
    )
    base.update(kw)
    return AblateConfig(**base)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def rank_dir(tiny_dir, corpus, model, tmp_path_factory):
    """A ranking made the way run_ablate makes its own (same tokens, seqlen, seed)."""
    out = tmp_path_factory.mktemp("rank") / "run"
    cfg = RankConfig(
        out=str(out),
        model=str(tiny_dir),
        dataset=str(corpus),
        tokens=RANK_TOKENS,
        seqlen=SEQLEN,
        batch_size=BATCH,
        keep_activations=False,
    )
    run_rank(cfg, model=model, progress=False)
    return out


@pytest.fixture(scope="module")
def with_ranking(tiny_dir, corpus, model, rank_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "run"
    cfg = ablate_cfg(tiny_dir, corpus, out, ranking=str(rank_dir))
    before = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    results = run_ablate(cfg, model=model, progress=False)
    return cfg, results, before


def test_results_layout(with_ranking, tiny_dir, corpus):
    cfg, results, _ = with_ranking
    saved = pd.read_csv(Path(cfg.out) / "ablation.csv")
    assert len(saved) == len(results) == 1 + 2 + 2 * 2 + 2
    assert saved["perplexity"].tolist() == pytest.approx(results["perplexity"].tolist(), rel=1e-12)
    first = saved.iloc[0]
    assert first["strategy"] == "dense" and first["neuron_sparsity"] == 0
    dense = run_eval(EvalSettings(**common(tiny_dir, corpus)), progress=False)
    assert first["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-12)
    assert (saved.loc[1:, "strategy"] != "dense").all()
    k = count_for_percent(128, STUDY["top_percent"])
    assert (saved["neurons_per_layer"] == k).all() and (saved["method"] == "magnitude").all()

    random = saved[saved["strategy"] == "random"]
    for _, group in random.groupby("neuron_sparsity"):
        assert sorted(group["seed"]) == list(range(STUDY["seeds"]))
    assert sorted(random["neuron_sparsity"].unique()) == [0.5, 0.9]
    # two seeds, two neuron sets
    r9 = random[random["neuron_sparsity"] == 0.9]["perplexity"].tolist()
    assert r9[0] != r9[1]
    for strategy in ("wd-top", "wd-bottom"):
        rows = saved[saved["strategy"] == strategy]
        assert rows["seed"].tolist() == [0, 0] and rows["neuron_sparsity"].tolist() == [0.5, 0.9]
        assert (rows["perplexity"] != first["perplexity"]).all()

    summary = pd.read_csv(Path(cfg.out) / "ablation_summary.csv")
    assert len(summary) == 1 + 3 * 2
    config = json.loads((Path(cfg.out) / "config.json").read_text())
    assert config["finished"] and config["command"] == "ablate"
    assert config["ranking"] == cfg.ranking
    assert (Path(cfg.out) / "ablation.png").stat().st_size > 1000


def test_weights_bit_identical_after_sweep(with_ranking, model):
    _, _, before = with_ranking
    after = model.hf_model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_wd_top_row_matches_manual_ablation(with_ranking, tiny_dir, rank_dir):
    """Zero the smallest |w| of the top-WD neurons' gate/up rows by hand, score with torch."""
    from transformers import AutoModelForCausalLM

    cfg, results, _ = with_ranking
    table = pd.read_csv(rank_dir / "neurons.csv")
    k = count_for_percent(128, STUDY["top_percent"])
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation="eager").eval()
    loaded = load_model(str(tiny_dir))
    windows = eval_windows_for(loaded, cfg)
    sparsity = 0.9
    with torch.no_grad():
        for layer, mlp in enumerate(m.mlp for m in hf.model.layers):
            rows = table[table["hook"] == f"blocks.{layer}.mlp.hook_pre"]
            neurons = rows.nlargest(k, "wd")["neuron"].tolist()
            for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
                drop = n_to_prune(sparsity, w.shape[1])
                for j in neurons:
                    order = w[j].abs().argsort()
                    w[j, order[:drop]] = 0
        logits = hf(windows, use_cache=False).logits.double()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    row = results[(results["strategy"] == "wd-top") & (results["neuron_sparsity"] == sparsity)]
    assert len(row) == 1
    assert row["perplexity"].iloc[0] == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_without_ranking_makes_its_own(with_ranking, tiny_dir, corpus, model, tmp_path):
    cfg_ranked, ranked, _ = with_ranking
    out = tmp_path / "ablate"
    results = run_ablate(ablate_cfg(tiny_dir, corpus, out), model=model, progress=False)
    ranking = out / "ranking"
    config = json.loads((ranking / "config.json").read_text())
    assert config["finished"] and config["command"] == "rank"
    assert config["n_tokens"] == RANK_TOKENS and config["config"]["seqlen"] == SEQLEN
    assert not (ranking / "activations").exists()  # keep_activations=False
    assert json.loads((out / "config.json").read_text())["ranking"] == str(ranking)
    # the same ranking settings as the explicit one, so the same table and the same sweep
    mine = pd.read_csv(ranking / "neurons.csv").sort_values(["hook", "neuron"])
    theirs = load_ranking(cfg_ranked.ranking, str(tiny_dir)).sort_values(["hook", "neuron"])
    assert mine["wd"].tolist() == pytest.approx(theirs["wd"].tolist(), rel=1e-12)
    assert results["strategy"].tolist() == ranked["strategy"].tolist()
    assert results["perplexity"].tolist() == pytest.approx(ranked["perplexity"].tolist(), rel=1e-9)


def test_load_ranking_refuses_other_runs(with_ranking, rank_dir, tiny_dir, tmp_path):
    cfg, _, _ = with_ranking
    table = load_ranking(rank_dir, str(tiny_dir))
    assert len(table) == 2 * 128 and {"hook", "neuron", "wd"} <= set(table.columns)
    # a finished run of another command
    with pytest.raises(ValueError, match="not a finished rank run"):
        load_ranking(cfg.out, str(tiny_dir))
    # an unfinished rank run
    unfinished = tmp_path / "unfinished"
    shutil.copytree(rank_dir, unfinished)
    config = json.loads((unfinished / "config.json").read_text())
    config["finished"] = False
    (unfinished / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a finished rank run"):
        load_ranking(unfinished, str(tiny_dir))
    # made with another model
    with pytest.raises(ValueError, match="made with model"):
        load_ranking(rank_dir, "someone/else")
    # not a run folder at all
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_ranking(tmp_path / "nothing", str(tiny_dir))


def test_run_ablate_refuses_ranking_of_another_model(rank_dir, tiny_dir, corpus, tmp_path):
    from conftest import make_tiny_model

    other = make_tiny_model("llama")  # named "tiny-llama", not the folder the ranking used
    out = tmp_path / "ablate"
    with pytest.raises(ValueError, match="made with model"):
        run_ablate(
            ablate_cfg(tiny_dir, corpus, out, ranking=str(rank_dir)), model=other, progress=False
        )
    assert not (out / "config.json").exists()


@pytest.mark.parametrize(
    "study, kw, message",
    [
        (dict(strategies=("wd-top", "best")), {}, "unknown strategy best"),
        (dict(neuron_sparsities=(0.5, 1.5)), {}, r"sparsity must be in \[0, 1\)"),
        (dict(method="random"), {}, "unknown pruning method"),
        (dict(top_percent=0), {}, "top_percent"),
        (dict(seeds=0), {}, "seeds"),
        ({}, dict(eval_tokens=16), "--eval-tokens"),
        ({}, dict(nsamples=0), "--nsamples"),
        ({}, dict(exclude_positions=-2), "--exclude-positions"),
        ({}, dict(exclude_positions=SEQLEN), "--exclude-positions"),
    ],
)
def test_bad_config_rejected_before_any_folder(tiny_dir, corpus, tmp_path, study, kw, message):
    out = tmp_path / "ablate"
    cfg = ablate_cfg(tiny_dir, corpus, out, study={**STUDY, **study}, **kw)
    with pytest.raises(ValueError, match=message):
        run_ablate(cfg, progress=False)
    assert not out.exists()


def test_reused_ranking_must_use_the_same_positions(rank_dir, tiny_dir, corpus, model, tmp_path):
    for kw, name in ((dict(exclude_positions=1), "exclude_positions"), (dict(bos=True), "bos")):
        cfg = ablate_cfg(tiny_dir, corpus, tmp_path / name, ranking=str(rank_dir), **kw)
        with pytest.raises(ValueError, match=f"{name}=.* \\(this run: "):
            run_ablate(cfg, model=model, progress=False)
        assert not (tmp_path / name / "config.json").exists()


def test_exclusions_reach_its_own_ranking(tiny_dir, corpus, model, tmp_path):
    study = dict(STUDY, strategies=("wd-top",), neuron_sparsities=(0.9,))
    cfg = ablate_cfg(tiny_dir, corpus, tmp_path / "a", study=study, exclude_positions=2)
    results = run_ablate(cfg, model=model, progress=False)
    ranking = tmp_path / "a" / "ranking"
    made = json.loads((ranking / "config.json").read_text())["config"]
    assert made["exclude_positions"] == 2 and made["exclude_special"] is False
    table = pd.read_csv(ranking / "neurons.csv")
    assert (table["n_tokens"] == RANK_TOKENS - 2 * (RANK_TOKENS // SEQLEN)).all()
    recorded = json.loads((tmp_path / "a" / "config.json").read_text())["config"]
    assert recorded["exclude_positions"] == 2
    # the reused ranking with the same settings is accepted
    again = ablate_cfg(tiny_dir, corpus, tmp_path / "b", study=study, exclude_positions=2)
    again.ranking = str(ranking)
    reused = run_ablate(again, model=model, progress=False)
    assert reused["perplexity"].tolist() == pytest.approx(results["perplexity"].tolist(), rel=1e-9)
