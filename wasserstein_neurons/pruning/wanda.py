"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter, 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Pruner, PruneSpec

__all__ = ["WandaPruner"]


class WandaPruner(Pruner):
    r"""Wanda pruning.

    The score of a weight is

    .. math:: S_{ij} = |W_{ij}| \cdot \lVert X_j \rVert_2,

    where :math:`X_j` is the column of input feature ``j`` over all calibration tokens.  Only
    the ranking within a comparison group matters, so the statistic kept is the running mean
    :math:`\overline{x_j^2} = \lVert X_j \rVert_2^2 / N` (``self.sq_mean``, shape ``[in]``),
    which has the same ranking and does not grow with ``N``.

    * per row (default): the :math:`\mathrm{round}(s \cdot d_{in})` lowest scores of each
      output row are zeroed (the paper's "per output" comparison group);
    * ``per_row=False``: one threshold over all pruned rows (the paper's per-layer ablation);
    * n:m: the ``n`` lowest scores in every group of ``m`` consecutive inputs of each row.

    Parameters
    ----------
    d_in : int
        Input features.
    device : torch.device or str, optional
        Where the statistics are accumulated.
    dtype : torch.dtype
        Accumulation dtype (default float64: the statistic is a vector, so this is free).

    References
    ----------
    M. Sun, Z. Liu, A. Bair, J. Z. Kolter, "A Simple and Effective Pruning Approach for Large
    Language Models", ICLR 2024, arXiv:2306.11695.
    """

    name = "wanda"
    default_per_row = True
    default_dtype = torch.float64

    def _init_statistics(self) -> None:
        #: Running mean of :math:`x_j^2` over calibration tokens, shape ``[in]``.
        self.sq_mean = torch.zeros(self.d_in, device=self.device, dtype=self.dtype)

    def _accumulate(self, x: Tensor) -> None:
        # running mean over tokens: m_N = m_{N0} * N0/N + sum_t x_t^2 / N
        n_new = self.nsamples + x.shape[0]
        self.sq_mean.mul_(self.nsamples / n_new).add_(x.square().sum(0), alpha=1.0 / n_new)

    @property
    def input_norms(self) -> Tensor:
        r""":math:`\lVert X_j \rVert_2` for every input feature, shape ``[in]``."""
        return (self.sq_mean * self.nsamples).sqrt()

    def scores(self, weight: Tensor) -> Tensor:
        r"""Wanda scores :math:`|W_{ij}| \sqrt{\overline{x_j^2}}`, shape ``[r, in]``."""
        dt = torch.promote_types(self.dtype, torch.float32)
        norm = self.sq_mean.to(device=weight.device, dtype=dt).sqrt()
        return weight.abs().to(dt) * norm

    def _prune_rows(self, w: Tensor, spec: PruneSpec) -> tuple[Tensor, Tensor, dict[str, Any]]:
        scores = self.scores(w)
        mask = self._score_mask(scores, spec)
        return w.masked_fill(mask, 0), mask, {"nsamples": self.nsamples}
