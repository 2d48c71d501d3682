"""Tests of the Sparse Expansion builder, its costs and save/load (tiny random models)."""

from __future__ import annotations

import json
import math
import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import make_config, make_tiny_model, make_tokenizer, saved_expansion_tensors

from wasserstein_neurons.bridge import native_sdpa
from wasserstein_neurons.evaluate import perplexity
from wasserstein_neurons.expansion import EXPANSION_SUMMARY_COLUMNS as SUMMARY_COLUMNS
from wasserstein_neurons.expansion import (
    ExpansionConfig,
    ExpertRoutedLinear,
    SmallClusterWarning,
    apply_expansion,
    build_sparse_expansion,
    expanded_modules,
    load_expanded,
    mlp_cost,
    save_expanded,
)
from wasserstein_neurons.expansion.threads import cpu_threads
from wasserstein_neurons.pruning import PruneSpec, n_to_prune, sequential_prune
from wasserstein_neurons.workflows.expand import (
    parse_sparsity,
)

N_WINDOWS, SEQLEN, BATCH = 6, 32, 4  # two calibration batches, the last one smaller


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP barriers
    make every small kernel 10-100x slower (this file: 36 s with 1 thread, 170 s with 2)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def windows(n=N_WINDOWS, seqlen=SEQLEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n, seqlen), generator=g)


def cfg(**kw):
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("kmeans_restarts", 2)
    kw.setdefault("min_cluster_tokens", 0)
    return ExpansionConfig(**kw)


def build(model, **kw):
    return build_sparse_expansion(model, windows(), cfg(**kw), progress=False)


def threads(n):
    return cpu_threads(n, torch.device("cpu"))


def logits(model, ids):
    with torch.no_grad():
        return model.hf_model(ids, use_cache=False).logits


