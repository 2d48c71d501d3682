"""Disentanglement analysis: metric formulas against direct computations, a synthetic case where
Sparse Expansion must help, and the end-to-end run on a tiny model."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from wasserstein_neurons.disentangle import (
    collect_linear_inputs,
    disentangle_linear,
    linear_outputs,
    mapping_difficulty,
    random_pairs,
    relative_error,
    relative_improvement,
    routed_outputs,
    weighted_expert_wd,
)
from wasserstein_neurons.pruning import PruneSpec
from wasserstein_neurons.wasserstein import wasserstein_to_gaussian

# ------------------------------------------------------------------------------- formulas


def test_relative_error_and_ri_match_numpy():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(500, 7)).astype(np.float32)
    sparse_a = dense + 0.3 * rng.normal(size=dense.shape).astype(np.float32)
    sparse_b = dense + 0.1 * rng.normal(size=dense.shape).astype(np.float32)
    dense[:, 3] = 0.0  # an all-zero neuron: undefined relative error
    ok = np.arange(7) != 3
    err_a = relative_error(sparse_a, dense, chunk=64)  # several chunks
    err_b = relative_error(torch.from_numpy(sparse_b), torch.from_numpy(dense))
    d64 = dense.astype(np.float64)
    want_a = np.linalg.norm(sparse_a - d64, axis=0)[ok] / np.linalg.norm(d64, axis=0)[ok]
    want_b = np.linalg.norm(sparse_b - d64, axis=0)[ok] / np.linalg.norm(d64, axis=0)[ok]
    np.testing.assert_allclose(err_a[ok], want_a, rtol=1e-10)
    np.testing.assert_allclose(err_b[ok], want_b, rtol=1e-10)
    assert np.isnan(err_a[3])
    ri = relative_improvement(err_a, err_b)
    np.testing.assert_allclose(ri[ok], (want_a - want_b) / want_a, rtol=1e-10)
    assert np.isnan(ri[3])
    assert np.all(ri[ok] > 0)  # b is the better reconstruction
    assert np.isnan(relative_improvement([0.0], [0.0])[0])


def test_weighted_expert_wd_matches_loop():
    rng = np.random.default_rng(1)
    y = rng.standard_exponential(size=(900, 5)) ** 2
    labels = rng.integers(0, 4, size=900)
    labels[labels == 2] = 1  # cluster 2 empty
    labels[0] = 3  # keep cluster 3 large; then add a one-token cluster 4
    labels[1] = 4
    y[labels == 0, 2] = 1.5  # neuron 2 constant inside cluster 0: that cluster is skipped for it
    got = weighted_expert_wd(y, labels, n_clusters=5)
    want = np.zeros(5)
    for j in range(5):
        num = den = 0.0
        for c in range(5):
            members = y[labels == c, j]
            if len(members) < 2 or np.ptp(members) == 0:
                continue
            num += len(members) * float(wasserstein_to_gaussian(members[:, None])[0])
            den += len(members)
        want[j] = num / den
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # with one cluster it is the neuron's own WD
    own = wasserstein_to_gaussian(y).numpy()
    np.testing.assert_allclose(weighted_expert_wd(y, np.zeros(900, int)), own, rtol=1e-12)


def test_mapping_difficulty_matches_brute_force():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 6))
    x[7] = x[3]  # a duplicated input: pairs (3, 7) have zero input distance and are skipped
    y = np.tanh(x @ rng.normal(size=(6, 4))) + 0.1 * rng.normal(size=(40, 4))
    y[:, 1] = 2.0  # constant neuron -> NaN
    a, b = random_pairs(40, 300, seed=5)
    a = np.concatenate([a, [3, 7]])
    b = np.concatenate([b, [7, 3]])
    assert np.all(a != b)
    got = mapping_difficulty(x, y, pairs=(a, b), neuron_chunk=3)
    pairs = [(i, k) for i, k in zip(a, b, strict=True) if np.linalg.norm(x[i] - x[k]) > 0]
    assert len(pairs) == len(a) - 2
    max_dx = max(math.dist(x[i], x[k]) for i, k in pairs)
    for j in range(4):
        dys = [abs(y[i, j] - y[k, j]) for i, k in pairs]
        med = statistics.median(dys)
        if med == 0:
            assert np.isnan(got[j])
            continue
        ratios = [
            (abs(y[i, j] - y[k, j]) / med) / (math.dist(x[i], x[k]) / max_dx) for i, k in pairs
        ]
        assert got[j] == pytest.approx(statistics.fmean(ratios), rel=1e-9)
    assert np.isnan(got[1])
    # the seeded draw is reproducible and never pairs a token with itself
    a1, b1 = random_pairs(10, 1000, seed=3)
    a2, b2 = random_pairs(10, 1000, seed=3)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2) and np.all(a1 != b1)
    np.testing.assert_array_equal(
        mapping_difficulty(x, y, n_pairs=50, seed=4), mapping_difficulty(x, y, n_pairs=50, seed=4)
    )


def test_routed_outputs_use_each_tokens_expert():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(30, 8)).astype(np.float32))
    experts = [torch.from_numpy(rng.normal(size=(5, 8)).astype(np.float32)) for _ in range(3)]
    bias = torch.arange(5, dtype=torch.float32)
    labels = torch.from_numpy(rng.integers(0, 3, size=30))
    got = routed_outputs(x, experts, labels, bias)
    for t in range(30):
        want = experts[int(labels[t])] @ x[t] + bias
        np.testing.assert_allclose(got[t], want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        linear_outputs(x, experts[0], bias, chunk=7), (x @ experts[0].T + bias).numpy(), rtol=1e-6
    )


# ------------------------------------------------------------------------------- synthetic SE


def _two_cluster_problem(n_per: int = 3000, d_in: int = 32, d_out: int = 6, seed: int = 0):
    """Two well-separated input clusters that use different input features.

    Cluster A has ``x_0 ~ +6`` and active (unit-variance) features 1..7, cluster B ``x_0 ~ -6``
    and features 8..14; every other feature is nearly silent. Neuron 0 reads ``x_0`` and all 14
    features, so its output is bimodal (+-6 plus noise). At 75% sparsity a row keeps 8 of 32
    weights: one global sparse row cannot keep the 15 it needs, but each cluster's expert needs
    only 8 (``x_0`` and its own 7 features).
    """
    g = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.randn(2 * n_per, d_in, generator=g)
    x[:n_per, 0] += 6.0
    x[n_per:, 0] -= 6.0
    x[:n_per, 1:8] = torch.randn(n_per, 7, generator=g)
    x[n_per:, 8:15] = torch.randn(n_per, 7, generator=g)
    w = torch.randn(d_out, d_in, generator=g) * 0.3
    w[0] = 0.0
    w[0, :15] = 1.0
    return x, w


def test_se_helps_a_bimodal_neuron():
    x_cal, w = _two_cluster_problem(seed=0)
    x_eval, _ = _two_cluster_problem(n_per=1500, seed=1)
    res = disentangle_linear(
        x_cal,
        x_eval,
        w,
        torch.zeros(w.shape[0]),
        experts=[1, 2],
        # per row: neuron 0 is pruned at 75% like every row (SparseGPT's default block rule
        # may leave this high-saliency row dense)
        spec=PruneSpec(sparsity=0.75, per_row=True),
        pca_factor=32,
        kmeans_restarts=2,
        top_percent=20,
        plot_neurons=2,
        mapping_pairs=2000,
    )
    t = res.table
    # neuron 0 is the bimodal (most non-Gaussian) one and SE with 2 experts helps it
    assert int(t["wd"].idxmax()) == 0 and bool(t.loc[0, "is_top"])
    assert t.loc[0, "ri_k2"] > 0.1
    assert t.loc[0, "err_se_k2"] < t.loc[0, "err_sparsegpt"]
    assert t.loc[0, "w1_sparse_dense_k2"] < t.loc[0, "w1_sparse_dense_sparsegpt"]
    # each cluster is one mode, so its per-expert distribution is Gaussian-like
    assert t.loc[0, "weighted_expert_wd_k2"] < 0.5 * t.loc[0, "wd"]
    # routing recovers the two input clusters on held-out tokens
    labels = res.outputs.labels[2]
    assert len(set(labels[:1500])) == 1 and len(set(labels[1500:])) == 1
    assert labels[0] != labels[-1]
    # k = 1 is the SparseGPT baseline itself
    np.testing.assert_array_equal(t["err_se_k1"], t["err_sparsegpt"])
    assert (t["ri_k1"] == 0).all()
    np.testing.assert_allclose(t["weighted_expert_wd_k1"], t["wd"], rtol=1e-12)
    assert res.per_k["experts"].tolist() == [1, 2]
    assert res.per_k.loc[1, "layer_err"] < res.per_k.loc[0, "layer_err"]
    assert res.outputs.se[2].shape == (3000, 2) and res.outputs.dense.shape == (3000, 2)
    # relative error columns agree with a direct computation from the kept outputs
    j = int(res.outputs.neurons[0])
    d = res.outputs.dense[:, 0].astype(np.float64)
    direct = np.linalg.norm(res.outputs.se[2][:, 0] - d) / np.linalg.norm(d)
    assert t.loc[j, "err_se_k2"] == pytest.approx(direct, rel=1e-6)


def test_bad_arguments_are_clear():
    x, w = _two_cluster_problem(n_per=50)
    with pytest.raises(ValueError, match="experts must be positive"):
        disentangle_linear(x, x, w, experts=[0, 2])
    with pytest.raises(ValueError, match="d_in"):
        disentangle_linear(x[:, :10], x, w)


# ------------------------------------------------------------------------------- tiny model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_collected_inputs_reproduce_the_hooked_outputs(family):
    model = make_tiny_model(family)
    a = model.adapter
    role = a.first_role
    windows = torch.randint(0, len(model.tokenizer), (3, 16))
    x = collect_linear_inputs(model, windows, layer=1, role=role, batch_size=2)
    assert x.shape == (48, a.d_model) and x.dtype == torch.float32
    seen = {}

    def keep(act, hook):
        seen["y"] = act.detach().reshape(-1, act.shape[-1]).clone()

    model.bridge.run_with_hooks(windows, fwd_hooks=[(a.hook_name(1, role), keep)])
    bias = getattr(a.linear(model.hf_model, 1, role), "bias", None)
    y = linear_outputs(x, a.weight(model.hf_model, 1, role), bias)
    np.testing.assert_allclose(y, seen["y"].numpy(), rtol=1e-4, atol=1e-5)
