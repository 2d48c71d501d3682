"""``run_prune`` / ``run_eval`` called directly on a tiny local Llama and a text-file corpus."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from wasserstein_neurons import load_model
from wasserstein_neurons.runs import RunExistsError
from wasserstein_neurons.workflows import (
    EvalSettings,
    PruneConfig,
    eval_windows_for,
    run_eval,
    run_prune,
)

MLP = ("gate_proj", "up_proj", "down_proj")
EVAL = dict(seqlen=32, eval_tokens=128, batch_size=4)


def settings(tiny_dir, corpus) -> dict:
    return dict(model=str(tiny_dir), dataset=str(corpus), **EVAL)


def prune_cfg(tiny_dir, corpus, out, **kw) -> PruneConfig:
    base = dict(out=str(out), nsamples=4, **settings(tiny_dir, corpus))
    base.update(kw)
    return PruneConfig(**base)


def mlp_weights(folder) -> dict[str, torch.Tensor]:
    state = load_file(str(folder / "model.safetensors"))
    return {k: v for k, v in state.items() if any(f".mlp.{m}." in k for m in MLP)}


def direct_perplexity(folder, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) of the HF model in ``folder``: plain transformers + torch."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(windows, use_cache=False).logits.double()
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="mean"
    )
    return math.exp(float(nll))


@pytest.fixture(scope="module")
def dense_eval(tiny_dir, corpus):
    return run_eval(EvalSettings(**settings(tiny_dir, corpus)), progress=False)


def test_run_eval_is_direct_perplexity(tiny_dir, corpus, dense_eval):
    model = load_model(str(tiny_dir))
    windows = eval_windows_for(model, EvalSettings(**settings(tiny_dir, corpus)))
    assert tuple(windows.shape) == (4, 32)
    assert dense_eval["eval_tokens"] == 4 * 31
    assert dense_eval["perplexity"] == pytest.approx(direct_perplexity(tiny_dir, windows), rel=1e-4)
    assert dense_eval["nll"] == pytest.approx(math.log(dense_eval["perplexity"]), rel=1e-12)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_half(tiny_dir, corpus, tmp_path, dense_eval, method):
    out, saved = tmp_path / "prune", tmp_path / "saved"
    cfg = prune_cfg(tiny_dir, corpus, out, method=method, sparsity=0.5, save=str(saved))
    row = run_prune(cfg, progress=False)

    table = pd.read_csv(out / "prune.csv")
    assert len(table) == 1
    assert table.iloc[0]["perplexity_after"] == pytest.approx(row["perplexity_after"], rel=1e-12)
    assert row["method"] == method and row["sparsity"] == 0.5
    assert row["perplexity_before"] == pytest.approx(dense_eval["perplexity"], rel=1e-12)
    assert row["eval_tokens"] == dense_eval["eval_tokens"]
    assert row["achieved_sparsity"] == pytest.approx(0.5, abs=2e-3)

    layers = pd.read_csv(out / "layers.csv")
    assert sorted(zip(layers["layer"], layers["role"], strict=True)) == sorted(
        (layer, role) for layer in range(2) for role in ("gate", "up", "down")
    )

    # the saved model holds exactly the reported sparsity in its MLP weights ...
    weights = mlp_weights(saved)
    assert len(weights) == 6
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert zeros / total == pytest.approx(row["achieved_sparsity"], abs=1e-12)
    # ... and everything else is the dense model's (targets="mlp")
    dense_state = load_file(str(tiny_dir / "model.safetensors"))
    pruned_state = load_file(str(saved / "model.safetensors"))
    for k, v in dense_state.items():
        if k not in weights:
            assert torch.equal(v, pruned_state[k]), k

    # perplexity after = exp(mean NLL) of the reloaded model on the same windows
    reloaded = load_model(str(saved))
    windows = eval_windows_for(reloaded, cfg)
    assert row["perplexity_after"] == pytest.approx(direct_perplexity(saved, windows), rel=1e-4)
    assert row["perplexity_after"] != row["perplexity_before"]

    config = json.loads((out / "config.json").read_text())
    assert config["finished"] and config["command"] == "prune"
    assert config["config"]["method"] == method and config["result"]["sparsity"] == 0.5


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four(tiny_dir, corpus, tmp_path, method):
    saved = tmp_path / "saved"
    cfg = prune_cfg(
        tiny_dir, corpus, tmp_path / "prune", method=method, prunen=2, prunem=4, save=str(saved)
    )
    row = run_prune(cfg, progress=False)
    assert row["sparsity"] == 0.5 and (row["prunen"], row["prunem"]) == (2, 4)
    assert row["achieved_sparsity"] == 0.5
    reloaded = load_model(str(saved))
    for layer in range(reloaded.adapter.n_layers):
        for role in reloaded.adapter.roles:
            w = reloaded.adapter.weight(reloaded.hf_model, layer, role)
            groups = (w == 0).reshape(w.shape[0], -1, 4).sum(dim=-1)
            assert (groups >= 2).all(), (layer, role)
            assert (w == 0).float().mean().item() == 0.5


def test_sparsegpt_quantized_rows(tiny_dir, corpus, tmp_path):
    saved = tmp_path / "saved"
    cfg = prune_cfg(
        tiny_dir, corpus, tmp_path / "prune", method="sparsegpt", wbits=4, save=str(saved)
    )
    row = run_prune(cfg, progress=False)
    assert row["wbits"] == 4
    for name, w in mlp_weights(saved).items():
        for r in range(0, w.shape[0], 17):
            nonzero = w[r][w[r] != 0]
            assert len(torch.unique(nonzero)) <= 16, name


def test_existing_run_and_save_folder_refused(tiny_dir, corpus, tmp_path):
    out = tmp_path / "prune"
    run_prune(prune_cfg(tiny_dir, corpus, out, method="magnitude"), progress=False)
    before = (out / "prune.csv").read_bytes()
    with pytest.raises(RunExistsError):
        run_prune(prune_cfg(tiny_dir, corpus, out, method="wanda"), progress=False)
    assert (out / "prune.csv").read_bytes() == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        run_prune(
            prune_cfg(tiny_dir, corpus, tmp_path / "other", method="magnitude", save=str(busy)),
            progress=False,
        )
    assert not (tmp_path / "other" / "config.json").exists()
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(method="obs"), "unknown pruning method"),
        (dict(method="wanda", wbits=4), "only supported with --method sparsegpt"),
        (dict(method="magnitude", wbits=4), "only supported with --method sparsegpt"),
        (dict(prunen=2), "malformed n:m"),
        (dict(prunem=4), "malformed n:m"),
        (dict(prunen=4, prunem=2), "malformed n:m"),
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
        (dict(nsamples=0), "--nsamples"),
        (dict(targets="attn"), "unknown targets"),
        (dict(eval_tokens=16), "--eval-tokens"),
    ],
)
def test_bad_config_rejected_before_any_folder(tiny_dir, corpus, tmp_path, kw, message):
    out, saved = tmp_path / "prune", tmp_path / "saved"
    cfg = prune_cfg(tiny_dir, corpus, out, save=str(saved), **kw)
    with pytest.raises(ValueError, match=message):
        run_prune(cfg, progress=False)
    assert not out.exists() and not saved.exists()


def test_run_eval_rejects_short_eval(tiny_dir, corpus):
    with pytest.raises(ValueError, match="--eval-tokens"):
        run_eval(EvalSettings(model=str(tiny_dir), dataset=str(corpus), seqlen=64, eval_tokens=63))
