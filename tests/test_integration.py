"""Integration: the embedded SmolLM2 model and Wikipedia corpus, end to end on a few tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wasserstein_neurons as wn
from wasserstein_neurons.capture import capture_activations
from wasserstein_neurons.data import evaluation_windows, load_tokens, sample_windows
from wasserstein_neurons.evaluate import perplexity
from wasserstein_neurons.ranking import rank_store, top_neurons

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return wn.load_model()


def test_embedded_model_shape_and_shared_weights(smol):
    a = smol.adapter
    assert (a.family, a.n_layers, a.d_model, a.d_mlp) == ("llama", 30, 576, 1536)
    ids = load_tokens(smol.tokenizer, "embedded", "evaluation")[:64][None]
    with torch.no_grad():
        assert torch.equal(smol.bridge(ids), smol.hf_model(ids).logits)


def test_capture_and_rank_embedded(smol, tmp_path):
    tokens = load_tokens(smol.tokenizer, "embedded", "calibration")
    windows = sample_windows(tokens, 512, 256, seed=0)
    store = capture_activations(
        smol,
        windows,
        tmp_path / "acts",
        hooks="blocks.0.mlp.hook_pre,blocks.29.mlp.hook_pre",
        progress=False,
    )
    table = rank_store(store, progress=False)
    assert len(table) == 2 * 1536 and table["wd"].notna().all()
    assert len(top_neurons(table, 3.0)) == 2 * 46
    # stored float16 values are the gate projection's outputs
    x = []
    h = smol.adapter.linear(smol.hf_model, 29, "gate").register_forward_hook(
        lambda m, i, o: x.append(o)
    )
    with torch.no_grad():
        smol.hf_model(windows[:1])
    h.remove()
    np.testing.assert_allclose(
        store.array("blocks.29.mlp.hook_pre")[:256].astype(np.float32),
        x[0][0].numpy(),
        rtol=2e-3,
        atol=2e-2,
    )


def test_perplexity_matches_direct_computation(smol):
    windows = evaluation_windows(
        load_tokens(smol.tokenizer, "embedded", "evaluation"), 128, max_tokens=256
    )
    got = perplexity(smol, windows, progress=False)
    with torch.no_grad():
        logits = smol.hf_model(windows).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert got.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert 3 < got.perplexity < 100
