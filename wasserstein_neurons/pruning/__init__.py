"""One-shot weight pruning baselines: magnitude, Wanda and SparseGPT.

All methods share :class:`Pruner` (``add_batch`` calibration inputs, then ``prune`` one
``[out, in]`` weight with a :class:`PruneSpec`).  Use :func:`make_pruner` to build one by name
(the registry, :data:`PRUNERS`, lives in :mod:`.registry`).

Example
-------
>>> import torch
>>> from wasserstein_neurons.pruning import PruneSpec, make_pruner
>>> W, X = torch.randn(8, 16), torch.randn(4, 32, 16)
>>> pruner = make_pruner("sparsegpt", d_in=16)
>>> pruner.add_batch(X)
>>> res = pruner.prune(W, PruneSpec(sparsity=0.5))
>>> res.sparsity
0.5

Whole models are pruned layer by layer, each layer calibrated on the outputs of the already
pruned ones, by :func:`sequential_prune` (built on the one layer loop,
:func:`wasserstein_neurons.layerwise.sequential_layerwise`); :func:`snapshot_weights` /
:func:`restore_weights` undo it bit-exactly.
"""

from __future__ import annotations

from .base import (
    Pruner,
    PruneResult,
    PruneSpec,
    lowest_k_mask,
    lowest_k_mask_per_row,
    n_to_prune,
    nm_mask,
)
from .magnitude import MagnitudePruner
from .quantize import minmax_params, quantize_dequantize, quantize_rows
from .registry import METHODS, PRUNERS, check_method, make_pruner
from .sequential import SUMMARY_COLUMNS, sequential_prune
from .snapshot import SnapshotEntry, WeightSnapshot, restore_weights, snapshot_weights
from .sparsegpt import SparseGPTPruner
from .wanda import WandaPruner

__all__ = [
    "METHODS",
    "PRUNERS",
    "SUMMARY_COLUMNS",
    "MagnitudePruner",
    "PruneResult",
    "PruneSpec",
    "Pruner",
    "SnapshotEntry",
    "SparseGPTPruner",
    "WandaPruner",
    "WeightSnapshot",
    "check_method",
    "lowest_k_mask",
    "lowest_k_mask_per_row",
    "make_pruner",
    "minmax_params",
    "n_to_prune",
    "nm_mask",
    "quantize_dequantize",
    "quantize_rows",
    "restore_weights",
    "sequential_prune",
    "snapshot_weights",
]
