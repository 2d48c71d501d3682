"""Sparse Expansion: route each token to one of ``k`` sparse copies of a linear layer.

* :func:`fit_router` / :class:`Router` — PCA + k-means router, hard top-1 nearest centroid;
* :class:`ExpertRoutedLinear` — the routed layer (dense or packed-sparse storage, optionally
  only for some output rows);
* :func:`replace_linear` / :func:`restore_linear` — swap a model's MLP linear so that both the
  HF forward and the TransformerLens hooks use the new module.

Example
-------
>>> import torch
>>> from wasserstein_neurons.expansion import ExpertRoutedLinear, fit_router
>>> x = torch.randn(2048, 64)
>>> router = fit_router(x, n_clusters=4, pca_dim=8, restarts=2, min_cluster_tokens=0)
>>> layer = ExpertRoutedLinear.from_dense(torch.randn(32, 64), router)
>>> layer(x[:5]).shape
torch.Size([5, 32])
"""

from ..bridge import linear_features, replace_linear, restore_linear
from .builder import (
    DEFAULT_KMEANS_RESTARTS,
    ExpansionConfig,
    apply_expansion,
    build_sparse_expansion,
    expanded_modules,
    load_expanded,
    mlp_cost,
    save_expanded,
)
from .expert_linear import ExpertRoutedLinear, PackedSparseStack
from .router import Router, RouterFitInfo, SmallClusterWarning, fit_router

__all__ = [
    "DEFAULT_KMEANS_RESTARTS",
    "ExpansionConfig",
    "apply_expansion",
    "build_sparse_expansion",
    "expanded_modules",
    "load_expanded",
    "mlp_cost",
    "save_expanded",
    "ExpertRoutedLinear",
    "PackedSparseStack",
    "Router",
    "RouterFitInfo",
    "SmallClusterWarning",
    "fit_router",
    "linear_features",
    "replace_linear",
    "restore_linear",
]
