"""The selection-based ``lowest_k_mask`` marks what a stable sort marks (issue 10, speed).

``lowest_k_mask`` finds the ``k``-th smallest score with ``torch.kthvalue`` (O(n)) instead of
sorting the whole block; these tests pin it to the stable-sort definition it replaced, and
SparseGPT's pruned weights to those of the sort-based selection, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from wasserstein_neurons.pruning import PruneSpec, SparseGPTPruner, lowest_k_mask
from wasserstein_neurons.pruning import sparsegpt as sparsegpt_module


def sort_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The previous implementation: the first ``k`` indices of a stable sort."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        flat[torch.sort(scores.reshape(-1), stable=True).indices[:k]] = True
    return flat.view(scores.shape)


def _scores(kind: int, shape, g) -> torch.Tensor:
    if kind == 0:
        return torch.rand(shape, generator=g)
    if kind == 1:  # many ties
        return torch.randint(0, 4, shape, generator=g).float()
    if kind == 2:  # all tied
        return torch.zeros(shape)
    if kind == 3:
        return torch.randint(0, 3, shape, generator=g).double() ** 2
    s = torch.rand(shape, generator=g)
    s[s > 0.8] = float("inf")
    return s


@pytest.mark.parametrize("kind", range(5))
def test_lowest_k_mask_is_the_stable_sort(kind):
    g = torch.Generator().manual_seed(kind)
    for _ in range(40):
        shape = tuple(int(v) for v in torch.randint(1, 30, (2,), generator=g))
        s = _scores(kind, shape, g)
        n = s.numel()
        for k in {0, 1, n // 2, n - 1, n, int(torch.randint(0, n + 1, (1,), generator=g))}:
            assert torch.equal(lowest_k_mask(s, k), sort_mask(s, k)), (shape, k)


def test_lowest_k_mask_with_nan_falls_back_to_the_sort():
    s = torch.rand(7, 9)
    s[0, 3] = float("nan")
    for k in range(s.numel() + 1):
        assert torch.equal(lowest_k_mask(s, k), sort_mask(s, k))


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_sparsegpt_weights_unchanged_by_the_selection(monkeypatch, sparsity):
    """Bit-identical weights and masks with the old (sort) and new (kthvalue) selection."""
    g = torch.Generator().manual_seed(1)
    d, r = 320, 96
    A = torch.randn(d, d, generator=g) / math.sqrt(d) + 0.5 * torch.eye(d)
    x = torch.randn(2000, d, generator=g) @ A
    w = torch.randn(r, d, generator=g)
    w[::7, ::5] = 0.0  # ties at zero saliency
    pruner = SparseGPTPruner(d)
    pruner.add_batch(x)
    new = pruner.prune(w, PruneSpec(sparsity=sparsity))
    monkeypatch.setattr(sparsegpt_module, "lowest_k_mask", sort_mask)
    old = pruner.prune(w, PruneSpec(sparsity=sparsity))
    assert torch.equal(new.weight, old.weight) and torch.equal(new.mask, old.mask)
    assert new.stats["error"] == pytest.approx(old.stats["error"], rel=1e-9)
