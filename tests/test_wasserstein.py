"""Tests of wasserstein_neurons.wasserstein (W1 of neuron outputs to N(0, 1))."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from scipy import integrate
from scipy.special import ndtr, ndtri

from wasserstein_neurons.wasserstein import (
    METHODS,
    _exact_torch,
    _exact_torch_block,
    constant_neurons,
    gaussian_quantile_pieces,
    neuron_statistics,
    wasserstein_between,
    wasserstein_to_gaussian,
)

# --------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------


def zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean()) / x.std()


def quadrature_w1(x: np.ndarray) -> float:
    """int_0^1 |F_n^{-1}(u) - Phi^{-1}(u)| du by adaptive quadrature, piece by piece."""
    z = np.sort(zscore(x))
    n = len(z)
    total = total_err = 0.0
    for i in range(n):
        lo, hi = i / n, (i + 1) / n
        kink = scipy.stats.norm.cdf(z[i])  # where the integrand's |.| changes sign
        cuts = [lo, kink, hi] if lo < kink < hi else [lo, hi]
        val = 0.0
        for left, right in zip(cuts[:-1], cuts[1:], strict=False):
            # full_output: report the error estimate instead of warning about round-off
            part, err, *_ = integrate.quad(
                lambda u, zi=z[i]: abs(zi - scipy.stats.norm.ppf(u)),
                left,
                right,
                epsabs=1e-14,
                epsrel=1e-12,
                limit=200,
                full_output=1,
            )
            total_err += err
            val += part
        total += val
    assert total_err < 1e-10  # the reference itself is accurate
    return total


def dense_closed_form(x: np.ndarray) -> np.ndarray:
    """The closed form (ARCHITECTURE.md, "Science notes") on every element (no crossing trick)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    z = np.sort((x - x.mean(0)) / x.std(0), axis=0)
    i = np.arange(1, n + 1, dtype=np.float64)[:, None]
    a, b = ndtri((i - 1) / n), ndtri(i / n)
    phi = scipy.stats.norm.pdf
    c = np.clip(z, a, b)
    terms = 2 * (z * ndtr(c) + phi(c)) - z * (2 * i - 1) / n - phi(a) - phi(b)
    return terms.sum(0)


