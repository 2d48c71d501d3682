"""Tests of perplexity (evaluate.py) on tiny random models."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config, make_tiny_model, make_tokenizer

from wasserstein_neurons.bridge import has_bridge_modules, native_modules
from wasserstein_neurons.evaluate import perplexity, window_nll
from wasserstein_neurons.pruning import sequential_prune


def windows(n=5, seqlen=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n, seqlen), generator=g)


def direct_ppl(hf, ids):
    """exp(mean CE) from the plain HF forward's full logits."""
    with torch.no_grad():
        logits = hf(ids, use_cache=False).logits
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1)
    )
    return math.exp(nll.item())


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_matches_direct_computation(tiny_model, use_sdpa):
    ids = windows()
    ref = direct_ppl(tiny_model.hf_model, ids)
    res = perplexity(tiny_model, ids, batch_size=2, nll_chunk=17, use_sdpa=use_sdpa, progress=False)
    assert res.perplexity == pytest.approx(ref, rel=1e-5)
    assert res.nll_mean == pytest.approx(math.log(ref), rel=1e-5)
    assert res.n_tokens == 5 * 39 and res.n_windows == 5 and res.seqlen == 40
    assert res.backend == ("sdpa" if use_sdpa else "bridge")
    assert res.seconds > 0


def test_bridge_state_restored(tiny_llama):
    hf, bridge = tiny_llama.hf_model, tiny_llama.bridge
    layer0 = hf.model.layers[0]
    impl = hf.config._attn_implementation
    perplexity(tiny_llama, windows(), progress=False)
    assert hf.model.layers[0] is layer0 and has_bridge_modules(hf)
    assert hf.config._attn_implementation == impl
    ids = windows(2, 12)
    _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n == "blocks.0.mlp.hook_pre")
    assert "blocks.0.mlp.hook_pre" in cache
    with torch.no_grad():
        assert torch.equal(bridge(ids), hf(ids).logits)


def test_native_modules_context(tiny_model):
    hf = tiny_model.hf_model
    ids = windows(2, 16)
    with torch.no_grad():
        ref = hf(ids).logits
        with native_modules(hf):
            assert not has_bridge_modules(hf)
            native = hf(ids).logits
    assert has_bridge_modules(hf)
    torch.testing.assert_close(native, ref, rtol=1e-5, atol=1e-5)


def test_activation_editing_hook_falls_back(tiny_llama):
    """A hook that edits activations is invisible to the native path: detect, warn, fall back."""
    ids = windows()

    def kill(x, hook):
        return torch.zeros_like(x)

    with tiny_llama.bridge.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", kill)]):
        ref = direct_ppl(tiny_llama.hf_model, ids)
        with pytest.warns(RuntimeWarning, match="disagree"):
            res = perplexity(tiny_llama, ids, progress=False)
    assert res.backend == "bridge"
    assert res.perplexity == pytest.approx(ref, rel=1e-5)
    assert ref != pytest.approx(direct_ppl(tiny_llama.hf_model, ids), rel=1e-3)


def test_gpt_neox_pruned_attention_falls_back():
    """The bridge runs split q/k/v copies on GPT-NeoX; the native fused QKV stays dense."""
    model = make_tiny_model("gpt_neox")
    ids = windows()
    sequential_prune(model, ids, "magnitude", 0.9, targets=["attention.q"], progress=False)
    ref = direct_ppl(model.hf_model, ids)
    with pytest.warns(RuntimeWarning, match="disagree"):
        res = perplexity(model, ids, progress=False)
    assert res.backend == "bridge" and res.perplexity == pytest.approx(ref, rel=1e-5)


def test_mlp_pruned_model_uses_sdpa(tiny_model):
    ids = windows()
    sequential_prune(tiny_model, ids, "wanda", 0.5, progress=False)
    ref = direct_ppl(tiny_model.hf_model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = perplexity(tiny_model, ids, batch_size=3, progress=False)
    assert res.backend == "sdpa" and res.perplexity == pytest.approx(ref, rel=1e-5)


def test_plain_hf_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(make_config("llama", len(make_tokenizer()))).eval()
    hf.config._attn_implementation = "eager"
    ids = windows()
    ref = direct_ppl(hf, ids)
    res = perplexity(hf, ids, progress=False)
    assert res.backend == "sdpa" and res.perplexity == pytest.approx(ref, rel=1e-5)
    assert hf.config._attn_implementation == "eager"


def test_window_nll_per_token(tiny_llama):
    ids = windows(3, 20)
    per_token = window_nll(tiny_llama.hf_model, ids, nll_chunk=7, reduction="none")
    assert per_token.shape == (3, 19)
    total = window_nll(tiny_llama.hf_model, ids, nll_chunk=1000)
    assert total.dtype == torch.float64
    assert total.item() == pytest.approx(per_token.double().sum().item(), rel=1e-6)


def test_bad_windows(tiny_llama):
    with pytest.raises(ValueError, match="windows"):
        perplexity(tiny_llama, torch.zeros(10, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="windows"):
        perplexity(tiny_llama, torch.zeros(3, 1, dtype=torch.long), progress=False)
    with pytest.raises(TypeError):
        perplexity(object(), windows(), progress=False)


def test_replaced_module_used_by_native_path(tiny_model):
    from wasserstein_neurons.layerwise import sequential_layerwise

    class Scaled(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return 0.5 * self.linear(x)

    role = tiny_model.adapter.first_role

    def process(ctx):
        ctx.replace_linear(role, Scaled(ctx.targets([role])[role]))

    ids = windows()
    dense = direct_ppl(tiny_model.hf_model, ids)
    sequential_layerwise(tiny_model, ids, process, layers=[0], progress=False)
    ref = direct_ppl(tiny_model.hf_model, ids)
    assert ref != pytest.approx(dense, rel=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = perplexity(tiny_model, ids, progress=False)
    assert res.backend == "sdpa" and res.perplexity == pytest.approx(ref, rel=1e-5)
