"""One-shot weight pruning baselines: magnitude, Wanda and SparseGPT.

All methods share :class:`Pruner` (``add_batch`` calibration inputs, then ``prune`` one
``[out, in]`` weight with a :class:`PruneSpec`).  Use :func:`make_pruner` to build one by name.

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
pruned ones, by :func:`sequential_prune` (built on the generic traversal
:func:`sequential_layerwise`); :func:`snapshot_weights` / :func:`restore_weights` undo it
bit-exactly.
"""

from __future__ import annotations

import torch

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
from .sequential import (
    SUMMARY_COLUMNS,
    LayerContext,
    SnapshotEntry,
    WeightSnapshot,
    layer_linears,
    resolve_targets,
    restore_weights,
    sequential_layerwise,
    sequential_prune,
    snapshot_weights,
    target_weight,
)
from .sparsegpt import SparseGPTPruner
from .wanda import WandaPruner

__all__ = [
    "PRUNERS",
    "SUMMARY_COLUMNS",
    "LayerContext",
    "MagnitudePruner",
    "PruneResult",
    "PruneSpec",
    "Pruner",
    "SnapshotEntry",
    "SparseGPTPruner",
    "WandaPruner",
    "WeightSnapshot",
    "layer_linears",
    "lowest_k_mask",
    "lowest_k_mask_per_row",
    "make_pruner",
    "minmax_params",
    "n_to_prune",
    "nm_mask",
    "quantize_dequantize",
    "quantize_rows",
    "resolve_targets",
    "restore_weights",
    "sequential_layerwise",
    "sequential_prune",
    "snapshot_weights",
    "target_weight",
]

#: Registered pruning methods by name.
PRUNERS: dict[str, type[Pruner]] = {
    cls.name: cls for cls in (MagnitudePruner, WandaPruner, SparseGPTPruner)
}


def make_pruner(
    method: str,
    d_in: int,
    device: torch.device | str | None = None,
    **kwargs,
) -> Pruner:
    """Build a pruner by name.

    Parameters
    ----------
    method : {"magnitude", "wanda", "sparsegpt"}
        Case-insensitive.
    d_in : int
        Input features of the layer (columns of its ``[out, in]`` weight).
    device : torch.device or str, optional
        Where calibration statistics are accumulated (default CPU).
    **kwargs
        Passed to the class, e.g. ``dtype=torch.float64``.

    Returns
    -------
    Pruner

    Raises
    ------
    ValueError
        For an unknown method name (the message lists the valid ones).
    """
    key = method.strip().lower() if isinstance(method, str) else method
    if key not in PRUNERS:
        raise ValueError(
            f"unknown pruning method {method!r}; valid methods: {', '.join(sorted(PRUNERS))}"
        )
    return PRUNERS[key](d_in, device=device, **kwargs)
