"""Tests of Sparse Expansion building blocks: router, expert-routed linear, module replacement."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

from wasserstein_neurons.expansion import (
    ExpertRoutedLinear,
    PackedSparseStack,
    Router,
    SmallClusterWarning,
    fit_router,
    linear_features,
    replace_linear,
    restore_linear,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def blobs(n_per=200, d=40, centers=5, scale=0.05, seed=0):
    """Well-separated Gaussian blobs: returns ``x [n, d]`` (float32) and true labels ``[n]``."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(centers, d, generator=g) * 10
    labels = torch.arange(centers).repeat_interleave(n_per)
    x = mu[labels] + scale * torch.randn(labels.numel(), d, generator=g)
    perm = torch.randperm(labels.numel(), generator=g)
    return x[perm], labels[perm]


def anisotropic(n=3000, d=24, seed=0):
    """Correlated data with well-separated principal variances and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(5.0, 0.2, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ q.T + 3.0
    return x.to(torch.float32)


def fit(x, k, **kw):
    kw.setdefault("min_cluster_tokens", 0)
    kw.setdefault("restarts", 3)
    return fit_router(x, k, **kw)


# ============================================================================================
# Router
# ============================================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_router_deterministic_for_a_seed(device):
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(1)).to(device)
    a = fit(x, 8, pca_dim=8, seed=0)
    b = fit(x, 8, pca_dim=8, seed=0)
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.components, b.components)
    assert torch.equal(a.route(x), b.route(x))
    assert a.fit_info.restart_inertia == b.fit_info.restart_inertia
    c = fit(x, 8, pca_dim=8, seed=1)  # a different seed gives different k-means++ draws
    assert c.fit_info.restart_inertia != a.fit_info.restart_inertia
    assert a.centroids.device.type == device


def test_route_equals_bruteforce_nearest_centroid_numpy():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 48, generator=g) @ torch.randn(48, 48, generator=g) + 1.0
    router = fit(x, 6, pca_dim=6)
    mean = router.mean.double().numpy()
    comps = router.components.double().numpy()
    cents = router.centroids.double().numpy()
    z = (x.double().numpy() - mean) @ comps
    d2 = ((z[:, None, :] - cents[None, :, :]) ** 2).sum(-1)  # [n, k]
    want = d2.argmin(1)
    got = router.route(x).numpy()
    srt = np.sort(d2, axis=1)
    near_tie = (srt[:, 1] - srt[:, 0]) <= 1e-4 * (1.0 + srt[:, 0])
    assert np.all((got == want) | near_tie)
    assert (got == want).mean() > 0.99
    # leading dimensions are kept; forward == route
    assert torch.equal(router(x.reshape(30, 100, 48)), router.route(x).reshape(30, 100))
    # counts are those of the final routing
    assert torch.equal(router.counts, torch.bincount(router.route(x), minlength=6))


@pytest.mark.parametrize("pca_dim", [0, 8])
def test_kmeans_recovers_separated_blobs(pca_dim):
    x, truth = blobs()
    router = fit(x, 5, pca_dim=pca_dim)
    labels = router.route(x)
    # each true blob maps to exactly one cluster and vice versa
    pairs = {(int(t), int(lab)) for t, lab in zip(truth, labels, strict=True)}
    assert len(pairs) == 5
    assert sorted(router.counts.tolist()) == [200] * 5
    assert router.uses_pca == bool(pca_dim)


def test_pca_components_match_numpy_svd():
    x = anisotropic()
    p = 6
    router = fit(x, 3, pca_dim=p)
    xn = x.double().numpy()
    mean = xn.mean(0)
    _, s, vt = np.linalg.svd(xn - mean, full_matrices=False)
    np.testing.assert_allclose(router.mean.double().numpy(), mean, atol=1e-5)
    comps = router.components.double().numpy()
    assert comps.shape == (x.shape[1], p)
    dots = np.abs(np.sum(comps * vt[:p].T, axis=0))  # |<c_i, v_i>| = 1 up to sign
    np.testing.assert_allclose(dots, 1.0, atol=1e-5)
    np.testing.assert_allclose(comps.T @ comps, np.eye(p), atol=1e-5)
    ratio = s[:p] ** 2 / (s**2).sum()
    np.testing.assert_allclose(router.fit_info.explained_variance_ratio.numpy(), ratio, rtol=1e-4)


def test_default_pca_dim_uses_factor():
    x = torch.randn(1000, 128)
    assert fit(x, 2).pca_dim == 128 // 32
    assert fit(x, 2, pca_factor=8).pca_dim == 16
    assert not fit(x, 2, pca_factor=None).uses_pca
    assert not fit(x, 2, pca_dim=0).uses_pca


@pytest.mark.parametrize(
    "case",
    ["all_identical", "fewer_distinct_than_k", "fewer_tokens_than_k", "one_token"],
)
def test_degenerate_data_gives_no_nan(case):
    g = torch.Generator().manual_seed(3)
    if case == "all_identical":
        x = torch.ones(100, 16)
    elif case == "fewer_distinct_than_k":
        x = torch.randn(3, 16, generator=g).repeat(40, 1)
    elif case == "fewer_tokens_than_k":
        x = torch.randn(5, 16, generator=g)
    else:
        x = torch.randn(1, 16, generator=g)
    for pca_dim in (0, 4):
        router = fit(x, 8, pca_dim=pca_dim, restarts=4)
        assert torch.isfinite(router.centroids).all()
        assert torch.isfinite(router.mean).all()
        assert router.components is None or torch.isfinite(router.components).all()
        labels = router.route(x)
        assert labels.min() >= 0 and labels.max() < 8
        assert int(router.counts.sum()) == x.shape[0]
        n_distinct = torch.unique(x, dim=0).shape[0]
        assert int((router.counts > 0).sum()) <= n_distinct
        assert math.isfinite(router.fit_info.inertia)
    if case == "fewer_distinct_than_k":
        assert int((fit(x, 8, pca_dim=0).counts > 0).sum()) == 3  # every distinct point found


def test_empty_clusters_are_reseeded():
    # 2 tight far-away blobs plus one outlier: a bad init leaves clusters empty on the way
    x, _ = blobs(n_per=50, d=8, centers=2, seed=4)
    x = torch.cat([x, torch.full((1, 8), 100.0)])
    router = fit(x, 3, pca_dim=0, restarts=5)
    assert sorted(router.counts.tolist()) == [1, 50, 50]
    assert torch.isfinite(router.centroids).all()


def test_single_cluster_router_is_trivial():
    x = torch.randn(100, 32)
    router = fit(x, 1)
    assert router.n_clusters == 1 and not router.uses_pca
    assert router.flops_per_token() == 0
    assert torch.equal(router.route(x.reshape(4, 25, 32)), torch.zeros(4, 25, dtype=torch.long))
    assert router.counts.tolist() == [100]


def test_small_cluster_warning():
    x, _ = blobs(n_per=20, d=40, centers=2)
    with pytest.warns(SmallClusterWarning, match="fewer than 80 calibration tokens"):
        fit_router(x, 2, pca_dim=4, restarts=1)  # default threshold 2 * d_in
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_router(x, 2, pca_dim=4, restarts=1, min_cluster_tokens=0)


def test_fit_router_rejects_bad_input():
    x = torch.randn(50, 8)
    with pytest.raises(ValueError, match="n_clusters"):
        fit_router(x, 0)
    with pytest.raises(ValueError, match="at least one"):
        fit_router(x[:0], 2)
    with pytest.raises(ValueError, match="NaN"):
        fit_router(torch.full((4, 8), float("nan")), 2)
    with pytest.raises(ValueError, match="pca_dim"):
        fit_router(x, 2, pca_dim=9)
    with pytest.raises(ValueError, match="router expects"):
        fit(x, 2).route(torch.randn(3, 7))


@pytest.mark.parametrize("pca_dim", [0, 4])
def test_router_state_dict_round_trip(pca_dim):
    x = torch.randn(500, 32)
    router = fit(x, 4, pca_dim=pca_dim)
    sd = router.state_dict()
    assert ("components" in sd) == bool(pca_dim)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    clone = Router.from_state_dict(torch.load(buf))
    assert torch.equal(clone.route(x), router.route(x))
    assert torch.equal(clone.counts, router.counts)
    other = fit(torch.randn(500, 32), 4, pca_dim=pca_dim, seed=5)
    other.load_state_dict(sd)  # same shapes: plain load works too
    assert torch.equal(other.route(x), router.route(x))


def test_router_stays_float32_under_casts():
    router = fit(torch.randn(200, 16), 2, pca_dim=4).to(torch.float16)
    assert router.centroids.dtype == router.components.dtype == router.mean.dtype
    assert router.mean.dtype == torch.float32 and router.counts.dtype == torch.long
    x = torch.randn(10, 16, dtype=torch.float16)
    assert router.route(x).shape == (10,)


def test_router_flops_hand_count():
    r = Router(torch.zeros(64), torch.eye(64)[:, :2], torch.randn(16, 2))
    assert r.flops_per_token() == 2 * 64 * 2 + 2 * 2 * 16 + 16
    r = Router(torch.zeros(64), None, torch.randn(4, 64))
    assert r.flops_per_token() == 2 * 64 * 4 + 4


# ============================================================================================
# ExpertRoutedLinear
# ============================================================================================


def routed_layer(k=4, d_in=24, d_out=10, bias="shared", sparsity=0.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(600, d_in, generator=g)
        + 4 * torch.randn(k, d_in, generator=g)[torch.randint(k, (600,), generator=g)]
    )
    router = fit(x, k, pca_dim=4)
    w = torch.randn(k, d_out, d_in, generator=g)
    if sparsity:
        w[torch.rand(w.shape, generator=g) < sparsity] = 0
    b = {
        "shared": torch.randn(d_out, generator=g),
        "expert": torch.randn(k, d_out, generator=g),
        None: None,
    }[bias]
    layer = ExpertRoutedLinear(w, router, b)
    return layer.to(device), x.to(device)


def manual_forward(layer, x):
    """Per-token reference: y_t = W_{e(t)} x_t + b (numpy float64, independent of the module)."""
    ids = layer.router.route(x).cpu().numpy()
    w = layer.dense_weights().double().cpu().numpy()
    xn = x.double().cpu().numpy()
    y = np.stack([w[e] @ xt for e, xt in zip(ids, xn, strict=True)])
    if layer.bias is not None:
        y += layer.bias.double().detach().cpu().numpy()
    if layer.expert_bias is not None:
        y += layer.expert_bias.double().detach().cpu().numpy()[ids]
    return y, ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", ["shared", "expert", None])
def test_routed_forward_matches_per_token_computation(bias, device):
    layer, x = routed_layer(bias=bias, device=device)
    x3 = x[:120].reshape(4, 30, -1)
    with torch.no_grad():
        y = layer(x3)
    assert y.shape == (4, 30, 10) and y.dtype == x.dtype and y.device == x.device
    want, ids = manual_forward(layer, x[:120])
    assert len(set(ids.tolist())) == 4  # every expert used
    np.testing.assert_allclose(y.reshape(120, -1).double().cpu().numpy(), want, atol=1e-4)
    assert torch.equal(layer.last_routing.cpu(), torch.as_tensor(ids).reshape(4, 30))
    layer.store_routing = False
    layer.last_routing = None
    layer(x3)
    assert layer.last_routing is None


def test_dense_copies_equal_dense_linear():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(24, 10)
    x = torch.randn(300, 24, generator=g)
    layer = ExpertRoutedLinear.from_dense(lin.weight, fit(x, 4, pca_dim=4), lin.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lin(x), atol=1e-6, rtol=0)
    assert len(torch.unique(layer.last_routing)) == 4


def test_neuron_level_rows():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, k = 24, 12, 3
    x = torch.randn(400, d_in, generator=g)
    router = fit(x, k, pca_dim=4)
    rows = torch.tensor([7, 2, 10])  # unsorted on purpose
    experts = torch.randn(k, 3, d_in, generator=g)
    shared = torch.randn(d_out, d_in, generator=g)
    bias = torch.randn(d_out, generator=g)
    layer = ExpertRoutedLinear(experts, router, bias, rows=rows, shared_weight=shared)
    assert layer.rows.tolist() == [2, 7, 10]
    assert layer.out_features == d_out and layer.shared_weight.shape == (d_out - 3, d_in)
    with torch.no_grad():
        y = layer(x)
    ids = router.route(x)
    want = x @ shared.T + bias
    for i, r in enumerate(rows.tolist()):
        want[:, r] = (x[:, None, :] @ experts[ids, i, :, None])[:, 0, 0] + bias[r]
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    w1 = layer.expert_weight(1)
    assert torch.equal(w1[rows], experts[1]) and torch.equal(w1[0], shared[0])
    # from_dense with rows: equals the dense layer
    dense = ExpertRoutedLinear.from_dense(shared, router, bias, rows=rows)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), x @ shared.T + bias, atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="shared_weight"):
        ExpertRoutedLinear(experts, router, rows=rows)
    with pytest.raises(ValueError, match="duplicate"):
        ExpertRoutedLinear(experts, router, rows=[1, 1, 2], shared_weight=shared)


@pytest.mark.parametrize("with_rows", [False, True])
def test_compact_storage_identical_outputs(with_rows):
    layer, x = routed_layer(sparsity=0.9, bias="shared")
    if with_rows:
        w = layer.dense_weights()
        shared = w[0].clone()
        shared[torch.rand(shared.shape, generator=torch.Generator().manual_seed(0)) < 0.5] = 0
        layer = ExpertRoutedLinear(
            w[:, [1, 4]], layer.router, layer.bias, rows=[1, 4], shared_weight=shared
        )
    with torch.no_grad():
        ref = layer(x)
        weights = layer.dense_weights()
        nnz = layer.nnz_per_expert()
        dense_bytes = layer.nbytes()
        flops = layer.flops_per_token()
        params = layer.num_parameters()
        layer.compact()
        assert layer.is_compact and layer.weights is None
        assert torch.equal(layer(x), ref)  # decompress + dense GEMM: bit-identical
        assert torch.equal(layer.dense_weights(), weights)
        assert torch.equal(layer.nnz_per_expert(), nnz)
        assert layer.flops_per_token() == flops and layer.num_parameters() == params
        if not with_rows:
            assert layer.nbytes() < 0.5 * dense_bytes
        layer.densify()
        assert not layer.is_compact and torch.equal(layer(x), ref)
    # gradients reach the packed values
    layer.compact()
    layer(x[:50]).sum().backward()
    assert layer.weights_packed.values.grad is not None


def test_packed_stack_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 13, generator=g)  # 13 columns: a partial last byte
    w[torch.rand(w.shape, generator=g) < 0.6] = 0
    w[1, 2] = 0  # an empty row
    s = PackedSparseStack.from_dense(w)
    assert s.bits.shape == (3, 5, 2) and s.bits.dtype == torch.uint8
    assert torch.equal(s.to_dense(), w)
    assert torch.equal(s.mask(2), w[2] != 0)
    assert s.nnz().tolist() == (w != 0).sum((1, 2)).tolist()
    clone = PackedSparseStack.from_state_dict(s.state_dict())
    assert torch.equal(clone.to_dense(), w)
    assert torch.equal(s.to_dense(torch.float64), w.double())


def test_counts_match_hand_computation():
    # d_in=4, p=2, k=2, out=3; expert 0 has 5 nonzeros, expert 1 has 3
    router = Router(
        torch.zeros(4),
        torch.eye(4)[:, :2],
        torch.tensor([[1.0, 0.0], [-1.0, 0.0]]),
        counts=torch.tensor([3, 1]),
    )
    w = torch.zeros(2, 3, 4)
    w[0, 0, :3] = 1.0
    w[0, 2, 1:3] = 2.0
    w[1, 1, 0] = 3.0
    w[1, 2, [1, 3]] = 4.0
    layer = ExpertRoutedLinear(w, router, torch.ones(3))
    assert layer.nnz_per_expert().tolist() == [5, 3]
    router_flops = 2 * 4 * 2 + 2 * 2 * 2 + 2  # projection + cross terms + ||c||^2
    assert router.flops_per_token() == router_flops == 26
    # frequencies 3/4, 1/4 from the router's calibration counts
    assert layer.flops_per_token() == pytest.approx(2 * (0.75 * 5 + 0.25 * 3) + 26)
    assert layer.flops_per_token(torch.ones(2)) == pytest.approx(2 * 4 + 26)
    assert layer.flops_per_token(include_router=False) == pytest.approx(2 * 4.5)
    router_params = 4 + 4 * 2 + 2 * 2  # mean, components, centroids
    assert layer.num_parameters() == 5 + 3 + 3 + router_params
    assert layer.num_parameters(nonzero_only=False) == 2 * 3 * 4 + 3 + router_params
    assert layer.num_parameters(include_router=False) == 11
    f32, i64 = 4, 8
    router_bytes = router_params * f32 + 2 * i64  # + counts
    assert layer.nbytes() == 24 * f32 + 3 * f32 + router_bytes
    assert layer.nbytes(include_router=False) == 24 * f32 + 3 * f32
    layer.compact()
    # values + one byte of mask bits per row [2, 3, 1] + int64 offsets [3] + dense_shape [3]
    packed_bytes = 8 * f32 + 2 * 3 * 1 + 3 * i64 + 3 * i64
    assert layer.nbytes() == packed_bytes + 3 * f32 + router_bytes
    # routing: x = (1, 0, 0, 0) -> cluster 0; (-1, ...) -> cluster 1
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(
        layer(x), torch.tensor([[1.0 + 2 + 3 + 1, 1, 2 * 5 + 1], [1, -3 + 1, 4 * 6 + 1]])
    )


@pytest.mark.parametrize("variant", ["dense", "compact", "rows", "expert_bias"])
def test_save_load_identical_outputs(variant):
    layer, x = routed_layer(sparsity=0.7, bias="expert" if variant == "expert_bias" else "shared")
    if variant == "rows":
        shared = layer.dense_weights()[0]
        layer = ExpertRoutedLinear(
            layer.dense_weights()[:, [0, 3, 5]],
            layer.router,
            layer.bias,
            rows=[0, 3, 5],
            shared_weight=shared,
        )
    if variant in ("compact", "rows"):
        layer.compact()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    clone = ExpertRoutedLinear.from_state_dict(sd)
    assert clone.is_compact == layer.is_compact
    with torch.no_grad():
        assert torch.equal(clone(x), layer(x))
    # with a prefix, as inside a model's state dict
    clone2 = ExpertRoutedLinear.from_state_dict(
        {f"mlp.gate.{k}": v for k, v in sd.items()}, prefix="mlp.gate."
    )
    with torch.no_grad():
        assert torch.equal(clone2(x), layer(x))


def test_weight_attribute_fails_clearly():
    layer, _ = routed_layer()
    assert not hasattr(layer, "weight")
    with pytest.raises(AttributeError, match="expert_weight"):
        _ = layer.weight
    with pytest.raises(AttributeError, match="no_such"):
        _ = layer.no_such
    assert layer.in_features == 24 and layer.out_features == 10


def test_constructor_validation():
    layer, _ = routed_layer()
    w = layer.dense_weights()
    with pytest.raises(ValueError, match="clusters"):
        ExpertRoutedLinear(w[:3], layer.router)
    with pytest.raises(ValueError, match="d_in"):
        ExpertRoutedLinear(w[:, :, :5], layer.router)
    with pytest.raises(ValueError, match="bias"):
        ExpertRoutedLinear(w, layer.router, torch.zeros(7))


def test_half_precision_input():
    layer, x = routed_layer()
    layer = layer.to(torch.bfloat16)
    assert layer.router.centroids.dtype == torch.float32
    with torch.no_grad():
        y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


# ============================================================================================
# replace_linear on tiny models
# ============================================================================================


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
