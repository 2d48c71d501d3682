"""Magnitude pruning: zero the weights with the smallest ``|w|``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Pruner, PruneSpec

__all__ = ["MagnitudePruner"]


class MagnitudePruner(Pruner):
    r"""Magnitude pruning (no calibration data needed).

    The score of a weight is :math:`S_{ij} = |W_{ij}|`.

    * per matrix (``per_row=False``, the default): the :math:`k = \mathrm{round}(s \cdot r
      \cdot d_{in})` lowest scores among the ``r`` pruned rows are zeroed, i.e. one threshold
      shared by the selected rows (the rows' individual sparsities vary);
    * per row (``per_row=True``): the :math:`\mathrm{round}(s \cdot d_{in})` lowest scores of
      each row;
    * n:m: the ``n`` lowest scores of every group of ``m`` consecutive inputs of each row.

    :meth:`add_batch` is accepted (so a driver can treat all methods alike) but ignored.
    """

    name = "magnitude"
    default_per_row = False
    needs_calibration = False

    def _accumulate(self, x: Tensor) -> None:
        return None

    def _prune_rows(self, w: Tensor, spec: PruneSpec) -> tuple[Tensor, Tensor, dict[str, Any]]:
        # w: [r, in]
        scores = w.abs().to(torch.float32 if w.element_size() < 4 else w.dtype)
        mask = self._score_mask(scores, spec)
        return w.masked_fill(mask, 0), mask, {}
