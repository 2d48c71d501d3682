"""Sparse Expansion: route each token to one of ``k`` sparse copies of a linear layer.

* :func:`fit_router` / :class:`Router` — PCA + k-means router, hard top-1 nearest centroid;
* :class:`ExpertRoutedLinear` — the routed layer (dense or packed-sparse storage, optionally
  only for some output rows);
* :func:`replace_linear` / :func:`restore_linear` — swap a model's MLP linear so that both the
  HF forward and the TransformerLens hooks use the new module;
* :func:`build_sparse_expansion` with an :class:`ExpansionConfig` — expand every MLP linear of
  a model, layer by layer (:mod:`~wasserstein_neurons.expansion.builder`);
* :func:`mlp_cost` / :func:`expanded_modules` — FLOPs, parameters and bytes of the MLP linears
  (:mod:`~wasserstein_neurons.expansion.cost`);
* :func:`save_expanded` / :func:`apply_expansion` / :func:`load_expanded` — store an expansion
  without its base model (:mod:`~wasserstein_neurons.expansion.io`).

``EXPANSION_SUMMARY_COLUMNS`` is :data:`wasserstein_neurons.expansion.builder.SUMMARY_COLUMNS`
(renamed here: :mod:`wasserstein_neurons.pruning` exports its own ``SUMMARY_COLUMNS``).

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
from .builder import DEFAULT_KMEANS_RESTARTS, ExpansionConfig, build_sparse_expansion
from .builder import SUMMARY_COLUMNS as EXPANSION_SUMMARY_COLUMNS
from .cost import expanded_modules, mlp_cost
from .expert_linear import ExpertRoutedLinear, PackedSparseStack
from .expert_pruning import prune_experts
from .io import EXPANSION_FORMAT, apply_expansion, load_expanded, save_expanded
from .router import Router, RouterFitInfo, SmallClusterWarning, fit_router

__all__ = [
    "DEFAULT_KMEANS_RESTARTS",
    "EXPANSION_FORMAT",
    "EXPANSION_SUMMARY_COLUMNS",
    "ExpansionConfig",
    "ExpertRoutedLinear",
    "PackedSparseStack",
    "Router",
    "RouterFitInfo",
    "SmallClusterWarning",
    "apply_expansion",
    "build_sparse_expansion",
    "expanded_modules",
    "fit_router",
    "linear_features",
    "load_expanded",
    "mlp_cost",
    "prune_experts",
    "replace_linear",
    "restore_linear",
    "save_expanded",
]