# ------------------------------------------------------------------------------ k = 1
@pytest.mark.parametrize("sdpa", [False, True], ids=["bridge", "sdpa"])
@pytest.mark.parametrize("within", [False, True], ids=["one-pass", "within-layer-seq"])
def test_one_expert_is_sparsegpt_exactly(sdpa, within):
    se, ref = make_tiny_model("llama"), make_tiny_model("llama")
    summary = build(se, n_experts=1, sparsity=0.5, sdpa=sdpa, within_layer_sequential=within)
    # the same pipeline: same thread count (SparseGPT's rounding depends on it) and attention
    with threads(1), native_sdpa(ref.hf_model) if sdpa else nullcontext():
        sequential_prune(
            ref,
            windows(),
            "sparsegpt",
            PruneSpec(sparsity=0.5),
            batch_size=BATCH,
            within_layer_sequential=within,
            progress=False,
        )
    for layer in range(2):
        for role in ("gate", "up", "down"):
            module = se.adapter.linear(se.hf_model, layer, role)
            assert isinstance(module, ExpertRoutedLinear) and module.n_experts == 1
            assert torch.equal(
                module.expert_weight(0), ref.adapter.weight(ref.hf_model, layer, role)
            )
    ids = windows(4, seed=1)
    assert (
        perplexity(se, ids, progress=False).perplexity
        == perplexity(ref, ids, progress=False).perplexity
    )
    assert (summary["experts"] == 1).all() and (summary["fallbacks"] == 0).all()


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_one_expert_is_sparsegpt_other_families(family):
    se, ref = make_tiny_model(family), make_tiny_model(family)
    build(se, n_experts=1, sparsity=0.5, sdpa=False)
    with threads(1):
        sequential_prune(ref, windows(), "sparsegpt", 0.5, batch_size=BATCH, progress=False)
    for layer in range(2):
        for role in ("up", "down"):
            w = se.adapter.linear(se.hf_model, layer, role).expert_weight(0)
            assert torch.equal(w, ref.adapter.weight(ref.hf_model, layer, role))
    ids = windows(2, seed=1)
    torch.testing.assert_close(logits(se, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ experts
def test_unpruned_experts_give_dense_logits():
    model = make_tiny_model("llama")
    ids = windows(3, seed=2)
    dense = logits(model, ids)
    summary = build(model, n_experts=4, sparsity=0.0)
    assert len(expanded_modules(model)) == 6
    assert (summary["experts"] == 4).all()
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("pattern", ["0.7", "2:4"])
def test_every_expert_has_the_requested_sparsity(family, pattern):
    sparsity, n, m = parse_sparsity(pattern)
    model = make_tiny_model(family)
    summary = build(model, n_experts=3, sparsity=sparsity, prunen=n, prunem=m)
    modules = expanded_modules(model)
    assert len(modules) == 2 * len(model.adapter.roles)
    for module in modules.values():
        assert module.n_experts == 3
        for e in range(3):
            w = module.expert_weight(e)
            zeros = (w == 0).sum(1)
            if m:
                groups = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)
                assert (groups == n).all()
            else:  # SparseGPT's reference rule: an exact count per column block of all rows
                assert int(zeros.sum()) == n_to_prune(sparsity, w.numel())
    assert summary["sparsity"].tolist() == pytest.approx([sparsity] * len(summary), abs=0.01)
    assert torch.isfinite(logits(model, windows(2, seed=3))).all()


def test_gate_and_up_share_one_router_counted_once():
    model = make_tiny_model("llama")
    summary = build(model, n_experts=4, sparsity=0.5)
    gate = model.adapter.linear(model.hf_model, 0, "gate")
    up = model.adapter.linear(model.hf_model, 0, "up")
    down = model.adapter.linear(model.hf_model, 0, "down")
    assert gate.router is up.router and down.router is not gate.router
    row = summary.set_index(["layer", "role"])
    assert row.loc[(0, "up"), "flops_per_token"] == up.flops_per_token(include_router=False)
    assert row.loc[(0, "gate"), "flops_per_token"] == gate.flops_per_token(include_router=True)
    cost = mlp_cost(model)
    assert cost["flops_per_token"] == pytest.approx(summary["flops_per_token"].sum())
    assert cost["params"] == summary["params"].sum()


def test_summary_columns_and_values():
    model = make_tiny_model("llama")
    summary = build(model, n_experts=2, sparsity=0.5)
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    assert len(summary) == 6
    assert summary[["layer", "role"]].values.tolist() == [
        [layer, role] for layer in range(2) for role in ("gate", "up", "down")
    ]
    assert (summary["n_tokens"] == N_WINDOWS * SEQLEN).all()
    assert (summary["cluster_min"] <= summary["cluster_max"]).all()
    assert summary["rel_error"].between(0, 1).all()
    assert (summary["pca_dim"] == summary["d_in"] // 32).all()


# ------------------------------------------------------------------------------ tiny clusters
def test_empty_clusters_fall_back_without_nan_and_warn():
    model = make_tiny_model("llama")
    few = windows(1, seqlen=6)  # 6 tokens, 16 clusters: at least 10 empty
    with pytest.warns(SmallClusterWarning, match="fell back"):
        summary = build_sparse_expansion(
            model, few, cfg(n_experts=16, sparsity=0.5, min_cluster_tokens=None), progress=False
        )
    assert (summary["fallbacks"] >= 10).all()
    assert (summary["small_clusters"] == 16).all()
    for module in expanded_modules(model).values():
        w = module.dense_weights()
        assert torch.isfinite(w).all()
    assert torch.isfinite(logits(model, windows(2, seed=4))).all()


def test_small_clusters_warn_with_default_threshold():
    model = make_tiny_model("llama")
    with pytest.warns(SmallClusterWarning, match="few calibration tokens"):
        build_sparse_expansion(
            model, windows(), cfg(n_experts=4, min_cluster_tokens=None), progress=False
        )
    model = make_tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallClusterWarning)
        build(model, n_experts=4, min_cluster_tokens=0)


# ------------------------------------------------------------------------------ neuron-level
def test_neuron_level_expansion_keeps_other_rows_shared():
    model = make_tiny_model("llama")
    rows = torch.tensor([3, 17, 40, 99])
    summary = build(model, n_experts=3, sparsity=0.5, neuron_rows={0: rows})
    adapter, hf = model.adapter, model.hf_model
    other = torch.ones(adapter.d_mlp, dtype=torch.bool)
    other[rows] = False
    for role in ("gate", "up"):
        module = adapter.linear(hf, 0, role)
        assert isinstance(module, ExpertRoutedLinear)
        w = module.dense_weights()  # [k, out, in]
        for e in range(1, 3):
            assert torch.equal(w[e][other], w[0][other])
        assert not torch.equal(w[1][rows], w[0][rows])
        # SparseGPT's block rule: exact counts over the expert rows and over the shared rows
        for e in range(3):
            assert int((w[e][rows] == 0).sum()) == len(rows) * adapter.d_model // 2
            assert int((w[e][other] == 0).sum()) == int(other.sum()) * adapter.d_model // 2
        # layer 1 is not listed: pruned once, in place
        assert not isinstance(adapter.linear(hf, 1, role), ExpertRoutedLinear)
    assert not isinstance(adapter.linear(hf, 0, "down"), ExpertRoutedLinear)
    assert int((adapter.weight(hf, 0, "down") == 0).sum()) == adapter.d_model * adapter.d_mlp // 2
    by = summary.set_index(["layer", "role"])
    assert by.loc[(0, "gate"), "expert_rows"] == 4 and by.loc[(0, "down"), "experts"] == 1
    assert by.loc[(1, "up"), "experts"] == 1


# ------------------------------------------------------------------------------ hooks, perplexity
def test_bridge_hooks_report_expanded_outputs():
    model = make_tiny_model("llama")
    build(model, n_experts=3, sparsity=0.7)
    gate = model.adapter.linear(model.hf_model, 1, "gate")
    seen = {}
    handle = gate.register_forward_hook(lambda m, a, o: seen.setdefault("y", o.detach()))
    ids = windows(2, seed=5)
    try:
        with torch.no_grad():
            bridge_logits, cache = model.bridge.run_with_cache(ids)
    finally:
        handle.remove()
    pre = cache["blocks.1.mlp.hook_pre"]
    torch.testing.assert_close(pre.reshape(seen["y"].shape), seen["y"], rtol=0, atol=0)
    torch.testing.assert_close(bridge_logits, logits(model, ids), rtol=1e-5, atol=1e-5)


def test_perplexity_runs_the_expert_modules():
    model = make_tiny_model("llama")
    ids = windows(4, seed=6)
    dense = perplexity(model, ids, progress=False).perplexity
    build(model, n_experts=3, sparsity=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no sdpa/bridge disagreement
        res = perplexity(model, ids, progress=False)
    assert res.backend == "sdpa"
    lg = logits(model, ids)[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        lg.reshape(-1, lg.shape[-1]).double(), ids[:, 1:].reshape(-1)
    )
    assert res.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert abs(res.perplexity - dense) > 1e-3 * dense


# ------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
def test_save_and_apply_round_trip(tmp_path, compact):
    model = make_tiny_model("llama")
    exp_cfg = cfg(n_experts=3, sparsity=0.5, compact=compact, neuron_rows={1: [2, 5, 9]})
    build_sparse_expansion(model, windows(), exp_cfg, progress=False)
    ids = windows(2, seed=7)
    ref = logits(model, ids)
    save_expanded(model, tmp_path / "se", exp_cfg)
    meta = json.loads((tmp_path / "se" / "expansion.json").read_text())
    assert meta["base_model"] == "tiny-llama" and meta["config"]["n_experts"] == 3
    fresh = make_tiny_model("llama")
    loaded_cfg = apply_expansion(fresh, tmp_path / "se")
    assert loaded_cfg.neuron_rows[1].tolist() == [2, 5, 9] and loaded_cfg.compact == compact
    assert torch.equal(logits(fresh, ids), ref)
    gate = fresh.adapter.linear(fresh.hf_model, 1, "gate")
    assert gate.router is fresh.adapter.linear(fresh.hf_model, 1, "up").router
    assert gate.is_compact == compact


def test_saved_expansion_has_a_file_per_layer_and_first_format_loads(tmp_path):
    """``save_expanded`` writes each layer's modules to their own file (one layer's experts in
    memory at a time); a folder of the first format (every tensor in ``expansion.safetensors``,
    entries without files) still loads to the same model."""
    from safetensors.torch import save_file

    model = make_tiny_model("llama")
    build(model, n_experts=2, sparsity=0.5)
    ids = windows(2, seed=3)
    save_expanded(model, tmp_path / "se")
    names = sorted(f.name for f in (tmp_path / "se").glob("*.safetensors"))
    assert names == ["expansion-00000.safetensors", "expansion-00001.safetensors"]
    meta = json.loads((tmp_path / "se" / "expansion.json").read_text())
    assert {(m["layer"], m["file"]) for m in meta["modules"]} == {
        (0, names[0]),
        (1, names[1]),
    }
    old = tmp_path / "old"
    old.mkdir()
    save_file(saved_expansion_tensors(tmp_path / "se"), str(old / "expansion.safetensors"))
    meta["format"] = "wasserstein_neurons.sparse_expansion/1"
    meta["modules"] = [{k: v for k, v in m.items() if k != "file"} for m in meta["modules"]]
    (old / "expansion.json").write_text(json.dumps(meta))
    for folder in (tmp_path / "se", old):
        fresh = make_tiny_model("llama")
        apply_expansion(fresh, folder)
        assert torch.equal(logits(fresh, ids), logits(model, ids)), folder.name


def test_load_expanded_from_a_model_folder(tmp_path):
    tok = make_tokenizer()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(make_config("llama", len(tok))).save_pretrained(
        tmp_path / "base"
    )
    tok.save_pretrained(tmp_path / "base")
    from wasserstein_neurons.models import load_model

    model = load_model(str(tmp_path / "base"))
    build(model, n_experts=2, sparsity=0.5)
    ids = windows(2, seed=8)
    save_expanded(model, tmp_path / "se")
    loaded, loaded_cfg = load_expanded(tmp_path / "se")
    assert loaded_cfg is None
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_experts_do_not_depend_on_workers():
    """Experts built side by side in threads (and routers fitted that way) are the very same
    tensors as those built one after another."""
    built = []
    for workers in (1, 3):
        model = make_tiny_model("llama")
        summary = build(model, n_experts=4, sparsity=0.6, workers=workers)
        built.append((model.hf_model.state_dict(), summary))
    (a, sa), (b, sb) = built
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert sa["rel_error"].tolist() == sb["rel_error"].tolist()
    with pytest.raises(ValueError, match="workers"):
        ExpansionConfig(workers=0)


@pytest.mark.parametrize("pattern", ["0.6", "2:4"])
def test_batched_experts_equal_one_by_one(pattern, monkeypatch):
    """Experts pruned together (``batched_experts=True``, the CUDA default) equal those pruned
    one by one within float rounding: the same zeros, the same weights to 1e-4, the same
    errors; the routers are the very same tensors."""
    from wasserstein_neurons.expansion import expert_pruning

    calls = []
    batched_prune = expert_pruning.prune_batched
    monkeypatch.setattr(
        expert_pruning,
        "prune_batched",
        lambda w, H, *a, **k: (calls.append(len(H)), batched_prune(w, H, *a, **k))[1],
    )
    spec = PruneSpec.from_pattern(pattern)
    kw = dict(n_experts=4, sparsity=spec.sparsity, prunen=spec.prunen, prunem=spec.prunem)
    states, errors = [], []
    for batched in (False, True):
        model = make_tiny_model("llama")
        summary = build(model, layers=(0,), batched_experts=batched, **kw)
        states.append(model.hf_model.state_dict())
        errors.append(summary["rel_error"].to_numpy())
        assert calls == ([4, 4, 4] if batched else [])  # gate and up (one group), down
    one, many = states
    experts = [k for k in one if k.endswith(".weights")]
    assert len({one[k].data_ptr() for k in experts}) == 3  # gate, up, down of layer 0
    for key in one:
        if key in experts:
            assert torch.equal(one[key] == 0, many[key] == 0), key
            torch.testing.assert_close(many[key], one[key], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(one[key], many[key]), key
    np.testing.assert_allclose(errors[1], errors[0], rtol=1e-4)


@pytest.mark.cuda
def test_cuda_build_prunes_experts_batched_like_the_cpu():
    """On CUDA the experts are pruned together by default; the layer-0 experts (whose inputs
    and routers do not depend on earlier pruning) keep nearly the same zeros as on the CPU."""
    cpu, gpu = make_tiny_model("llama"), make_tiny_model("llama", device="cuda")
    for model in (cpu, gpu):
        build(model, n_experts=4, sparsity=0.6, layers=(0,))
    for role in cpu.adapter.roles:
        a = cpu.adapter.linear(cpu.hf_model, 0, role).weights
        b = gpu.adapter.linear(gpu.hf_model, 0, role).weights.cpu()
        assert ((a == 0) == (b == 0)).float().mean().item() > 0.99, role


def test_bad_builder_settings_are_rejected():
    with pytest.raises(ValueError, match="n_experts"):
        ExpansionConfig(n_experts=0)
    with pytest.raises(ValueError, match="unknown role"):
        build(make_tiny_model("gpt2"), roles=("gate",))
    model = make_tiny_model("gpt2")
    build(model, n_experts=2, roles=("up",))
    with pytest.raises(ValueError, match="already expanded"):
        build(model, n_experts=2)
