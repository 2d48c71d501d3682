r"""Sparse execution of pruned weights: run ``y = x W^T`` with a real sparse kernel where one
beats the dense GEMM, chosen per matrix from its sparsity and the number of tokens.

Three kernels compute the same product (outputs equal to dense within float rounding):

* ``dense`` — ``torch.mm`` on the dense ``[out, in]`` weight, zeros included;
* ``scipy_csr`` — ``scipy.sparse.csr_matrix @ x^T`` (CPU, float32 / float64): the cheapest at
  a handful of tokens, where the dense GEMV reads every zero;
* ``torch_csr`` — ``torch.sparse.mm`` of a CSR tensor (CPU or CUDA): the better sparse kernel
  for hundreds of tokens.

:func:`choose_kernel` encodes what ``experiments/bench_latency.py --kernels`` measures on this
project's 2-core CPU machine (1 thread; ``[1536, 576]``, ``[576, 1536]`` and Llama-2-7B's
``[11008, 4096]``):

==========  =====================================  =====================================
sparsity    1 token                                256 tokens
==========  =====================================  =====================================
0.5         dense (scipy 0.40-0.54x, torch 0.15x)  dense (torch CSR 0.17-0.49x)
0.7 - 0.8   mixed: scipy 0.65-1.50x                dense (torch CSR 0.49-1.29x)
0.9         scipy CSR 2.3-5.0x                     torch CSR 1.03-6.0x
0.95        scipy CSR 3.3-7.1x                     torch CSR 3.0-8.9x
==========  =====================================  =====================================

(speed relative to the dense GEMM; measured with the machine's other core busy), so the
default :class:`KernelRule` takes ``scipy_csr`` from sparsity 0.85 up to 16 tokens,
``torch_csr`` from 0.9 above that, and ``dense`` otherwise (CUDA: ``torch_csr`` from 0.9 at
any batch, else dense). Rerun the benchmark on other hardware and pass your own rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

KERNELS = ("auto", "dense", "scipy_csr", "torch_csr")


@dataclass(frozen=True)
class KernelRule:
    """When a sparse kernel is used (see the module docstring for the measurements)."""

    small_batch: int = 16
    scipy_min_sparsity: float = 0.85
    torch_min_sparsity: float = 0.9


DEFAULT_RULE = KernelRule()


def choose_kernel(
    sparsity: float, n_tokens: int, device: torch.device, rule: KernelRule = DEFAULT_RULE
) -> str:
    """The kernel for a ``sparsity``-sparse weight applied to ``n_tokens`` tokens."""
    if device.type == "cpu" and n_tokens <= rule.small_batch:
        return "scipy_csr" if sparsity >= rule.scipy_min_sparsity else "dense"
    return "torch_csr" if sparsity >= rule.torch_min_sparsity else "dense"


class SparseMatrix:
    """One ``[out, in]`` weight with its sparse formats built on first use.

    ``matmul_t(x)`` is ``x @ weight.T`` for ``x: [n, in]`` → ``[n, out]``, by ``kernel``
    (``"auto"``: :func:`choose_kernel` for this ``n``). The weight must not change afterwards
    (the sparse copies are cached); inference only (no gradients through the sparse kernels).
    """

    def __init__(self, weight: Tensor, kernel: str = "auto", rule: KernelRule = DEFAULT_RULE):
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        self.weight = weight.detach()
        self.kernel, self.rule = kernel, rule
        self.sparsity = float((self.weight == 0).float().mean()) if weight.numel() else 0.0
        self._scipy = None
        self._torch = None

    def kernel_for(self, n_tokens: int, dtype: torch.dtype) -> str:
        kernel = self.kernel
        if kernel == "auto":
            kernel = choose_kernel(self.sparsity, n_tokens, self.weight.device, self.rule)
        if kernel == "scipy_csr" and (
            self.weight.device.type != "cpu" or dtype not in (torch.float32, torch.float64)
        ):
            return "dense"
        return kernel

    def matmul_t(self, x: Tensor) -> Tensor:
        kernel = self.kernel_for(x.shape[0], x.dtype)
        if kernel == "scipy_csr":
            return self._scipy_mm(x)
        if kernel == "torch_csr":
            if self._torch is None or self._torch.dtype != x.dtype:
                self._torch = self.weight.to(x.dtype).to_sparse_csr()
            return torch.sparse.mm(self._torch, x.T).T
        return x @ self.weight.to(x.dtype).T

    def _scipy_mm(self, x: Tensor) -> Tensor:
        import numpy as np
        import scipy.sparse

        if self._scipy is None or self._scipy.dtype != _np_dtype(x.dtype):
            self._scipy = scipy.sparse.csr_matrix(self.weight.to(x.dtype).numpy())
        xn = x.detach().numpy()
        if x.shape[0] == 1:
            return torch.from_numpy(self._scipy @ xn[0]).unsqueeze(0)
        return torch.from_numpy(np.ascontiguousarray((self._scipy @ xn.T).T))


def _np_dtype(dtype: torch.dtype):
    import numpy as np

    return np.float64 if dtype == torch.float64 else np.float32


class SparseLinear(nn.Module):
    """A pruned ``nn.Linear`` run through :class:`SparseMatrix` (the same outputs within float
    rounding). The dense weight stays as a parameter (so state dicts and pruning code keep
    working); gradients fall back to the dense product."""

    def __init__(self, linear: nn.Linear, kernel: str = "auto", rule: KernelRule = DEFAULT_RULE):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.matrix = SparseMatrix(linear.weight, kernel, rule)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            y = xf @ self.weight.T
        else:
            y = self.matrix.matmul_t(xf)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"sparsity={self.matrix.sparsity:.3f}, kernel={self.matrix.kernel}"
        )
