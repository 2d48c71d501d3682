"""Tests of the Sparse Expansion router: PCA + k-means, hard top-1 routing."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

from wasserstein_neurons.expansion import (
    Router,
    SmallClusterWarning,
    fit_router,
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


def test_router_does_not_depend_on_workers():
    """Restarts run side by side in threads give the very same router as one after another."""
    g = torch.Generator().manual_seed(0)
    x = (
        torch.randn(3000, 64, generator=g)
        + 3 * torch.randn(8, 64, generator=g)[torch.randint(8, (3000,), generator=g)]
    )
    one = fit_router(x, 8, restarts=6, workers=1, min_cluster_tokens=0)
    three = fit_router(x, 8, restarts=6, workers=3, min_cluster_tokens=0)
    assert torch.equal(one.centroids, three.centroids)
    assert one.fit_info.restart_inertia == three.fit_info.restart_inertia
    assert torch.equal(one.route(x), three.route(x))


def test_returned_labels_are_the_routing_and_bad_values_are_refused():
    """fit_router's labels equal route() of the inputs (the builder uses them instead of a
    second routing pass), and NaN / inf inputs are refused by the mean's finiteness check."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40000, 48, generator=g) * torch.linspace(0.1, 3, 48)
    router, labels = fit_router(x, 16, restarts=2, return_labels=True, min_cluster_tokens=0)
    assert torch.equal(labels, router.route(x))
    assert torch.equal(torch.bincount(labels, minlength=16), router.counts)
    one, zeros = fit_router(x, 1, return_labels=True)
    assert torch.equal(zeros, torch.zeros(40000, dtype=torch.long))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[39000, 3] = bad  # in the last chunk
        with pytest.raises(ValueError, match="NaN or Inf"):
            fit_router(y, 4, restarts=1)
        with pytest.raises(ValueError, match="NaN or Inf"):
            fit_router(y, 1)
    big = torch.full((20000, 4), 3e38)  # finite values whose float32 sum overflows
    assert torch.isfinite(fit_router(big, 1).mean).all()
