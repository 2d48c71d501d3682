r"""An independent re-derivation of SparseGPT's unstructured rule, for tests and benchmarks.

Not a test file (no ``test_`` prefix): ``tests/pruning/test_sparsegpt_reference.py`` imports it
relatively, ``experiments/bench_pruning.py --reference`` puts ``tests/pruning`` on ``sys.path``.
Written from the equations of Frantar & Alistarh (2023) and IST-DASLab's ``fasterprune``
(unstructured, no quantization), not from this project's code:

* Hessian :math:`H = \frac{2}{n} \sum_t x_t x_t^\top`; dead inputs (:math:`H_{ii} = 0`) get
  :math:`H_{ii} = 1` and their weight column zeroed; damping :math:`\lambda = \text{percdamp}
  \cdot \mathrm{mean}(\mathrm{diag}\,H)` on the diagonal;
* :math:`U` = upper Cholesky factor of :math:`H^{-1}` (:math:`H^{-1} = U^\top U`);
* for each block of ``blocksize`` columns, at its start: saliency :math:`w^2 / U_{qq}^2` of the
  current weights, and the mask = the ``k`` lowest saliencies of the whole ``[rows, block]``
  slice (ties broken by row-major order); ``k = int(numel * sparsity)`` (the reference's
  threshold index, without the extra weight its ``<=`` can add), or, with
  ``counts="cumulative"``, ``round(s * rows * i2) - round(s * rows * i1)`` (this project's
  rule: the matrix total is exact);
* column by column: :math:`q = w (1 - m)`, :math:`e = (w - q) / U_{jj}`, and the OBS update
  :math:`w_{:, j:} \mathrel{-}= e \, U_{j, j:}` of the row's remaining columns.

:func:`sparsegpt_reference` is the plain version: float64 numpy, one loop over columns, and
every OBS update applied at once to *all* remaining columns (no lazy block batching; the lazy
update only regroups these same subtractions).  :func:`sparsegpt_reference_torch` is the same
algorithm written the fast way the reference runs it (torch float32, updates inside the block
applied at once, the block's error propagated to later columns with one matrix product), for
timing against this project's pruner.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["block_counts", "sparsegpt_reference", "sparsegpt_reference_torch"]


def block_counts(rows: int, ncols: int, sparsity: float, blocksize: int, counts: str) -> list:
    """Weights to prune in each column block: ``int(numel * s)`` or the cumulative rounding."""
    out = []
    for i1 in range(0, ncols, blocksize):
        i2 = min(i1 + blocksize, ncols)
        if counts == "floor":
            out.append(int(rows * (i2 - i1) * sparsity))
        elif counts == "cumulative":
            out.append(
                math.floor(sparsity * rows * i2 + 0.5) - math.floor(sparsity * rows * i1 + 0.5)
            )
        else:
            raise ValueError(f"counts must be 'floor' or 'cumulative', got {counts!r}")
    return out


def _prepare(W: np.ndarray, H: np.ndarray, percdamp: float) -> tuple[np.ndarray, np.ndarray]:
    """Dead inputs, damping and the upper Cholesky factor ``U`` of ``H^-1`` (float64)."""
    W = np.array(W, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices_from(H)] += percdamp * np.mean(np.diag(H))
    L = np.linalg.cholesky(np.linalg.inv(H))  # H^-1 = L L^T
    return W, L.T  # U = L^T, upper, H^-1 = U^T U


def sparsegpt_reference(
    W, H, sparsity: float, blocksize: int = 128, percdamp: float = 0.01, counts: str = "floor"
) -> tuple[np.ndarray, np.ndarray]:
    """Prune ``W: [rows, in]`` with Hessian ``H: [in, in]``; float64 numpy.

    Returns the pruned weight and the bool mask of pruned entries, both ``[rows, in]``.
    """
    W = W.detach().cpu().numpy() if isinstance(W, torch.Tensor) else W
    H = H.detach().cpu().numpy() if isinstance(H, torch.Tensor) else H
    W, U = _prepare(W, H, percdamp)
    rows, ncols = W.shape
    ks = block_counts(rows, ncols, sparsity, blocksize, counts)
    mask = np.zeros(W.shape, dtype=bool)
    for b, i1 in enumerate(range(0, ncols, blocksize)):
        i2 = min(i1 + blocksize, ncols)
        # the mask of the block, from the weights as updated by the earlier columns
        d = np.diag(U)[i1:i2]
        score = W[:, i1:i2] ** 2 / d**2
        order = np.argsort(score.reshape(-1), kind="stable")
        block_mask = np.zeros(score.size, dtype=bool)
        block_mask[order[: ks[b]]] = True
        mask[:, i1:i2] = block_mask.reshape(score.shape)
        for j in range(i1, i2):
            w = W[:, j].copy()
            q = np.where(mask[:, j], 0.0, w)
            err = (w - q) / U[j, j]
            W[:, j:] -= np.outer(err, U[j, j:])  # OBS: every remaining column of every row
            W[:, j] = q  # exact zero (the update leaves w - err * U_jj = q up to rounding)
    return W, mask


def sparsegpt_reference_torch(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    blocksize: int = 128,
    percdamp: float = 0.01,
    counts: str = "floor",
    select: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same algorithm, vectorised over rows in torch float32 with lazy block updates.

    ``select="exact"`` marks the ``k`` lowest saliencies of the block (stable sort, as
    :func:`sparsegpt_reference`); ``select="threshold"`` selects the way ``fasterprune`` does
    (sorted values, ``score <= sorted[k]``: at least ``k + 1`` weights), for timing.
    """
    if select not in ("exact", "threshold"):
        raise ValueError(f"select must be 'exact' or 'threshold', got {select!r}")
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32).clone()
    rows, ncols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(Hinv, upper=True).contiguous()  # row reads below
    ks = block_counts(rows, ncols, sparsity, blocksize, counts)
    mask = torch.zeros(W.shape, dtype=torch.bool)
    for b, i1 in enumerate(range(0, ncols, blocksize)):
        i2 = min(i1 + blocksize, ncols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        score = W1.square() / d.square()
        if select == "threshold":
            mask1 = score <= torch.sort(score.reshape(-1))[0][ks[b]]
        else:
            idx = torch.sort(score.reshape(-1), stable=True).indices[: ks[b]]
            mask1 = torch.zeros(score.numel(), dtype=torch.bool)
            mask1[idx] = True
            mask1 = mask1.view(score.shape)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            w = W1[:, j]
            q = w.masked_fill(mask1[:, j], 0.0)
            err = (w - q) / d[j]
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            Q1[:, j] = q
            Err1[:, j] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W, mask
