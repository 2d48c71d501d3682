"""Batched SparseGPT (issue 10): k experts pruned together equal pruning them one by one."""

from __future__ import annotations

import math

import pytest
import torch

from wasserstein_neurons.pruning import PruneSpec, SparseGPTPruner
from wasserstein_neurons.pruning.sparsegpt_batched import prune_batched


def _problem(k=4, r=24, d=160, seed=0, dtype=torch.float64):
    """One weight and ``k`` cluster Hessians of correlated inputs (one with a dead input)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d) + 0.5 * torch.eye(d)
    hs = []
    for e in range(k):
        x = torch.randn(400, d, generator=g, dtype=torch.float64) @ A
        x[:, e] *= 3.0  # each cluster has its own scale on one input
        if e == 1:
            x[:, 7] = 0.0  # a dead input in one cluster
        hs.append(2 * x.T @ x / x.shape[0])
    w = torch.randn(r, d, generator=g, dtype=torch.float64)
    return w.to(dtype), torch.stack(hs).to(dtype)


SPECS = {
    "block rule 0.5": (PruneSpec(sparsity=0.5), False),
    "block rule 0.9": (PruneSpec(sparsity=0.9), False),
    "per row 0.7": (PruneSpec(sparsity=0.7), True),
    "2:4": (PruneSpec(prunen=2, prunem=4), False),
}


@pytest.mark.parametrize("name", SPECS)
def test_batched_equals_one_by_one(name):
    spec, per_row = SPECS[name]
    w, H = _problem()
    W, mask, losses = prune_batched(w, H, spec, per_row=per_row)
    for e in range(H.shape[0]):
        pruner = SparseGPTPruner.from_hessian(H[e], nsamples=400, dtype=torch.float64)
        ref = pruner.prune(w, PruneSpec(**{**spec.__dict__, "per_row": per_row}))
        assert torch.equal(mask[e], ref.mask), f"expert {e}: masks differ"
        torch.testing.assert_close(W[e], ref.weight, rtol=1e-9, atol=1e-11)
        assert losses[e].item() == pytest.approx(ref.stats["error"], rel=1e-9)


def test_one_hessian_is_sparsegpt():
    w, H = _problem(k=1)
    W, mask, _ = prune_batched(w, H, PruneSpec(sparsity=0.6))
    ref = SparseGPTPruner.from_hessian(H[0], dtype=torch.float64).prune(w, PruneSpec(sparsity=0.6))
    assert torch.equal(mask[0], ref.mask)
    torch.testing.assert_close(W[0], ref.weight, rtol=1e-9, atol=1e-11)


def test_float32_within_rounding_and_errors():
    w, H = _problem(dtype=torch.float32)
    W, mask, _ = prune_batched(w, H, PruneSpec(sparsity=0.5))
    assert W.dtype == torch.float32 and (W == 0).double().mean().item() == pytest.approx(
        0.5, abs=0.01
    )
    ref = SparseGPTPruner.from_hessian(H[2]).prune(w, PruneSpec(sparsity=0.5))
    assert (mask[2] != ref.mask).double().mean().item() < 0.01  # float rounding may flip ties
    with pytest.raises(ValueError, match="does not quantize"):
        prune_batched(w, H, PruneSpec(sparsity=0.5, wbits=4))