def neuron_zoo(n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 7] neurons of different shapes."""
    half = n // 2
    cols = [
        rng.standard_normal(n),  # Gaussian
        np.r_[rng.normal(-2, 0.5, half), rng.normal(2, 0.5, n - half)],  # bimodal
        rng.standard_t(2, n),  # heavy-tailed
        rng.exponential(size=n),  # skewed
        np.round(rng.standard_normal(n) * 2) / 2,  # many ties
        ndtri((np.arange(n) + 0.5) / n),  # exact Gaussian quantiles: every piece crosses
        rng.standard_cauchy(n) * 50 + 1000,  # extreme tails, offset
    ]
    return np.stack(cols, axis=1)


# --------------------------------------------------------------------------------------------
# exact method
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 17, 60])
def test_exact_matches_quadrature(n):
    x = neuron_zoo(n, np.random.default_rng(n))
    got = wasserstein_to_gaussian(x).numpy()
    want = np.array([quadrature_w1(x[:, j]) for j in range(x.shape[1])])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_exact_two_points_analytic():
    # z = (-1, 1): W1 = 2 int_0^inf |1 - t| phi(t) dt = 2 (2 phi(1) - phi(0) + 2 Phi(1) - 3/2)
    phi, cdf = scipy.stats.norm.pdf, scipy.stats.norm.cdf
    want = 2 * (2 * phi(1.0) - phi(0.0) + 2 * cdf(1.0) - 1.5)
    got = wasserstein_to_gaussian(np.array([[3.0], [5.0]])).item()
    assert got == pytest.approx(want, abs=1e-14)


def test_exact_many_row_blocks_matches_dense_formula():
    # n and the column count exercise several row blocks, the 64-column groups and the tails
    rng = np.random.default_rng(1)
    x = neuron_zoo(5000, rng)
    x = np.concatenate([x] * 15, axis=1)[:, :100] * rng.uniform(0.5, 2, 100)
    got = wasserstein_to_gaussian(x).numpy()
    np.testing.assert_allclose(got, dense_closed_form(x), rtol=0, atol=1e-11)


def test_exact_vs_scipy_against_a_million_gaussian_samples():
    rng = np.random.default_rng(5)
    x = neuron_zoo(3000, rng)[:, :4]
    g = np.random.default_rng(123).standard_normal(10**6)
    got = wasserstein_to_gaussian(x).numpy()
    ref = [scipy.stats.wasserstein_distance(zscore(x[:, j]), g) for j in range(x.shape[1])]
    # |W(z, g) - W(z, N)| <= W(g, N) ~ 1e-3 for 1e6 samples
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3)


def test_gaussian_neuron_is_close_and_shrinks_with_n():
    means = []
    for n in (1000, 10_000, 100_000):
        x = np.random.default_rng(n).standard_normal((n, 8))
        means.append(wasserstein_to_gaussian(x).numpy().mean())
    assert means[0] > means[1] > means[2]
    assert means[2] < 0.006
    # ~ 1/sqrt(n) decay
    assert 2.0 < means[0] / means[1] < 5.0 and 2.0 < means[1] / means[2] < 5.0
    heavy = wasserstein_to_gaussian(np.random.default_rng(0).standard_t(2, (100_000, 2)))
    assert heavy.min().item() > 10 * means[2]


def test_torch_kernel_matches_numpy_path():
    x = neuron_zoo(3000, np.random.default_rng(2))
    got = _exact_torch_block(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, wasserstein_to_gaussian(x).numpy(), rtol=0, atol=1e-12)
    x[:, 3] = 7.0
    assert np.isnan(_exact_torch_block(torch.from_numpy(x)).numpy()[3])
    # the device dispatcher (used for CUDA), run on the CPU: chunking and dtype handling
    x16 = torch.from_numpy(x).to(torch.float16)
    want = wasserstein_to_gaussian(x16.float().numpy()).numpy()
    for src in (x16, x16.numpy()):
        got = _exact_torch(src, torch.device("cpu"), 3).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = neuron_zoo(4000, np.random.default_rng(3)).astype(np.float32)
    cpu = wasserstein_to_gaussian(x).numpy()
    got = wasserstein_to_gaussian(torch.from_numpy(x).cuda())
    assert got.device.type == "cpu" and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), cpu, rtol=0, atol=1e-11)
    got2 = wasserstein_to_gaussian(x, device="cuda", neuron_chunk=3).numpy()
    np.testing.assert_allclose(got2, cpu, rtol=0, atol=1e-11)


# --------------------------------------------------------------------------------------------
# sample / pot methods
# --------------------------------------------------------------------------------------------


def test_sample_matches_scipy_loop():
    x = neuron_zoo(500, np.random.default_rng(4)).astype(np.float32)
    got = wasserstein_to_gaussian(x, "sample", seed=7).numpy()
    g = np.random.default_rng(7).standard_normal(500)
    ref = [scipy.stats.wasserstein_distance(zscore(x[:, j]), g) for j in range(x.shape[1])]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)
    other_seed = wasserstein_to_gaussian(x, "sample", seed=8).numpy()
    assert not np.allclose(other_seed, got)


def test_pot_matches_sample():
    x = neuron_zoo(400, np.random.default_rng(6))
    sample = wasserstein_to_gaussian(x, "sample", seed=3).numpy()
    pot = wasserstein_to_gaussian(x, "pot", seed=3).numpy()
    np.testing.assert_allclose(pot, sample, rtol=0, atol=1e-10)


def test_sample_is_noisy_estimate_of_exact():
    x = neuron_zoo(20_000, np.random.default_rng(8))
    exact = wasserstein_to_gaussian(x).numpy()
    sample = wasserstein_to_gaussian(x, "sample").numpy()
    np.testing.assert_allclose(sample, exact, rtol=0, atol=0.03)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_float16_memmap_in_chunks(tmp_path, method):
    x16 = (neuron_zoo(1000, np.random.default_rng(9))[:, :6] * 3).astype(np.float16)
    x16 = np.concatenate([x16, x16[:, ::-1] * np.float16(0.5)], axis=1)  # 12 neurons
    path = tmp_path / "acts.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=x16.shape)
    mm[:] = x16
    mm.flush()
    del mm
    mm = np.load(path, mmap_mode="r")
    assert isinstance(mm, np.memmap)
    want = wasserstein_to_gaussian(x16.astype(np.float32), method).numpy()
    for chunk in (1, 5, None):
        got = wasserstein_to_gaussian(mm, method, neuron_chunk=chunk).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    stats = neuron_statistics(mm, neuron_chunk=4)
    np.testing.assert_allclose(stats["wd"], wasserstein_to_gaussian(x16).numpy(), atol=1e-13)
    np.testing.assert_allclose(stats["mean"], x16.astype(np.float64).mean(0), rtol=1e-12)


def test_float16_radix_sort_matches_float32_path_bit_for_bit():
    """float16 blocks are sorted as int16 keys (radix sort); results must equal the float32
    path exactly, with NaN, +-inf, +-0, constant and extreme columns."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3000, 140)) * rng.gamma(1, 1, (3000, 140))).astype(np.float16)
    x[3, 0] = np.float16(np.nan)
    x[4, 1] = -np.float16(np.nan)  # sign bit set: must still sort last, as np.sort does
    x[5, 2], x[6, 2] = np.float16(np.inf), -np.float16(np.inf)
    x[:, 3] = np.float16(1.5)
    x[7, 4], x[8, 4] = np.float16(-0.0), np.float16(0.0)
    x[:, 5] = np.float16(65504)
    x[9, 5] = np.float16(-65504)
    x32 = x.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in METHODS:
            got = wasserstein_to_gaussian(x, method).numpy()
            want = wasserstein_to_gaussian(x32, method).numpy()
            np.testing.assert_array_equal(got, want)
        assert np.isnan(got[:4]).all() and np.isfinite(got[4:]).all()
        s16, s32 = neuron_statistics(x), neuron_statistics(x32)
        for key in s32:
            np.testing.assert_array_equal(s16[key], s32[key])
        torch_in = wasserstein_to_gaussian(torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(torch_in, wasserstein_to_gaussian(x32).numpy())
        np.testing.assert_array_equal(
            wasserstein_between(x, x[:700]).numpy(), wasserstein_between(x32, x32[:700]).numpy()
        )


def test_memmap_peak_memory_is_per_block(tmp_path):
    import tracemalloc

    n, d = 50_000, 200
    path = tmp_path / "big.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    rng = np.random.default_rng(0)
    for j in range(0, d, 50):
        mm[:, j : j + 50] = rng.standard_normal((n, 50)).astype(np.float16)
    mm.flush()
    del mm
    mm = np.load(path, mmap_mode="r")
    gaussian_quantile_pieces.cache_clear()
    tracemalloc.start()
    try:
        wd = wasserstein_to_gaussian(mm, neuron_chunk=10, num_threads=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_float32 = n * d * 4  # 40 MB
    assert peak < 0.3 * full_float32, peak
    assert wd.shape == (d,) and bool(torch.isfinite(wd).all())


def test_wide_block_groups(tmp_path):
    # a memmap block wider than one 64-column sort group
    x = np.random.default_rng(10).standard_t(4, (300, 150)).astype(np.float32)
    path = tmp_path / "wide.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    want = wasserstein_to_gaussian(x, neuron_chunk=7).numpy()
    np.testing.assert_allclose(
        wasserstein_to_gaussian(mm, neuron_chunk=150).numpy(), want, rtol=0, atol=1e-13
    )


def test_torch_and_numpy_inputs_identical():
    x = neuron_zoo(700, np.random.default_rng(11)).astype(np.float32)
    for arr in (x, x.astype(np.float64)):
        np.testing.assert_array_equal(
            wasserstein_to_gaussian(torch.from_numpy(arr)).numpy(),
            wasserstein_to_gaussian(arr).numpy(),
        )
    t = torch.from_numpy(x).requires_grad_(True)
    assert wasserstein_to_gaussian(t).dtype == torch.float64
    bf = torch.from_numpy(x).to(torch.bfloat16)
    np.testing.assert_array_equal(
        wasserstein_to_gaussian(bf).numpy(),
        wasserstein_to_gaussian(bf.float().numpy()).numpy(),
    )
    ints = np.random.default_rng(0).integers(-5, 6, (300, 3))
    np.testing.assert_allclose(
        wasserstein_to_gaussian(ints).numpy(),
        wasserstein_to_gaussian(ints.astype(np.float64)).numpy(),
        atol=0,
    )


def test_result_independent_of_threads_and_chunks():
    x = neuron_zoo(2000, np.random.default_rng(12))
    x = np.concatenate([x * k for k in range(1, 20)], axis=1)  # 133 neurons
    ref = wasserstein_to_gaussian(x, num_threads=1).numpy()
    for kw in ({"num_threads": 2}, {"num_threads": 3, "neuron_chunk": 10}, {"neuron_chunk": 133}):
        np.testing.assert_allclose(wasserstein_to_gaussian(x, **kw).numpy(), ref, atol=1e-14)


def test_constant_neuron_is_nan_and_flagged():
    x = neuron_zoo(300, np.random.default_rng(13))
    x[:, 2] = 4.25
    x[:, 5] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in METHODS:
            wd = wasserstein_to_gaussian(x, method).numpy()
            assert np.isnan(wd[[2, 5]]).all()
            assert np.isfinite(np.delete(wd, [2, 5])).all()
        stats = neuron_statistics(x)
        flags = constant_neurons(x)
    assert flags.dtype == torch.bool
    assert flags.nonzero().flatten().tolist() == [2, 5]
    assert stats["constant"].tolist() == flags.tolist()
    assert np.isnan(stats["wd"][2]) and np.isnan(stats["skew"][2])
    assert stats["std"][2] == 0.0 and stats["mean"][2] == 4.25
    assert _exact_torch_block(torch.from_numpy(x)).isnan().nonzero().flatten().tolist() == [2, 5]


def test_non_finite_values_give_nan_silently():
    x = neuron_zoo(200, np.random.default_rng(17))
    x[5, 1] = np.nan
    x[7, 3] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in METHODS:
            wd = wasserstein_to_gaussian(x, method).numpy()
            assert np.isnan(wd[[1, 3]]).all() and np.isfinite(wd[[0, 2, 4, 5, 6]]).all()
        assert np.isnan(neuron_statistics(x)["kurtosis"][[1, 3]]).all()
        assert np.isnan(wasserstein_between(x, x[:50]).numpy()[1])


def test_invariant_to_positive_affine_maps():
    x = neuron_zoo(800, np.random.default_rng(14))
    base = wasserstein_to_gaussian(x).numpy()
    for scale, shift in ((3.7, -12.0), (1e-3, 5.0), (250.0, 1e4)):
        np.testing.assert_allclose(
            wasserstein_to_gaussian(scale * x + shift).numpy(), base, rtol=1e-9, atol=1e-11
        )


def test_empty_neuron_axis():
    assert wasserstein_to_gaussian(np.zeros((10, 0))).shape == (0,)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros(10), "2-D"),
        (np.zeros((4, 5, 6)), "2-D"),
        (np.zeros((1, 5)), "at least 2 tokens"),
        (torch.zeros(3), "2-D"),
        (np.zeros((5, 2), dtype=complex), "real"),
    ],
)
def test_bad_inputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        wasserstein_to_gaussian(bad)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="exact, sample, pot"):
        wasserstein_to_gaussian(np.zeros((5, 2)), method="scipy")
    with pytest.raises(ValueError, match="neuron_chunk"):
        wasserstein_to_gaussian(np.ones((5, 2)), neuron_chunk=0)


