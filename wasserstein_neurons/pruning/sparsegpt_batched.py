r"""SparseGPT of one weight under ``k`` Hessians at once: the Sparse Expansion experts of a linear.

Sparse Expansion prunes the same dense weight :math:`W \in \mathbb{R}^{r \times d}` once per
cluster :math:`e`, under that cluster's Hessian :math:`H_e`. :func:`prune_batched` runs the
:class:`~wasserstein_neurons.pruning.sparsegpt.SparseGPTPruner` algorithm on all ``k`` problems
together: the Hessians are stacked ``[k, d, d]`` (batched damping, Cholesky, inverse and upper
factor :math:`H_e^{-1} = U_e^\top U_e`), the weights ``[k, r, d]``, and one pass of the column
loop updates every expert (the OBS step of column :math:`q`,
:math:`\delta_{e,F} = -\frac{w_{e,q} - \hat w_{e,q}}{[U_e]_{qq}} [U_e]_{q,q:}`, as one batched
outer product; the lazy block update :math:`W_{e,:,i_2:} \mathrel{-}= E_e U_{e,i_1:i_2,i_2:}` as
one ``bmm``). Masks follow the same rules per expert (the reference's block rule, ``per_row`` or
n:m). The Python loop over columns then runs once instead of ``k`` times.

Results equal pruning the experts one by one within float rounding (batched and single matrix
products may sum in different orders); ``tests/pruning/test_sparsegpt_batched.py`` checks masks
and weights against :class:`SparseGPTPruner` in float64. Quantization (``wbits < 16``) and
``rows`` are left to the one-by-one path.

Speed: on this project's 2-core CPU (1 thread, float32, 16 Hessians, sparsity 0.9) batching is
*not* faster: 21.0 s against 13.3 s one by one for a ``[1536, 576]`` weight and 20.3 s against
19.9 s for ``[576, 1536]``. The column loop is bound by memory traffic, not by Python, and a
``[16, r, 128]`` block no longer fits in cache. What batching removes is ``k - 1`` of every
``k`` kernel launches, which is what dominates on a GPU: the Sparse Expansion builder uses it
there (``ExpansionConfig.batched_experts``, default on CUDA only); no GPU measurement has been
made yet (``experiments/gpu_check.py`` times it against one by one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import PruneSpec, n_to_prune, nm_mask

__all__ = ["prune_batched"]


def _inverse_factors(H: Tensor, percdamp: float) -> Tensor:
    """Damp every ``H_e`` in place; the contiguous upper factors ``U_e`` of ``H_e^{-1}``."""
    k, d, _ = H.shape
    idx = torch.arange(d, device=H.device)
    H[:, idx, idx] += percdamp * H.diagonal(dim1=1, dim2=2).mean(dim=1, keepdim=True)
    L, info = torch.linalg.cholesky_ex(H)
    if bool((info != 0).any()):
        bad = int((info != 0).nonzero()[0])
        raise RuntimeError(
            f"sparsegpt: the damped Hessian of expert {bad} is not positive definite; increase "
            "percdamp, use more calibration tokens, or dtype=torch.float64"
        )
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if bool((info != 0).any()):
        raise RuntimeError("sparsegpt: Cholesky factorisation of an H^-1 failed; increase percdamp")
    return U.contiguous()


def _block_mask(saliency: Tensor, spec: PruneSpec, i1: int, i2: int, per_row: bool) -> Tensor:
    """Unstructured masks of one block, ``saliency: [k, r, count]`` (lowest pruned first,
    stable ties: the same entries :func:`~.base.lowest_k_mask` marks per expert)."""
    k, r, count = saliency.shape
    mask = torch.zeros_like(saliency, dtype=torch.bool)
    if per_row:
        n = min(n_to_prune(spec.sparsity, i2) - n_to_prune(spec.sparsity, i1), count)
        idx = torch.sort(saliency, dim=2, stable=True).indices[..., :n]
        return mask.scatter_(2, idx, True)
    n = min(n_to_prune(spec.sparsity, r * i2) - n_to_prune(spec.sparsity, r * i1), r * count)
    idx = torch.sort(saliency.reshape(k, -1), dim=1, stable=True).indices[:, :n]
    return mask.reshape(k, -1).scatter_(1, idx, True).reshape(k, r, count)


def prune_batched(
    weight: Tensor, H: Tensor, spec: PruneSpec, per_row: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Prune ``weight: [r, d]`` under each Hessian of ``H: [k, d, d]`` (module docstring).

    Returns ``(W [k, r, d], mask [k, r, d], losses [k])`` in ``H``'s dtype: the pruned weights,
    which entries were pruned, and the OBS loss ``sum (w_q - w_hat_q)^2 / (2 [H_F^-1]_qq)``."""
    if spec.quantize:
        raise ValueError("prune_batched does not quantize; prune the experts one by one")
    k, d, _ = H.shape
    dt = H.dtype
    W = weight.to(dtype=dt).unsqueeze(0).repeat(k, 1, 1)  # [k, r, d]
    r = W.shape[1]
    H = H.clone()
    dead = H.diagonal(dim1=1, dim2=2) == 0  # [k, d]
    H.diagonal(dim1=1, dim2=2)[dead] = 1
    W.masked_fill_(dead.unsqueeze(1), 0)
    U = _inverse_factors(H, spec.percdamp)
    del H
    mask = torch.zeros(k, r, d, dtype=torch.bool, device=W.device)
    losses = torch.zeros(k, dtype=dt, device=W.device)
    for i1 in range(0, d, spec.blocksize):
        i2 = min(i1 + spec.blocksize, d)
        err, block_mask = _prune_block(W, U, spec, i1, i2, per_row, losses)
        mask[:, :, i1:i2] = block_mask
        if i2 < d:
            W[:, :, i2:] -= torch.bmm(err, U[:, i1:i2, i2:])
    mask |= dead.unsqueeze(1) & (weight != 0).unsqueeze(0)
    return W, mask, losses


def _prune_block(W: Tensor, U: Tensor, spec: PruneSpec, i1: int, i2: int, per_row, losses):
    """The column loop of one block, in place on ``W[:, :, i1:i2]``; returns the block's
    scaled errors ``[k, r, count]`` and mask."""
    W1 = W[:, :, i1:i2].clone()  # [k, r, count]
    count = i2 - i1
    U1 = U[:, i1:i2, i1:i2]
    d = U1.diagonal(dim1=1, dim2=2)  # [k, count]
    Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
    mask1 = torch.zeros_like(W1, dtype=torch.bool)
    if not spec.is_nm and spec.sparsity > 0:
        mask1 = _block_mask(W1.square() / d.square().unsqueeze(1), spec, i1, i2, per_row)
    n, m = spec.prunen, spec.prunem
    for i in range(count):
        if spec.is_nm and i % m == 0:
            sal = W1[:, :, i : i + m].square() / d[:, None, i : i + m].square()
            mask1[:, :, i : i + m] = torch.stack([nm_mask(s, n, m) for s in sal])
        col = W1[:, :, i]  # [k, r]
        q = col.masked_fill(mask1[:, :, i], 0)
        Q1[:, :, i] = q
        err = (col - q) / d[:, i : i + 1]  # [k, r]
        losses += err.square().sum(dim=1) / 2
        W1[:, :, i:] -= err.unsqueeze(2) * U1[:, i : i + 1, i:]
        Err1[:, :, i] = err
    W[:, :, i1:i2] = Q1
    return Err1, mask1
