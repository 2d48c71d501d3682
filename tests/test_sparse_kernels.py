"""Sparse execution (issue 10): every kernel gives the dense product within float rounding, the
automatic choice follows the rule, and SE / pruned linears run through it unchanged."""

from __future__ import annotations

import pytest
import torch

from wasserstein_neurons.expansion import ExpertRoutedLinear
from wasserstein_neurons.expansion.router import fit_router
from wasserstein_neurons.sparse_kernels import (
    KernelRule,
    SparseLinear,
    SparseMatrix,
    choose_kernel,
)


def _sparse_weight(out, d_in, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, d_in, generator=g)
    return w * (torch.rand(out, d_in, generator=g) >= sparsity)


@pytest.mark.parametrize("kernel", ["dense", "scipy_csr", "torch_csr", "auto"])
@pytest.mark.parametrize("n", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_equal_dense(kernel, n, dtype):
    w = _sparse_weight(48, 40, 0.9).to(dtype)
    x = torch.randn(n, 40, dtype=dtype)
    got = SparseMatrix(w, kernel).matmul_t(x)
    assert got.shape == (n, 48) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, x @ w.T, rtol=tol, atol=tol)


def test_automatic_choice_follows_the_rule():
    cpu = torch.device("cpu")
    rule = KernelRule(small_batch=16, scipy_min_sparsity=0.8, torch_min_sparsity=0.9)
    assert choose_kernel(0.5, 1, cpu, rule) == "dense"
    assert choose_kernel(0.85, 1, cpu, rule) == "scipy_csr"
    assert choose_kernel(0.85, 256, cpu, rule) == "dense"
    assert choose_kernel(0.95, 256, cpu, rule) == "torch_csr"
    assert choose_kernel(0.5, 1, torch.device("cuda"), rule) == "dense"
    m = SparseMatrix(_sparse_weight(32, 32, 0.95))
    assert m.sparsity > 0.9 and m.kernel_for(1, torch.float32) == "scipy_csr"
    assert m.kernel_for(1, torch.bfloat16) == "dense"  # scipy has no bf16: fall back
    with pytest.raises(ValueError, match="unknown kernel"):
        SparseMatrix(m.weight, "cusparse")


def test_sparse_linear_matches_the_linear():
    lin = torch.nn.Linear(40, 24)
    with torch.no_grad():
        lin.weight.copy_(_sparse_weight(24, 40, 0.9))
    sparse = SparseLinear(lin)
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), lin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse(x[:1, :1]), lin(x[:1, :1]), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    sparse(x).sum().backward()  # with gradients: the dense product
    assert x.grad is not None


def test_expert_layer_with_sparse_kernels_is_unchanged():
    x = torch.randn(300, 40)
    router = fit_router(x, 4, seed=0)
    experts = torch.stack([_sparse_weight(24, 40, 0.92, seed=e) for e in range(4)])
    layer = ExpertRoutedLinear(experts, router, bias=torch.randn(24))
    with torch.no_grad():
        dense = layer(x)
        one = layer(x[:1])
        layer.use_sparse_kernels("auto")
        torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x[:1]), one, rtol=1e-5, atol=1e-5)
        layer.use_sparse_kernels("dense")
        assert torch.equal(layer(x), dense)