# --------------------------------------------------------------------------------------------
# wasserstein_between, statistics, pieces
# --------------------------------------------------------------------------------------------


def test_wasserstein_between_matches_scipy():
    rng = np.random.default_rng(15)
    u = neuron_zoo(137, rng)
    v = neuron_zoo(61, rng)[:, ::-1] * 1.5
    got = wasserstein_between(u, v).numpy()
    ref = [scipy.stats.wasserstein_distance(u[:, j], v[:, j]) for j in range(u.shape[1])]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)
    got_std = wasserstein_between(torch.from_numpy(u), v, standardize=True).numpy()
    ref_std = [
        scipy.stats.wasserstein_distance(zscore(u[:, j]), zscore(v[:, j]))
        for j in range(u.shape[1])
    ]
    np.testing.assert_allclose(got_std, ref_std, rtol=1e-12, atol=1e-13)
    # equal sizes, multi-group blocks, float32
    u2 = rng.standard_normal((300, 70)).astype(np.float32)
    v2 = rng.standard_t(3, (300, 70)).astype(np.float32)
    ref2 = [scipy.stats.wasserstein_distance(u2[:, j], v2[:, j]) for j in range(70)]
    np.testing.assert_allclose(wasserstein_between(u2, v2).numpy(), ref2, rtol=1e-6)
    assert wasserstein_between(u, u).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="same number of neurons"):
        wasserstein_between(u, v[:, :3])


