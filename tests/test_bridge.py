"""Tests of the TransformerLens plumbing (bridge.py): replacing a linear, native modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import manual_forward

from wasserstein_neurons.bridge import linear_features, replace_linear, restore_linear
from wasserstein_neurons.expansion import ExpertRoutedLinear, fit_router

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fit(x, k, **kw):
    kw.setdefault("min_cluster_tokens", 0)
    kw.setdefault("restarts", 3)
    return fit_router(x, k, **kw)


def _capture(model, tokens, names):
    with torch.no_grad():
        logits, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    return logits, cache


@pytest.mark.parametrize("role_kind", ["first", "down"])
def test_replace_linear_all_families(tiny_model, role_kind):
    model = tiny_model
    a = model.adapter
    role = a.first_role if role_kind == "first" else "down"
    layer = 1
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    in_hook = a.input_hook_name(layer, role)
    out_hook = f"blocks.{layer}.mlp.{a.spec(role).bridge_attr}.hook_out"
    names = {in_hook, out_hook, a.hook_name(layer, role)}
    with torch.no_grad():
        ref_hf = model.hf_model(tokens).logits
    ref_logits, cache = _capture(model, tokens, names)
    x = cache[in_hook]
    ref_out = cache[out_hook]
    torch.testing.assert_close(ref_logits, ref_hf, atol=0, rtol=0)

    lin = a.linear(model.hf_model, layer, role)
    w = a.weight(model.hf_model, layer, role)  # [out, in] (transposed view for Conv1D)
    router = fit(x.reshape(-1, x.shape[-1]), 3, pca_dim=4)
    dense_copy = ExpertRoutedLinear.from_dense(w, router, lin.bias)
    old = replace_linear(model, layer, role, dense_copy)
    assert old is lin
    assert a.linear(model.hf_model, layer, role) is dense_copy
    assert linear_features(dense_copy) == linear_features(old)
    with torch.no_grad():
        hf = model.hf_model(tokens).logits
    logits, cache = _capture(model, tokens, names)
    torch.testing.assert_close(hf, ref_hf, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, hf, atol=0, rtol=0)  # bridge == HF exactly
    torch.testing.assert_close(cache[out_hook], ref_out, atol=1e-6, rtol=0)
    assert dense_copy.last_routing.shape == (2, 16)
    assert len(torch.unique(dense_copy.last_routing)) > 1

    # different experts: hooks report the routed module's real output
    g = torch.Generator().manual_seed(1)
    experts = w.unsqueeze(0) + 0.5 * torch.randn(3, *w.shape, generator=g)
    routed = ExpertRoutedLinear(experts, router, lin.bias)
    assert replace_linear(model, layer, role, routed) is dense_copy
    with torch.no_grad():
        hf = model.hf_model(tokens).logits
    logits, cache = _capture(model, tokens, names)
    torch.testing.assert_close(logits, hf, atol=0, rtol=0)
    assert (hf - ref_hf).abs().max() > 1e-3
    with torch.no_grad():
        want = routed(x)
    torch.testing.assert_close(cache[out_hook], want, atol=0, rtol=0)
    if role != "down":  # hook_pre / hook_pre_linear alias the linear's output
        torch.testing.assert_close(cache[a.hook_name(layer, role)], want, atol=0, rtol=0)
    manual, _ = manual_forward(routed, x.reshape(-1, x.shape[-1]))
    np.testing.assert_allclose(
        cache[out_hook].reshape(-1, w.shape[0]).double().numpy(), manual, atol=1e-4
    )
    with pytest.raises(AttributeError, match="no single"):
        a.weight(model.hf_model, layer, role)

    # restore: the original module (and its outputs) come back
    assert restore_linear(model, layer, role, old) is routed
    assert a.linear(model.hf_model, layer, role) is lin
    with torch.no_grad():
        torch.testing.assert_close(model.hf_model(tokens).logits, ref_hf, atol=0, rtol=0)


def test_replace_linear_validates(tiny_llama):
    lin = tiny_llama.adapter.linear(tiny_llama.hf_model, 0, "gate")
    with pytest.raises(ValueError, match="features"):
        replace_linear(tiny_llama, 0, "gate", torch.nn.Linear(lin.in_features, 3))
    with pytest.raises(ValueError, match="out of range"):
        replace_linear(tiny_llama, 99, "gate", lin)
    with pytest.raises(ValueError, match="roles"):
        replace_linear(tiny_llama, 0, "nope", lin)
    assert tiny_llama.adapter.linear(tiny_llama.hf_model, 0, "gate") is lin
