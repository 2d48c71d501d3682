"""Tests of the weight-level pruners (magnitude, Wanda, SparseGPT)."""

from __future__ import annotations

import math

import pytest
import torch

from wasserstein_neurons.pruning import (
    PRUNERS,
    MagnitudePruner,
    PruneSpec,
    SparseGPTPruner,
    WandaPruner,
    make_pruner,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
METHODS = ["magnitude", "wanda", "sparsegpt"]


def nearest(x: float) -> int:
    """The documented rounding rule for pruned counts: nearest integer, halves up."""
    return int(math.floor(x + 0.5))


def correlated_inputs(g, n, d, A, big, dtype=torch.float64):
    """``Z A`` with ``Z`` standard normal, plus a few large-scale (outlier) columns."""
    X = torch.randn(n, d, generator=g, dtype=dtype) @ A
    X[:, big] *= 10
    return X


def problem(seed=0, out=16, d=32, n=512, device="cpu", dtype=torch.float32):
    """A weight ``[out, d]`` and calibration inputs ``[n // 64, 64, d]`` (correlated)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    A += 0.5 * torch.eye(d, dtype=torch.float64)
    big = torch.randperm(d, generator=g)[:3]
    X = correlated_inputs(g, n, d, A, big)
    W = torch.randn(out, d, generator=g, dtype=torch.float64)
    return W.to(device, dtype), X.reshape(-1, 64, d).to(device, dtype)


def calibrated(method, X, device="cpu", **kwargs):
    pruner = make_pruner(method, X.shape[-1], device=device, **kwargs)
    pruner.add_batch(X)
    return pruner


# ------------------------------------------------------------------------------ sparsity


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_exact_per_row_sparsity(method, sparsity, device):
    W, X = problem(device=device, d=40)
    W0 = W.clone()
    pruner = calibrated(method, X, device)
    # the per-row rule: Wanda's default, an option of magnitude and SparseGPT
    spec = PruneSpec(sparsity=sparsity, per_row=True)
    res = pruner.prune(W, spec)
    zeros = (res.weight == 0).sum(1)
    assert torch.equal(zeros, torch.full_like(zeros, nearest(sparsity * 40)))
    assert torch.equal(res.mask, res.weight == 0)
    assert res.weight.dtype == W.dtype and res.weight.device == W.device
    assert res.sparsity == pytest.approx(nearest(sparsity * 40) / 40)
    assert torch.equal(W, W0), "input weight modified"


@pytest.mark.parametrize("device", DEVICES)
def test_magnitude_per_matrix(device):
    W, _ = problem(device=device, out=12, d=20)
    W[:4] *= 5  # rows of very different scale: per-matrix sparsity is uneven across rows
    res = MagnitudePruner(20).prune(W, PruneSpec(sparsity=0.6))
    assert int(res.mask.sum()) == nearest(0.6 * W.numel())
    assert torch.equal(res.mask, res.weight == 0)
    assert W.abs()[res.mask].max() <= W.abs()[~res.mask].min()  # one global threshold
    per_row = res.mask.sum(1)
    assert per_row[:4].float().mean() < per_row[4:].float().mean()
    # same threshold semantics with heavy ties (4-bit-like weights): count stays exact
    Wq = torch.round(W * 2) / 2
    resq = MagnitudePruner(20).prune(Wq, sparsity=0.37)
    assert int(resq.mask.sum()) == nearest(0.37 * W.numel())


def test_magnitude_and_wanda_choose_lowest_scores():
    W, X = problem(d=24)
    norms = X.reshape(-1, 24).double().norm(dim=0)
    for method, score in [("magnitude", W.abs()), ("wanda", W.abs().double() * norms)]:
        res = calibrated(method, X).prune(W, sparsity=0.5, per_row=True)
        for j in range(W.shape[0]):
            assert score[j][res.mask[j]].max() <= score[j][~res.mask[j]].min()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern(method, n, m, device):
    W, X = problem(device=device, d=32)
    res = calibrated(method, X, device).prune(W, PruneSpec(prunen=n, prunem=m, blocksize=16))
    groups = (res.weight == 0).reshape(W.shape[0], -1, m).sum(-1)
    # weights are nonzero a.s., so every group has exactly n zeros
    assert torch.equal(groups, torch.full_like(groups, n))
    assert res.sparsity == pytest.approx(n / m)
    # the sparsity field may repeat n/m
    res2 = calibrated(method, X, device).prune(W, PruneSpec(sparsity=n / m, prunen=n, prunem=m))
    assert (res2.weight == 0).reshape(W.shape[0], -1, m).sum(-1).eq(n).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_is_identity(method, device):
    W, X = problem(device=device)
    W[0, 3] = 0.0
    pruner = calibrated(method, X, device)
    for spec in [PruneSpec(sparsity=0.0), PruneSpec(sparsity=0.0, rows=torch.tensor([1, 5]))]:
        res = pruner.prune(W, spec)
        assert torch.equal(res.weight, W)
        assert res.weight.data_ptr() != W.data_ptr()
        assert not res.mask.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_row_restricted(method, device):
    W, X = problem(device=device, out=20, d=32)
    W0 = W.clone()
    rows = torch.tensor([17, 2, 9, 3], device=device)
    others = torch.ones(20, dtype=torch.bool)
    others[rows.cpu()] = False
    pruner = calibrated(method, X, device)
    for per_row in [True, None]:
        res = pruner.prune(W, PruneSpec(sparsity=0.9, rows=rows, per_row=per_row))
        assert torch.equal(res.weight[others], W0[others]), "unselected rows must be bit-identical"
        assert not res.mask[others].any()
        zeros = (res.weight[rows] == 0).sum(1)
        if method != "wanda" and per_row is None:  # per matrix (blocks) over the selected rows
            assert int(zeros.sum()) == nearest(0.9 * 4 * 32)
        else:
            assert torch.equal(zeros, torch.full_like(zeros, nearest(0.9 * 32)))
        assert res.sparsity == pytest.approx(float(zeros.sum()) / (4 * 32))
    # a boolean mask selects the same rows
    bool_rows = ~others.to(device)
    res_b = pruner.prune(W, PruneSpec(sparsity=0.9, rows=bool_rows))
    assert torch.equal(res_b.weight, pruner.prune(W, PruneSpec(sparsity=0.9, rows=rows)).weight)
    assert torch.equal(W, W0)


def test_sparsegpt_rows_equal_full_matrix_rows():
    # OBS updates never mix rows, so with the per-row mask rule pruning a sub-matrix equals
    # pruning everything and keeping those rows (the default block rule couples the rows).
    W, X = problem(out=10, d=32, dtype=torch.float64)
    pruner = calibrated("sparsegpt", X, dtype=torch.float64)
    rows = torch.tensor([0, 4, 7])
    full = pruner.prune(W, PruneSpec(sparsity=0.6, blocksize=8, per_row=True)).weight
    part = pruner.prune(W, PruneSpec(sparsity=0.6, blocksize=8, rows=rows, per_row=True)).weight
    torch.testing.assert_close(part[rows], full[rows], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_inplace_and_low_precision(method):
    W, X = problem()
    Wb = W.to(torch.bfloat16)
    Wb0 = Wb.clone()
    pruner = calibrated(method, X)
    rows = torch.tensor([1, 2])
    res = pruner.prune(Wb, PruneSpec(sparsity=0.5, rows=rows, per_row=True))
    assert res.weight.dtype == torch.bfloat16
    others = torch.tensor([0] + list(range(3, W.shape[0])))
    assert torch.equal(res.weight[others], Wb0[others]) and torch.equal(Wb, Wb0)
    assert ((res.weight[rows] == 0).sum(1) == 16).all()
    out = pruner.prune(Wb, PruneSpec(sparsity=0.5, rows=rows, per_row=True), inplace=True)
    assert out.weight is Wb
    assert torch.equal(Wb, res.weight)


def test_sparsegpt_default_is_the_reference_block_rule():
    # the default: one count over each column block of all rows (IST-DASLab's fasterprune),
    # exactly the requested count per block (not the reference's `<=` extra weight)
    W, X = problem(out=8, d=32)
    pruner = calibrated("sparsegpt", X)
    res = pruner.prune(W, PruneSpec(sparsity=0.5, blocksize=8))
    blocks = res.mask.reshape(8, 4, 8).sum((0, 2))
    assert blocks.tolist() == [32, 32, 32, 32]
    assert len(set(res.mask.sum(1).tolist())) > 1  # rows differ: not a per-row rule
    explicit = pruner.prune(W, PruneSpec(sparsity=0.5, blocksize=8, per_row=False))
    assert torch.equal(res.weight, explicit.weight)
    per_row = pruner.prune(W, PruneSpec(sparsity=0.5, blocksize=8, per_row=True))
    assert set(per_row.mask.sum(1).tolist()) == {16}


def test_sparsegpt_dead_inputs():
    W, X = problem(d=32)
    X[..., 5] = 0
    res = calibrated("sparsegpt", X).prune(W, sparsity=0.5)
    assert torch.isfinite(res.weight).all()
    assert (res.weight[:, 5] == 0).all() and res.mask[:, 5].all()
    assert res.stats["dead_inputs"] == 1


# ------------------------------------------------------------------------------ calibration


def test_calibration_statistics_accumulate_over_batches():
    _, X = problem(d=16, n=640, dtype=torch.float64)
    flat = X.reshape(-1, 16)
    wanda, sgpt = WandaPruner(16), SparseGPTPruner(16, dtype=torch.float64)
    for p in (wanda, sgpt):
        p.add_batch(X[:3])  # [batch, seq, in]
        p.add_batch(flat[192:300])  # [tokens, in]
        p.add_batch(flat[300:].float())  # other dtype
        assert p.nsamples == 640
    torch.testing.assert_close(wanda.input_norms, flat.norm(dim=0), rtol=1e-6, atol=0)
    torch.testing.assert_close(sgpt.H, 2 / 640 * flat.T @ flat, rtol=1e-6, atol=1e-9)
    W = torch.randn(8, 16, dtype=torch.float64)
    direct = SparseGPTPruner.from_hessian(flat.T @ flat, nsamples=640)  # scale-free
    torch.testing.assert_close(
        direct.prune(W, sparsity=0.5).weight, sgpt.prune(W, sparsity=0.5).weight
    )
    sgpt.reset()
    wanda.reset()
    assert sgpt.nsamples == wanda.nsamples == 0 and not sgpt.H.any() and not wanda.sq_mean.any()


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        PruneSpec(sparsity=bad)


@pytest.mark.parametrize(("n", "m"), [(2, 2), (3, 2), (-1, 4), (2, 0), (0, 4), (4, 0)])
def test_malformed_nm(n, m):
    with pytest.raises(ValueError, match="n:m"):
        PruneSpec(prunen=n, prunem=m)


def test_other_errors():
    W, X = problem(d=32)
    pruner = calibrated("sparsegpt", X)
    with pytest.raises(ValueError, match="in % m"):
        calibrated("wanda", X[..., :30]).prune(W[:, :30], prunen=2, prunem=4)
    with pytest.raises(ValueError, match="contradicts"):
        PruneSpec(sparsity=0.3, prunen=2, prunem=4)
    with pytest.raises(ValueError, match="prunem must divide the 6-column"):
        PruneSpec(prunen=2, prunem=4, blocksize=6)
    with pytest.raises(ValueError, match="wbits must be an integer in 1..15"):
        PruneSpec(wbits=33)
    with pytest.raises(ValueError, match="magnitude, sparsegpt, wanda"):
        make_pruner("obs", 32)
    with pytest.raises(ValueError, match="wbits"):
        calibrated("wanda", X).prune(W, sparsity=0.5, wbits=4)
    with pytest.raises(ValueError, match="rows must lie"):
        pruner.prune(W, sparsity=0.5, rows=torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="duplicate"):
        pruner.prune(W, sparsity=0.5, rows=[1, 1])
    with pytest.raises(ValueError, match="d_in"):
        pruner.prune(W.T, sparsity=0.5)
    with pytest.raises(ValueError, match="last dimension"):
        pruner.add_batch(X[..., :8])
    bad = X.clone()
    bad[0, 3, 5] = float("nan")
    for method in METHODS:  # the NaN input is named, not a Cholesky failure later
        with pytest.raises(ValueError, match="1 of .* calibration inputs hold NaN"):
            make_pruner(method, 32).add_batch(bad)
    with pytest.raises(RuntimeError, match="add_batch"):
        make_pruner("wanda", 32).prune(W, sparsity=0.5)
    assert set(PRUNERS) == set(METHODS)
    assert isinstance(make_pruner(" SparseGPT ", 4), SparseGPTPruner)


# ------------------------------------------------------------------------------ quality


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [PruneSpec(sparsity=0.5), PruneSpec(prunen=2, prunem=4)])
def test_reconstruction_error_ordering(spec, device):
    # Correlated inputs (Z A, A with decaying row scales) plus a few outlier columns: Wanda
    # beats magnitude (outlier columns), SparseGPT beats Wanda (it compensates with the
    # correlated columns).  Error is measured on held-out inputs of the same distribution.
    d, out = 64, 32
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        A = torch.logspace(0, -1.5, d, dtype=torch.float64)[:, None] * torch.randn(
            d, d, generator=g, dtype=torch.float64
        )
        big = torch.randperm(d, generator=g)[:4]
        Xc, Xt = (correlated_inputs(g, 2048, d, A, big).to(device) for _ in range(2))
        W = torch.randn(out, d, generator=g, dtype=torch.float64).to(device, torch.float32)
        err = {}
        for method in METHODS:
            Wh = calibrated(method, Xc.float().reshape(4, 512, d), device).prune(W, spec).weight
            err[method] = float(((W - Wh).double() @ Xt.T).norm() / (W.double() @ Xt.T).norm())
        assert err["sparsegpt"] < 0.85 * err["wanda"], err
        assert err["wanda"] < 0.7 * err["magnitude"], err


# ------------------------------------------------------------------------------ OBS check


def ref_quant_grid(W, bits):
    """Independent asymmetric min-max grid per row: levels ``scale * (j - zero)``."""
    maxq = 2**bits - 1
    lo = W.min(1).values.clamp(max=0)
    hi = W.max(1).values.clamp(min=0)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)

    def quant(v, j):
        return scale[j] * (torch.clamp(torch.round(v / scale[j]) + zero[j], 0, maxq) - zero[j])

    return quant


def bruteforce_sparsegpt(
    W, H, sparsity=0.0, blocksize=128, percdamp=0.01, n=0, m=0, wbits=16, per_row=False
):
    """Re-derivation of SparseGPT from the OBS formulas, without Cholesky or lazy updates.

    Columns are processed left to right.  ``F = {q, ..., d-1}`` are the unprocessed columns and
    ``Hf_inv = inv(H[F, F])`` (explicit inverse of the damped Hessian restricted to them).
    Setting ``w_q`` to its target ``t`` (0 if pruned, the quantized value if kept and
    quantizing, else unchanged) and re-optimising the rest of the row gives the OBS update
    ``delta = -(w_q - t) / Hf_inv[0, 0] * Hf_inv[0, :]`` on ``w[F]``; then ``q`` is dropped.

    Mask selection uses the OBS saliency ``w_q^2 / [H_F^-1]_qq`` of the current weights.  (The
    implementation divides ``w^2`` by the squared diagonal of the Cholesky factor ``U`` of
    ``H^-1``; since ``U[q, q:] = [H_F^-1]_{q,:} / sqrt([H_F^-1]_qq)``, ``U_qq^2 = [H_F^-1]_qq``,
    so both are the same quantity computed in independent ways.)  Unstructured: at the start of
    every block, the reference's rule marks the ``round(s*r*i2) - round(s*r*i1)`` lowest
    saliencies of the whole ``[r, block]`` slice (``per_row``: each row its
    ``round(s*i2) - round(s*i1)`` lowest); n:m: at the start of each group of ``m`` columns,
    the ``n`` lowest of the group.
    """
    W = W.clone()
    H = H.clone()
    r, d = W.shape
    H += percdamp * H.diagonal().mean() * torch.eye(d, dtype=H.dtype)
    Hf_invs = [torch.linalg.inv(H[q:, q:]) for q in range(d)]
    quant = ref_quant_grid(W, wbits) if wbits < 16 else None
    mask = torch.zeros(r, d, dtype=torch.bool)
    for q in range(d):
        if n == 0 and sparsity > 0 and q % blocksize == 0:
            end = min(q + blocksize, d)
            sal = torch.stack(
                [W[:, c] ** 2 / Hf_invs[c][0, 0] for c in range(q, end)], dim=1
            )  # [r, block]
            if per_row:
                k = nearest(sparsity * end) - nearest(sparsity * q)
                for j in range(r):
                    mask[j, q + torch.argsort(sal[j])[:k]] = True
            else:
                k = nearest(sparsity * r * end) - nearest(sparsity * r * q)
                for flat in torch.argsort(sal.reshape(-1))[:k].tolist():
                    mask[flat // (end - q), q + flat % (end - q)] = True
        if n > 0 and q % m == 0:
            sal = torch.stack([W[:, c] ** 2 / Hf_invs[c][0, 0] for c in range(q, q + m)], dim=1)
            for j in range(r):
                mask[j, q + torch.argsort(sal[j])[:n]] = True
        Hf_inv = Hf_invs[q]
        for j in range(r):
            if mask[j, q]:
                target = torch.zeros((), dtype=W.dtype)
            elif quant is not None:
                target = quant(W[j, q], j)
            else:
                continue
            W[j, q:] -= (W[j, q] - target) / Hf_inv[0, 0] * Hf_inv[0, :]
            W[j, q] = target
    return W, mask


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sparsity=0.5, blocksize=8),  # one block
        dict(sparsity=0.5, blocksize=4),  # two blocks: checks the lazy batch update
        dict(sparsity=0.4, blocksize=2),  # uneven per-block counts (cumulative rounding)
        dict(sparsity=0.5, blocksize=4, per_row=True),  # the per-row variant
        dict(sparsity=0.4, blocksize=2, per_row=True),
        dict(prunen=2, prunem=4, blocksize=8),
        dict(prunen=1, prunem=2, blocksize=4),
        dict(sparsity=0.25, blocksize=4, wbits=3),  # GPTQ-style quantization in the loop
        dict(sparsity=0.0, blocksize=4, wbits=2),  # quantization only
    ],
)
def test_sparsegpt_matches_bruteforce_obs(kwargs):
    g = torch.Generator().manual_seed(3)
    r, d = 4, 8
    X = torch.randn(64, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64
    )
    W = torch.randn(r, d, generator=g, dtype=torch.float64)
    pruner = SparseGPTPruner(d, dtype=torch.float64)
    pruner.add_batch(X)
    res = pruner.prune(W, PruneSpec(**kwargs))
    H = 2 / X.shape[0] * X.T @ X  # independent Hessian
    n, m = kwargs.get("prunen", 0), kwargs.get("prunem", 0)
    W_bf, mask_bf = bruteforce_sparsegpt(
        W,
        H,
        kwargs.get("sparsity", 0.0),
        kwargs["blocksize"],
        n=n,
        m=m,
        wbits=kwargs.get("wbits", 16),
        per_row=kwargs.get("per_row", False),
    )
    assert torch.equal(res.mask, mask_bf)
    torch.testing.assert_close(res.weight, W_bf, rtol=0, atol=1e-9)
    if kwargs.get("wbits", 16) >= 16:
        # kept weights changed by the OBS updates (a pure mask would leave them equal)
        assert not torch.allclose(res.weight[~res.mask], W[~res.mask])


# ------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_quantization_levels(sparsity, device):
    W, X = problem(device=device, out=16, d=64, n=1024)
    pruner = calibrated("sparsegpt", X, device)
    res = pruner.prune(W, PruneSpec(sparsity=sparsity, wbits=4, blocksize=32))
    for j in range(W.shape[0]):
        nonzero = res.weight[j][res.weight[j] != 0]
        assert torch.unique(nonzero).numel() <= 2**4 - 1  # the 16-level grid contains 0
    # the mask has the exact count (over all rows: the reference's block rule); quantization
    # may round a few more weights to 0
    assert int(res.mask.sum()) == nearest(sparsity * 64 * 16)
    assert (res.weight[res.mask] == 0).all()
    assert not torch.equal(res.weight, W)
    # GPTQ-style error feedback beats round-to-nearest on the calibration inputs
    from wasserstein_neurons.pruning import quantize_rows

    if sparsity == 0.0:
        flat = X.reshape(-1, 64)
        e_gptq = ((W - res.weight) @ flat.T).norm()
        e_rtn = ((W - quantize_rows(W, 4)) @ flat.T).norm()
        assert e_gptq < 0.8 * e_rtn


@pytest.mark.parametrize("count", [128, 77])
def test_fixed_mask_block_equals_the_reference_column_loop(count):
    """The transposed, sub-blocked loop of an unstructured block equals the reference's column
    loop within float rounding, with the same mask and exact zeros (float64: to 1e-12)."""
    from wasserstein_neurons.pruning.sparsegpt import (
        _obs_block_columnwise,
        _obs_block_fixed_mask,
    )

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4 * count, count, generator=g, dtype=torch.float64)
    H = x.T @ x / x.shape[0] + 0.01 * torch.eye(count, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    d = torch.diag(U)
    W1 = torch.randn(40, count, generator=g, dtype=torch.float64)
    mask = torch.rand(40, count, generator=g) < 0.6
    spec = PruneSpec(sparsity=0.6)
    Q_ref, E_ref = _obs_block_columnwise(W1.clone(), U, d, mask.clone(), spec, None)
    W_in = W1.clone()
    Q, E = _obs_block_fixed_mask(W_in, U, d, mask)
    assert torch.equal(W_in, W1)  # the input is not modified
    assert torch.equal(Q == 0, Q_ref == 0) and bool((Q[mask] == 0).all())
    torch.testing.assert_close(Q, Q_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(E, E_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [5, 300, 700])
def test_gram_update_equals_addmm(d):
    """The strip-wise symmetric Gram equals torch.addmm (float64: to rounding) and is exactly
    symmetric."""
    from wasserstein_neurons.gram import gram_update_

    g = torch.Generator().manual_seed(d)
    x = torch.randn(257, d, generator=g, dtype=torch.float64)
    G0 = torch.randn(d, d, generator=g, dtype=torch.float64)
    G0 = G0 + G0.T
    G = gram_update_(G0.clone(), x, beta=0.25, alpha=2.0)
    torch.testing.assert_close(G, torch.addmm(G0, x.T, x, beta=0.25, alpha=2.0))
    assert torch.equal(G, G.T)
    with pytest.raises(ValueError, match="does not fit"):
        gram_update_(torch.zeros(d + 1, d + 1, dtype=torch.float64), x)
