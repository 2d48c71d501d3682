"""The architecture matrix: every dense decoder of ``TESTED_MODEL_TYPES`` as a tiny random model.

For each model type, built from a config (no download) and saved as a local folder:

* the TransformerLens hook of every MLP linear equals the HF module's own output (input for
  ``down``), and bridge logits equal native HF logits;
* ``rank`` writes a full neuron table (one row per layer and neuron);
* SparseGPT at 0.5 reaches its sparsity in every linear and bridge logits still equal HF logits;
* Sparse Expansion with k = 2 builds (and the HF and bridge forwards both run the experts), and
  k = 1 equals SparseGPT bit for bit;
* perplexity equals a direct ``exp(mean NLL)`` of the HF logits.

Mixture-of-experts and state-space models are refused with a reason.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import make_tokenizer, saved_expansion_tensors

from wasserstein_neurons.architectures import TESTED_MODEL_TYPES
from wasserstein_neurons.bridge import native_modules
from wasserstein_neurons.evaluate import perplexity
from wasserstein_neurons.expansion import ExpansionConfig, ExpertRoutedLinear
from wasserstein_neurons.expansion import build_sparse_expansion as build_se
from wasserstein_neurons.expansion.threads import cpu_threads
from wasserstein_neurons.models import ModelLoadError, load_model
from wasserstein_neurons.offload import layer_resident
from wasserstein_neurons.pruning import sequential_prune
from wasserstein_neurons.workflows import RankConfig, run_rank

D, D_MLP, LAYERS, SEQLEN = 64, 128, 2, 16
pytestmark = pytest.mark.usefixtures("one_thread")

_SIZES = dict(
    hidden_size=D,
    intermediate_size=D_MLP,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
#: Per model type: config overrides (names differ; ``None`` values drop a key).
_OVERRIDES = {
    "gpt2": dict(n_embd=D, n_inner=D_MLP, n_layer=LAYERS, n_head=4, n_positions=256),
    "gptj": dict(n_embd=D, n_inner=D_MLP, n_layer=LAYERS, n_head=4, n_positions=256, rotary_dim=8),
    "opt": dict(ffn_dim=D_MLP, word_embed_proj_dim=D, num_key_value_heads=None, head_dim=None),
    "falcon": dict(
        ffn_hidden_size=D_MLP,
        new_decoder_architecture=False,
        multi_query=True,
        num_key_value_heads=None,
        head_dim=None,
    ),
    "gpt_neox": dict(num_key_value_heads=None),
    "phi3": dict(pad_token_id=0),
    "granite": dict(logits_scaling=2.0),
}


def tiny_config(model_type: str, vocab: int):
    from transformers import AutoConfig

    kw = dict(_SIZES) if model_type not in ("gpt2", "gptj") else {}
    kw.update(_OVERRIDES.get(model_type, {}))
    kw = {k: v for k, v in kw.items() if v is not None}
    return AutoConfig.for_model(model_type, vocab_size=vocab, **kw)


def tiny_hf(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(model_type, len(tok)))
    assert not hf.config.architectures  # from_config leaves it None: load_model must cope
    return hf, tok


def tiny(model_type: str):
    hf, tok = tiny_hf(model_type)
    return load_model(f"tiny-{model_type}", hf_model=hf, tokenizer=tok)


def windows(n=4, seed=0):
    return torch.randint(0, 300, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


def native_logits(model, ids):
    with torch.no_grad(), native_modules(model.hf_model) as hf:
        return hf(ids, use_cache=False).logits


def assert_bridge_matches_hf(model, ids):
    with torch.no_grad():
        bridged = model.bridge(ids)
    torch.testing.assert_close(bridged, native_logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.fixture(params=TESTED_MODEL_TYPES)
def model_type(request):
    return request.param


def test_hooks_equal_hf_module_outputs(model_type):
    model = tiny(model_type)
    adapter, hf, ids = model.adapter, model.hf_model, windows(2)
    assert (adapter.n_layers, adapter.d_model, adapter.d_mlp) == (LAYERS, D, D_MLP)
    seen, handles = {}, []
    for layer in range(LAYERS):
        for role in adapter.roles:
            module = adapter.linear(hf, layer, role)

            def grab(mod, args, out, key=(layer, role)):
                seen[key] = (args[0] if key[1] == "down" else out).detach().clone()

            handles.append(module.register_forward_hook(grab))
    try:
        _, cache = model.bridge.run_with_cache(ids)
    finally:
        for h in handles:
            h.remove()
    for (layer, role), value in seen.items():
        hooked = cache[adapter.hook_name(layer, role)]  # [batch, pos, d]
        # OPT's layer flattens to [batch * pos, d] before fc1: same values, other shape
        torch.testing.assert_close(hooked, value.reshape(hooked.shape), rtol=0, atol=0)
    assert_bridge_matches_hf(model, ids)


def test_rank_writes_a_full_table(model_type, tmp_path, corpus):
    hf, tok = tiny_hf(model_type)
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    cfg = RankConfig(
        out=str(tmp_path / "run"),
        model=str(tmp_path / "model"),
        dataset=str(corpus),
        tokens=256,
        seqlen=SEQLEN,
        keep_activations=False,
    )
    run_rank(cfg, progress=False)
    table = pd.read_csv(tmp_path / "run" / "neurons.csv")
    assert len(table) == LAYERS * D_MLP
    assert table.groupby("layer")["neuron"].nunique().tolist() == [D_MLP] * LAYERS
    assert table["wd"].notna().all() and (table["wd"] > 0).all()


def test_sparsegpt_half_keeps_bridge_and_hf_equal(model_type):
    model = tiny(model_type)
    sequential_prune(model, windows(), "sparsegpt", 0.5, batch_size=2, progress=False)
    for layer in range(LAYERS):
        for role in model.adapter.roles:
            w = model.adapter.weight(model.hf_model, layer, role)
            assert (w == 0).sum().item() == w.numel() // 2, (layer, role)
    assert_bridge_matches_hf(model, windows(2, seed=1))


def test_expansion_k2_builds_and_k1_is_sparsegpt(model_type):
    def expand(model, k):  # eager attention, like sequential_prune on the bridge
        cfg = ExpansionConfig(
            n_experts=k,
            sparsity=0.5,
            batch_size=2,
            kmeans_restarts=2,
            min_cluster_tokens=0,
            sdpa=False,
        )
        return build_se(model, windows(), cfg, progress=False)

    two = tiny(model_type)
    expand(two, 2)
    module = two.adapter.linear(two.hf_model, 1, "down")
    assert isinstance(module, ExpertRoutedLinear) and module.n_experts == 2
    assert_bridge_matches_hf(two, windows(2, seed=1))

    one, ref = tiny(model_type), tiny(model_type)
    expand(one, 1)
    with cpu_threads(1, torch.device("cpu")):
        sequential_prune(ref, windows(), "sparsegpt", 0.5, batch_size=2, progress=False)
    for layer in range(LAYERS):
        for role in one.adapter.roles:
            got = one.adapter.linear(one.hf_model, layer, role).expert_weight(0)
            assert torch.equal(got, ref.adapter.weight(ref.hf_model, layer, role)), (layer, role)


def test_offloaded_prune_equals_in_memory(model_type, tmp_path):
    """``--offload disk`` on the saved tiny model: the same logits, pruned weights and
    perplexity as the in-memory run, bit for bit (fused QKV / gate-up views re-derived)."""
    hf, tok = tiny_hf(model_type)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids, got = windows(), {}
    for offload in (None, "disk"):
        model = load_model(str(tmp_path), offload=offload)
        with torch.no_grad():
            logits = model.bridge(ids[:2])
        sequential_prune(model, ids, "sparsegpt", 0.5, batch_size=2, progress=False)
        ppl = perplexity(model, ids, batch_size=2, progress=False).perplexity
        weights = {}
        for layer in range(LAYERS):
            with layer_resident(model.offload, layer, keep_edits=False), torch.no_grad():
                for role in model.adapter.roles:
                    weights[layer, role] = model.adapter.weight(model.hf_model, layer, role).clone()
        got[offload] = logits, ppl, weights
    (ref_logits, ref_ppl, ref_w), (logits, ppl, w) = got[None], got["disk"]
    assert torch.equal(ref_logits, logits) and ref_ppl == ppl
    for key, weight in ref_w.items():
        assert torch.equal(weight, w[key]), key
        assert (weight == 0).sum().item() == weight.numel() // 2, key


def test_offloaded_expansion_stores_experts_with_their_layer(model_type, tmp_path):
    """Sparse Expansion (k = 2) on the offloaded model: after the build every layer parameter,
    experts included, is a placeholder (the experts live in the scratch files), and the
    expanded model's logits and saved experts equal the in-memory build's."""
    from wasserstein_neurons.expansion import save_expanded

    hf, tok = tiny_hf(model_type)
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    cfg = ExpansionConfig(
        n_experts=2, sparsity=0.5, batch_size=2, kmeans_restarts=2, min_cluster_tokens=0, sdpa=False
    )
    got = {}
    for offload in (None, "disk"):
        model = load_model(str(tmp_path / "model"), offload=offload)
        build_se(model, windows(), cfg, progress=False)
        if offload:
            layers = model.adapter.decoder_layers(model.hf_model)
            assert all(p.is_meta for layer in layers for p in layer.parameters())
        with torch.no_grad():
            logits = model.bridge(windows(2, seed=1))
        saved = save_expanded(model, tmp_path / f"se-{offload}", cfg)
        got[offload] = logits, saved_expansion_tensors(saved)
    assert torch.equal(got[None][0], got["disk"][0])
    assert got[None][1].keys() == got["disk"][1].keys()
    for key, t in got[None][1].items():
        assert torch.equal(t, got["disk"][1][key]), key


def test_perplexity_is_exp_mean_nll(model_type):
    model, ids = tiny(model_type), windows(3, seed=2)
    got = perplexity(model, ids, batch_size=2, progress=False).perplexity
    logits = native_logits(model, ids).double()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    assert got == pytest.approx(math.exp(nll.item()), rel=1e-5)


# ------------------------------------------------------------------------------ fused gate/up
def test_fused_gate_up_rows_are_the_real_parameter():
    model = tiny("phi3")
    adapter, hf = model.adapter, model.hf_model
    fused = hf.model.layers[0].mlp.gate_up_proj.weight  # [2 * d_mlp, d_model]
    adapter.weight(hf, 0, "gate")[5] = 0.0
    adapter.weight(hf, 0, "up")[7] = 0.0
    assert (fused[5] == 0).all() and (fused[D_MLP + 7] == 0).all()
    assert torch.count_nonzero(fused) == fused.numel() - 2 * D
    assert "model.layers.0.mlp.gate_up_proj.weight" in {
        k.replace("._original_component", "") for k in hf.state_dict()
    }
    assert_bridge_matches_hf(model, windows(2))


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "model_type, reason",
    [
        ("mixtral", "mixture of experts"),
        ("qwen2_moe", "mixture of experts"),
        ("olmoe", "mixture of experts"),
        ("mamba", "no MLP"),
    ],
)
def test_moe_and_ssm_are_refused_with_a_reason(model_type, reason):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer()
    kw = dict(_SIZES, num_local_experts=4, num_experts=4, num_experts_per_tok=2)
    kw.update(moe_intermediate_size=32, shared_expert_intermediate_size=32)
    if model_type == "mamba":
        kw = dict(hidden_size=D, num_hidden_layers=LAYERS)
    hf = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, vocab_size=len(tok), **kw)
    )
    with pytest.raises(ModelLoadError, match=f"{model_type}.*{reason}.*models"):
        load_model(model_type, hf_model=hf, tokenizer=tok)


def test_moe_folder_is_refused_before_its_weights_load(tmp_path, monkeypatch):
    """A saved MoE checkpoint is refused from its config alone: no weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer()
    cfg = AutoConfig.for_model(
        "mixtral", vocab_size=len(tok), **dict(_SIZES, num_local_experts=4, num_experts_per_tok=2)
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ModelLoadError, match="mixtral.*num_local_experts = 4.*models"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("model_type", TESTED_MODEL_TYPES)
def test_dense_configs_pass_the_early_moe_check(model_type):
    from wasserstein_neurons.architectures import refuse_from_config

    refuse_from_config(tiny_config(model_type, 300))  # raises for a MoE config


def test_models_command_lists_the_matrix(capsys):
    from wasserstein_neurons.cli import main

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tested = [line for line in lines if "  tested  " in line]
    listed = {t.strip() for line in tested for t in line.split("[")[1].rstrip("]").split(",")}
    assert set(TESTED_MODEL_TYPES) <= listed
    assert len(tested) == len(TESTED_MODEL_TYPES)
    assert any("MixtralForCausalLM" in line and "mixture-of-experts" in line for line in lines)