def test_neuron_statistics_matches_scipy():
    x = neuron_zoo(1500, np.random.default_rng(16)).astype(np.float32)
    stats = neuron_statistics(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(stats["mean"], x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["std"], x64.std(0), rtol=1e-12)
    np.testing.assert_allclose(stats["skew"], scipy.stats.skew(x64), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["kurtosis"], scipy.stats.kurtosis(x64), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(stats["wd"], wasserstein_to_gaussian(x).numpy())
    np.testing.assert_array_equal(stats["min"], x64.min(0))
    np.testing.assert_array_equal(stats["n_tokens"], np.full(7, 1500))
    sample = neuron_statistics(x, method="sample", seed=2)["wd"]
    np.testing.assert_array_equal(sample, wasserstein_to_gaussian(x, "sample", seed=2).numpy())
    assert set(stats) >= {"wd", "mean", "std", "skew", "kurtosis", "n_tokens", "constant"}


def test_gaussian_quantile_pieces():
    p = gaussian_quantile_pieces(1000)
    assert p is gaussian_quantile_pieces(1000)
    assert np.isneginf(p.a[0]) and np.isposinf(p.b[-1])
    assert np.all((p.mu > p.a) & (p.mu < p.b))
    assert abs(p.mu.sum()) < 1e-9
    # mu_i is the mean of N(0,1) on the piece: check one interior piece by quadrature
    i = 600
    val, _ = integrate.quad(lambda t: t * scipy.stats.norm.pdf(t), p.a[i], p.b[i])
    assert p.mu[i] == pytest.approx(1000 * val, rel=1e-10)
    with pytest.raises(ValueError):
        p.mu[0] = 1.0


# --------------------------------------------------------------------------------------------
# row selection (rows=): statistics of activations[rows], gathered per block
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("method", METHODS)
def test_rows_equal_the_sliced_array(tmp_path, dtype, method):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((960, 150)).astype(dtype)
    x[::32] = 8.0 + rng.standard_normal((30, 150))  # a spike at every window start
    np.save(tmp_path / "a.npy", x)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    rows = np.flatnonzero(np.arange(960) % 32 != 0)
    sliced = x[rows]
    expected = wasserstein_to_gaussian(sliced, method).numpy()
    for src in (x, mm, torch.from_numpy(x)):
        assert np.array_equal(wasserstein_to_gaussian(src, method, rows=rows).numpy(), expected)
    mask = np.arange(960) % 32 != 0
    assert np.array_equal(wasserstein_to_gaussian(mm, method, rows=mask).numpy(), expected)
    stats = neuron_statistics(mm, method, rows=rows)
    ref = neuron_statistics(sliced, method)
    for key in ref:
        assert np.array_equal(stats[key], ref[key], equal_nan=True), key
    assert (stats["n_tokens"] == len(rows)).all()
    if method == "exact":  # and against scipy's W1 to a fine grid of Gaussian quantiles
        grid = ndtri((np.arange(100_000) + 0.5) / 100_000)
        for j in (0, 77):
            w = scipy.stats.wasserstein_distance(zscore(sliced[:, j]), grid)
            assert expected[j] == pytest.approx(w, abs=5e-4)
        assert (wasserstein_to_gaussian(x).numpy() > expected).all()  # the spike is removed


def test_rows_on_the_torch_kernel():
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((500, 20)))
    rows = np.arange(1, 500, 3)
    out = _exact_torch(x, torch.device("cpu"), None, rows)
    ref = wasserstein_to_gaussian(x[torch.from_numpy(rows)]).numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10)


@pytest.mark.parametrize(
    "rows, match",
    [
        (np.array([0]), "at least 2"),
        (np.array([0, 100]), "must index"),
        (np.array([-1, 3]), "must index"),
        (np.ones(5, dtype=bool), "shape"),
        (np.array([[0, 1]]), "1-D integer"),
        (np.array([0.0, 1.0]), "1-D integer"),
    ],
)
def test_bad_rows_raise(rows, match):
    with pytest.raises(ValueError, match=match):
        wasserstein_to_gaussian(np.random.default_rng(0).standard_normal((100, 3)), rows=rows)
