r"""Build a Sparse Expansion model: every MLP linear becomes a mixture of sparse experts.

For each decoder layer :math:`l` (sequential calibration: the inputs come from the already
expanded layers :math:`0, \dots, l-1`) and each MLP linear :math:`y = W x + b` with calibration
inputs :math:`X \in \mathbb{R}^{N \times d_{in}}`:

1. fit a router (:func:`~wasserstein_neurons.expansion.fit_router`: PCA to
   :math:`d_{in} / 32` dimensions, k-means with :math:`k` clusters) on :math:`X` and route every
   calibration token with :meth:`Router.route` (the routing used at inference, not the k-means
   labels), giving clusters :math:`X_1, \dots, X_k` with :math:`N_c` tokens;
2. for each cluster :math:`c`, accumulate the SparseGPT Hessian of that cluster only,

   .. math:: H_c = \frac{2}{N_c} X_c^\top X_c \in \mathbb{R}^{d_{in} \times d_{in}},

   and prune a copy of :math:`W` with SparseGPT under :math:`H_c` to get expert :math:`W_c`
   (same target sparsity, n:m pattern and optional quantization for every expert);
3. put an :class:`~wasserstein_neurons.expansion.ExpertRoutedLinear` computing
   :math:`y = W_{e(x)} x + b` in place of the linear (through the TransformerLens bridge, so
   hooks such as ``blocks.{l}.mlp.hook_pre`` report the expanded outputs).

Steps 1-2 are :class:`~wasserstein_neurons.expansion.expert_pruning.GroupExperts`; this module
collects the inputs layer by layer, installs the modules and writes the summary.  Cost
accounting is in :mod:`~wasserstein_neurons.expansion.cost`, save / load in
:mod:`~wasserstein_neurons.expansion.io`.

Llama's ``gate`` and ``up`` read the same input: they share one router object and each
cluster's Hessian, and the router is counted once in FLOPs and parameters.  ``down`` has its
own router, fitted on its input, the intermediate activation.  GPT-NeoX / GPT-2 have one router
per linear.  Attention stays dense.

Within-layer order
------------------
By default (``within_layer_sequential=False``) the inputs of all the layer's targets are
collected in one pass of the *dense* layer before any of them is replaced, exactly as
:func:`~wasserstein_neurons.pruning.sequential_prune` does by default (and the reference
SparseGPT / Wanda code): ``down``'s router and Hessians see the intermediate activation of the
dense ``gate``/``up``.  With ``within_layer_sequential=True`` the ``gate``/``up`` experts are
installed first and ``down``'s inputs are collected through them (one more pass per layer),
matching ``sequential_prune(..., within_layer_sequential=True)``.

``k = 1`` is SparseGPT
----------------------
With one expert the router is trivial and the only cluster's Hessian is accumulated batch by
batch over the same tensors, in the same order and arithmetic as
:func:`~wasserstein_neurons.pruning.sequential_prune` with ``method="sparsegpt"`` and the same
``within_layer_sequential``, ``batch_size`` and attention path: the pruned weights are
bit-identical, and so is the perplexity for bias-free linears (Llama).  (With biases, GPT-NeoX
and GPT-2, ``x W^T + b`` may round differently from the fused ``addmm`` of ``nn.Linear`` in the
last bit.)  Two settings matter for bit-equality: SparseGPT's results depend on the CPU thread
count (``cpu_threads``, default 1, see below) and on the attention implementation (``sdpa``).

Speed on CPU
------------
* ``sdpa=True`` (default) runs the calibration passes through the native Hugging Face modules
  with scaled-dot-product attention (:func:`~wasserstein_neurons.bridge.native_modules`)
  instead of the bridge's eager attention (measured ≈35% faster per layer pass), and stops
  each collection pass as soon as the last needed input is caught.  Expert modules are
  installed in the bridge wrappers, so the bridge and the HF model use them afterwards.
* ``cpu_threads=1`` (default) runs the per-expert SparseGPT column loops and the
  :math:`\lVert DHD^\top \rVert` error traces single-threaded: these are thousands of small
  kernels, and OpenMP synchronisation makes them 10-30x slower with 2 threads on a loaded
  2-core machine (measured: one ``1536 x 576`` SparseGPT prune 0.1-0.2 s with 1 thread,
  2.6-10 s with 2).  Large GEMMs (the PCA covariance, layer passes) keep torch's thread
  setting.
* ``workers`` (default: torch's thread count, at most 4) uses the cores instead for
  independent work: the k-means restarts of a router and the experts of a linear (each
  cluster's Hessian and SparseGPT prune) run side by side on worker threads with one torch
  thread each (:mod:`.threads`); the experts and routers are the same tensors for any count.

Memory
------
The calibration inputs of the expanded linears of one layer are held at once
(:math:`N \times d_{in}` floats each: 65,536 x (576 + 1536) x 4 B = 550 MB for SmolLM2 at 128
x 512 tokens), plus one cluster Hessian at a time.  Experts are stored dense (``[k, out, in]``)
by default — :math:`k \times` the MLP weights (5.1 GB for 16 experts on SmolLM2-135M) — because
the packed storage (``compact=True``, :meth:`ExpertRoutedLinear.compact`) decompresses every
expert at every forward call (measured ≈17 ms per ``1536 x 576`` expert single-threaded, far
more under load, i.e. several times the GEMM itself).  With ``compact=True`` each layer is
packed right after it has been propagated, so calibration passes still run dense.  On an
offloaded model (``load_model(..., offload=...)``) a layer's experts are stored with the layer
when the layer loop releases it (host copy or scratch safetensors,
:meth:`~wasserstein_neurons.offload.LayerOffload.release`) and loaded with it on every later
forward, so the experts never sit in memory all at once (``compact`` is refused there).

Calibration size
----------------
Each expert sees only its cluster: with :math:`N` tokens and :math:`k` clusters the average
cluster holds :math:`N / k` tokens.  Measured on the embedded model (ARCHITECTURE.md,
"Science notes"), 16 experts only pay off once each holds several :math:`d_{in}` tokens (64k
calibration tokens for SmolLM2, i.e. the default 128 x 512 windows).  A
:class:`~wasserstein_neurons.expansion.SmallClusterWarning` is issued when
a cluster holds fewer than ``min_cluster_tokens`` (default :math:`2 d_{in}`), and every summary
row reports the smallest / largest cluster and how many were small.  An *empty* cluster (e.g.
more experts than distinct inputs) has no Hessian: its expert is pruned with the Hessian of all
the layer's tokens (the SparseGPT weights) and counted under ``fallbacks``.

References
----------
S. Sawmya, L. Kong, I. Markov, D. Alistarh, N. Shavit, "Sparse Expansion and Neuronal
Disentanglement", arXiv:2405.15756.  E. Frantar, D. Alistarh, "SparseGPT", arXiv:2301.00774.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from ..bridge import has_bridge_modules, linear_weight, native_sdpa, replace_linear
from ..layerwise import LayerContext, sequential_layerwise
from ..pruning import PruneSpec
from .cost import expanded_modules, linear_costs
from .expert_linear import ExpertRoutedLinear
from .expert_pruning import GroupExperts, hessian_pruner, prune_in_place
from .router import SmallClusterWarning

__all__ = [
    "DEFAULT_KMEANS_RESTARTS",
    "SUMMARY_COLUMNS",
    "ExpansionConfig",
    "build_sparse_expansion",
]

#: k-means restarts per router (the paper: 100).  Measured by ``experiments/kmeans_restarts.py``
#: (results in ``experiments/results/kmeans_restarts.txt``) on SmolLM2, k = 16, single-threaded on
#: the loaded 2-core CPU.  Routers of layers 0 / 8 / 16 / 24 / 29 on 32,768 tokens: 5 restarts
#: leave a best inertia 2.3% above 100 restarts on average (median 0.7-1.4%, up to 9% in layer 0)
#: and route 13-45% of the tokens to another (matched) expert; 25 restarts 0.85% (median
#: 0.03%, layer 0 ``down`` still 7%).  But 100 restarts are not a unique answer either: with
#: another seed they reach the same inertia (within 0.6%) and still route 14-41% of the ``down``
#: tokens differently.  Fits took 2.6 s (576-d) / 12 s (1536-d) with 5 restarts, 10 / 32 s with
#: 25, 43 / 97 s with 100.  Whole builds at 0.9 sparsity (32 x 512 calibration tokens, 8,176
#: evaluation tokens): perplexity 1747 and 1888 with 5 restarts (seeds 0 and 1), 1927 with 25
#: (seed 0; router time 819 s against 296-350 s): the calibration error falls by 1-3% but the
#: perplexity difference is inside the seed spread.  Five restarts stay the default.
DEFAULT_KMEANS_RESTARTS = 5

#: Columns of the DataFrame returned by :func:`build_sparse_expansion`.
SUMMARY_COLUMNS = (
    "layer",
    "role",
    "experts",
    "expert_rows",
    "d_in",
    "d_out",
    "n_tokens",
    "pca_dim",
    "cluster_min",
    "cluster_max",
    "small_clusters",
    "fallbacks",
    "target_sparsity",
    "sparsity",
    "rel_error",
    "router_seconds",
    "prune_seconds",
    "seconds",
    "params",
    "flops_per_token",
    "nbytes",
)


# ============================================================================================
# Configuration
# ============================================================================================


@dataclass
class ExpansionConfig:
    r"""Settings of :func:`build_sparse_expansion` (CLI names follow SparseGPT's flags).

    Parameters
    ----------
    n_experts : int
        Experts (clusters) per expanded linear, :math:`k \ge 1` (paper: 16).  ``1`` reproduces
        SparseGPT.
    sparsity : float
        Target per-row sparsity of every expert, in ``[0, 1)``.  Ignored (``prunen / prunem``
        is used) when n:m is set.
    prunen, prunem : int
        n:m semi-structured sparsity (``2, 4``); ``0, 0`` disables it.
    wbits : int
        Quantize the kept weights to ``wbits`` bits inside SparseGPT (``16`` = off).
    pca_factor : int or None
        Routing dimension :math:`p = d_{in} / \text{pca\_factor}` (paper: 32); ``0``/``None``
        routes in the full input space.
    kmeans_restarts : int
        k-means++ initialisations per router (lowest inertia kept; paper: 100; default
        :data:`DEFAULT_KMEANS_RESTARTS`).
    seed : int
        k-means seed (the same for every router).
    min_cluster_tokens : int or None
        Warn (:class:`~wasserstein_neurons.expansion.SmallClusterWarning`) when a cluster holds
        fewer calibration tokens; ``None`` means :math:`2 d_{in}` of each linear, ``0`` never.
    min_expert_tokens : int
        Clusters with fewer tokens than this have their expert pruned with the Hessian of all
        the layer's tokens instead of their own (a *fallback*).  The default ``1`` only affects
        empty clusters, which have no Hessian.
    roles : sequence of str or None
        MLP linears to expand (``"gate"``, ``"up"``, ``"down"``); ``None``: all of the
        architecture's (``adapter.roles``).
    layers : sequence of int or None
        Decoder layers to expand (default all).
    neuron_rows : dict[int, LongTensor] or None
        Neuron-level expansion.  For every layer ``l`` in the dict, only the output rows
        ``neuron_rows[l]`` of the *neuron* roles (``gate``/``up``, or ``up`` for GPT-NeoX /
        GPT-2) get :math:`k` experts; their other rows, the other roles (``down``) and layers
        missing from the dict are pruned once with SparseGPT on all tokens (in place).
    per_row : bool
        Prune an exact share of every row of each expert instead of SparseGPT's reference rule
        (one count per column block over all rows, the default).
    blocksize, percdamp : int, float
        SparseGPT column block size and relative damping (:class:`PruneSpec`).
    within_layer_sequential : bool
        See the module docstring (default ``False``, as ``sequential_prune``).
    batch_size : int
        Calibration windows per forward call (also the Hessian accumulation chunk).
    offload : bool
        Keep the layer-input buffer and the collected inputs on the CPU (for GPU runs with
        little memory).
    sdpa : bool
        Run calibration passes through the native HF modules with sdpa attention (faster);
        ``False`` runs the bridged forward exactly as ``sequential_prune`` does.
    cpu_threads : int or None
        Torch threads for the per-expert SparseGPT loops on CPU (``None``: leave as is).
    workers : int or None
        CPU workers (Python threads with one torch thread each, :mod:`.threads`) that fit a
        router's k-means restarts and build a linear's experts (cluster Hessian + SparseGPT)
        side by side; ``None``: torch's thread count, at most 4.  Results do not depend on it.
        Needs ``cpu_threads=1`` (otherwise one worker is used); 1 off the CPU.
    batched_experts : bool or None
        Prune a linear's experts together
        (:func:`~wasserstein_neurons.pruning.sparsegpt_batched.prune_batched`: stacked
        Hessians, batched Cholesky factors and OBS updates: ``k`` times fewer kernel launches,
        which is what a GPU pays for) instead of one by one on the ``workers``; ``None``: on
        CUDA only (on this project's 2-core CPU the one-by-one workers are faster).  Experts
        equal the one-by-one ones within float rounding.  Quantization (``wbits < 16``) and
        ``neuron_rows`` always prune one by one; ``k = 1`` is SparseGPT either way.
    compact : bool
        Pack the experts (nonzeros + bit masks) after each layer: less memory, slower forward.
    measure_error : bool
        Report ``rel_error`` (costs :math:`2 k\, d_{out} d_{in}^2` FLOPs per linear).
    store_routing : bool
        ``store_routing`` of the new modules (keep the last forward's expert ids).
    """

    n_experts: int = 16
    sparsity: float = 0.5
    prunen: int = 0
    prunem: int = 0
    wbits: int = 16
    pca_factor: int | None = 32
    kmeans_restarts: int = DEFAULT_KMEANS_RESTARTS
    seed: int = 0
    min_cluster_tokens: int | None = None
    min_expert_tokens: int = 1
    roles: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    neuron_rows: dict[int, Tensor] | None = field(default=None, repr=False)
    blocksize: int = 128
    percdamp: float = 0.01
    per_row: bool = False
    within_layer_sequential: bool = False
    batch_size: int = 8
    offload: bool = False
    sdpa: bool = True
    cpu_threads: int | None = 1
    workers: int | None = None
    batched_experts: bool | None = None
    compact: bool = False
    measure_error: bool = True
    store_routing: bool = False

    def __post_init__(self) -> None:
        k = self.n_experts
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"n_experts must be a positive integer, got {k!r}")
        if not isinstance(self.kmeans_restarts, int) or self.kmeans_restarts < 1:
            raise ValueError(f"kmeans_restarts must be >= 1, got {self.kmeans_restarts!r}")
        if self.min_expert_tokens < 0:
            raise ValueError(f"min_expert_tokens must be >= 0, got {self.min_expert_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 or None, got {self.cpu_threads}")
        if self.workers is not None and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1
        ):
            raise ValueError(f"workers must be a positive integer or None, got {self.workers!r}")
        if self.roles is not None:
            self.roles = (self.roles,) if isinstance(self.roles, str) else tuple(self.roles)
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
        if self.neuron_rows is not None:
            self.neuron_rows = {
                int(layer): torch.as_tensor(rows).long().flatten().cpu()
                for layer, rows in self.neuron_rows.items()
            }
        self.spec()  # validates sparsity, n:m, wbits, blocksize, percdamp

    def spec(self, rows: Tensor | None = None) -> PruneSpec:
        """The SparseGPT :class:`~wasserstein_neurons.pruning.PruneSpec` of every expert."""
        return PruneSpec.from_settings(
            self.sparsity,
            self.prunen,
            self.prunem,
            rows=rows,
            wbits=self.wbits,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
            per_row=True if self.per_row else None,
        )

    @property
    def target_sparsity(self) -> float:
        """``prunen / prunem`` with n:m, else ``sparsity``."""
        return self.spec().target_sparsity

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``neuron_rows`` as ``{"layer": [rows]}``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "neuron_rows"}
        out = json.loads(json.dumps(out, default=list))
        out["neuron_rows"] = (
            None
            if self.neuron_rows is None
            else {str(k): v.tolist() for k, v in self.neuron_rows.items()}
        )
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpansionConfig:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("neuron_rows") is not None:
            kw["neuron_rows"] = {int(k): torch.tensor(v) for k, v in kw["neuron_rows"].items()}
        for key in ("roles", "layers"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)


# ============================================================================================
# Helpers
# ============================================================================================


def _layer_roles(model, cfg: ExpansionConfig) -> tuple[str, ...]:
    roles = model.adapter.roles
    if cfg.roles is None:
        return roles
    unknown = [r for r in cfg.roles if r not in roles]
    if unknown:
        raise ValueError(
            f"unknown role(s) {unknown} for {model.adapter.family}; valid: {', '.join(roles)}"
        )
    return tuple(r for r in roles if r in cfg.roles)  # forward order


def _input_groups(model, roles: Sequence[str]) -> list[list[str]]:
    """Roles grouped by shared input, in forward order: ``[[gate, up], [down]]``."""
    first = [r for r in roles if r in model.adapter.neuron_roles]
    second = [r for r in roles if r not in model.adapter.neuron_roles]
    return [g for g in (first, second) if g]


# ============================================================================================
# Builder
# ============================================================================================


class _Builder:
    """State of one :func:`build_sparse_expansion` call."""

    def __init__(
        self, model, cfg: ExpansionConfig, truncate: bool, holders: dict[tuple[int, str], Any]
    ) -> None:
        self.model = model
        self.holders = holders
        self.cfg = cfg
        self.truncate = truncate
        self.roles = _layer_roles(model, cfg)
        self.groups = _input_groups(model, self.roles)
        self.records: list[dict[str, Any]] = []
        self.installed: dict[tuple[int, str], nn.Module] = {}
        self.to_compact: list[ExpertRoutedLinear] = []
        self.small: list[str] = []
        self.fallback: list[str] = []

    # ------------------------------------------------------------------ per layer
    def process(self, ctx: LayerContext) -> None:
        cfg = self.cfg
        self._compact_pending()
        store = torch.device("cpu") if cfg.offload else None
        targets = ctx.targets(list(self.roles))
        if cfg.within_layer_sequential:
            for group in self.groups:
                lead = group[0]
                stop = lead if self.truncate else None
                bufs = ctx.collect_inputs({lead: targets[lead]}, device=store, stop_after=stop)
                self._expand_group(ctx, group, bufs, ctx.token_bounds)
        else:
            leads = {g[0]: targets[g[0]] for g in self.groups}
            stop = self.groups[-1][0] if self.truncate else None
            bufs = ctx.collect_inputs(leads, device=store, stop_after=stop)
            for group in self.groups:
                self._expand_group(ctx, group, bufs, ctx.token_bounds)

    def _install(self, layer: int, role: str, module: nn.Module) -> None:
        """Put ``module`` in place of a linear, in the HF tree *and* in its bridge wrapper.

        Inside :func:`~wasserstein_neurons.bridge.native_modules` the wrappers are detached
        from the tree (and restored around the old linear on exit), so the wrapper caught
        before entering (``self.holders``) is pointed at the new module as well.
        """
        replace_linear(self.model, layer, role, module)
        holder = self.holders.get((layer, role))
        if holder is not None and hasattr(holder, "set_original_component"):
            if holder.original_component is not module:
                holder.set_original_component(module)
        self.installed[(layer, role)] = module

    def _compact_pending(self) -> None:
        for module in self.to_compact:
            module.compact()
        self.to_compact.clear()

    def _neuron_rows(self, layer: int, role: str, d_out: int, device) -> Tensor | None:
        """Rows that get experts; ``None``: all rows; empty: none (prune once)."""
        rows_map = self.cfg.neuron_rows
        if rows_map is None:
            return None
        if role not in self.model.adapter.neuron_roles or layer not in rows_map:
            return torch.zeros(0, dtype=torch.long, device=device)
        rows = PruneSpec(rows=rows_map[layer]).resolve_rows(d_out, device)
        return rows

    # ------------------------------------------------------------------ one input group
    def _expand_group(
        self, ctx: LayerContext, group: list[str], inputs: dict[str, Tensor], bounds: list[int]
    ) -> None:
        """Expand (or prune once) the roles of ``group``, which all read ``inputs[group[0]]``.

        The input ``[N, d_in]`` is popped from ``inputs`` so that it is freed as soon as the
        cluster-sorted copy exists.  Appends one summary record per role.
        """
        adapter, hf = self.model.adapter, self.model.hf_model
        layer = ctx.index
        n_tokens, d_in = inputs[group[0]].shape
        t_group = time.perf_counter()
        weights = {r: linear_weight(adapter.linear(hf, layer, r)) for r in group}
        rows = {
            r: self._neuron_rows(layer, r, weights[r].shape[0], weights[r].device) for r in group
        }
        expanded = [r for r in group if rows[r] is None or rows[r].numel() > 0]
        if expanded:
            stats = self._expand(ctx, expanded, weights, rows, inputs.pop(group[0]), bounds)
        else:  # neuron-level mode: prune once with the whole layer's Hessian
            full = hessian_pruner(inputs.pop(group[0]), bounds, ctx.device)
            stats = {r: prune_in_place(weights[r], full, self.cfg) for r in group}
            del full
        seconds = time.perf_counter() - t_group
        modules = [adapter.linear(hf, layer, r) for r in group]
        for r, cost in zip(group, linear_costs(modules), strict=True):
            shape = {"layer": layer, "role": r, "d_in": d_in, "d_out": weights[r].shape[0]}
            self.records.append(self._record(shape, n_tokens, stats[r], cost, seconds / len(group)))

    def _record(
        self,
        shape: dict[str, Any],
        n_tokens: int,
        s: dict[str, Any],
        cost: tuple[int, float, int],
        seconds: float,
    ) -> dict[str, Any]:
        """One summary row (:data:`SUMMARY_COLUMNS`) from the stats ``s`` of a linear.

        ``shape`` holds ``layer``, ``role``, ``d_in``, ``d_out``; ``cost`` is ``(params,
        flops_per_token, nbytes)``.  Stats missing for a linear pruned once default to one
        expert holding all ``n_tokens``.
        """
        params, flops, nbytes = cost
        return {
            "layer": shape["layer"],
            "role": shape["role"],
            "experts": s.get("experts", 1),
            "expert_rows": s.get("expert_rows", 0),
            "d_in": shape["d_in"],
            "d_out": shape["d_out"],
            "n_tokens": n_tokens,
            "pca_dim": s.get("pca_dim", 0),
            "cluster_min": s.get("cluster_min", n_tokens),
            "cluster_max": s.get("cluster_max", n_tokens),
            "small_clusters": s.get("small_clusters", 0),
            "fallbacks": s.get("fallbacks", 0),
            "target_sparsity": self.cfg.target_sparsity,
            "sparsity": s["sparsity"],
            "rel_error": s["rel_error"],
            "router_seconds": s.get("router_seconds", 0.0),
            "prune_seconds": s["prune_seconds"],
            "seconds": seconds,
            "params": params,
            "flops_per_token": flops,
            "nbytes": nbytes,
        }

    def _expand(
        self,
        ctx: LayerContext,
        names: list[str],
        weights: dict[str, Tensor],
        rows: dict[str, Tensor | None],
        x: Tensor,
        bounds: list[int],
    ) -> dict[str, dict[str, Any]]:
        r"""Fit one router on ``x``, prune ``k`` experts of every role in ``names``, install them.

        Cluster Hessians: with ``k = 1`` the only cluster is fed batch by batch (bit-identical
        to :func:`sequential_prune`); with ``k > 1`` the tokens are sorted by cluster once
        (one permuted copy of ``x``, after which ``x`` is released) and each cluster's
        contiguous slice is fed at once.  The whole-layer Hessian, needed by fallback experts
        and by the shared rows of neuron-level expansion, is then
        :math:`H = \frac{1}{N} \sum_c N_c H_c` (no extra pass over the tokens).  See
        :class:`~wasserstein_neurons.expansion.expert_pruning.GroupExperts`.

        Returns
        -------
        dict
            Summary stats of every role in ``names``.
        """
        layer, k = ctx.index, self.cfg.n_experts
        experts = GroupExperts(self.cfg, ctx.device, names, weights, rows)
        xs, starts = experts.cluster(x)
        del x  # k > 1: only the cluster-sorted copy is kept
        if experts.n_small:
            counts = experts.counts
            self.small.append(
                f"layer {layer} {'/'.join(names)}: {experts.n_small} of {k} clusters "
                f"< {experts.min_tokens} tokens (min {int(counts.min())})"
            )
        t_prune = time.perf_counter()
        experts.prune_clusters(xs, starts, bounds)
        del xs
        experts.prune_fallbacks()
        if experts.fallbacks:
            self.fallback.append(
                f"layer {layer} {'/'.join(names)}: {len(experts.fallbacks)} of {k}"
            )
        prune_s = time.perf_counter() - t_prune
        return {r: self._install_experts(layer, r, experts, prune_s / len(names)) for r in names}

    def _install_experts(
        self, layer: int, role: str, experts: GroupExperts, prune_s: float
    ) -> dict[str, Any]:
        """Build and install the module of ``role``; returns its stats.

        ``prune_s`` is the role's share of the group's expert pruning time.
        """
        t0 = time.perf_counter()
        model = self.model
        bias = getattr(model.adapter.linear(model.hf_model, layer, role), "bias", None)
        module = experts.module(role, bias)
        self._install(layer, role, module)
        if self.cfg.compact:
            self.to_compact.append(module)
        stats = experts.stats(role)
        stats["prune_seconds"] = prune_s + time.perf_counter() - t0
        return stats


def build_sparse_expansion(
    model,
    windows: Tensor,
    cfg: ExpansionConfig | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    r"""Replace the MLP linears of ``model`` by sparse experts, layer by layer (in place).

    Parameters
    ----------
    model : LoadedModel
        From :func:`~wasserstein_neurons.models.load_model` (bridged or plain HF), on any
        device; its MLP linears are replaced by
        :class:`~wasserstein_neurons.expansion.ExpertRoutedLinear` modules (neuron-level mode:
        also pruned in place).
    windows : LongTensor, shape ``[n_windows, seqlen]``
        Calibration token ids (the ``prune`` workflow's default: 128 x 512, seed 0).
    cfg : ExpansionConfig, optional
        Defaults to ``ExpansionConfig()`` (16 experts, 50% unstructured).
    progress : bool
        tqdm progress bar over layers.

    Returns
    -------
    pandas.DataFrame
        One row per MLP linear (columns :data:`SUMMARY_COLUMNS`): ``layer``, ``role``,
        ``experts`` (1 for linears pruned once), ``expert_rows`` (rows with experts), ``d_in``,
        ``d_out``, ``n_tokens`` (calibration tokens), ``pca_dim``, ``cluster_min`` /
        ``cluster_max`` (tokens), ``small_clusters`` (clusters below ``min_cluster_tokens``),
        ``fallbacks`` (experts pruned with the whole layer's Hessian), ``target_sparsity``,
        ``sparsity`` (achieved, over all stored weights of the linear), ``rel_error``
        :math:`\sqrt{\sum_c \lVert (W - W_c) X_c^\top \rVert_F^2 / \lVert W X^\top
        \rVert_F^2}` on the calibration tokens (NaN with ``measure_error=False``),
        ``router_seconds``, ``prune_seconds``, ``seconds`` (the linear's share of its input
        group's work, collection pass excluded), ``params`` (nonzero weights + bias + router,
        a shared router counted once), ``flops_per_token`` (expected over the calibration
        routing, :meth:`ExpertRoutedLinear.flops_per_token`) and ``nbytes``.

    Warns
    -----
    SmallClusterWarning
        Once per call, listing the linears with clusters below ``min_cluster_tokens`` and those
        whose empty clusters fell back to the whole-layer Hessian.

    Notes
    -----
    The Llama ``gate``/``up`` modules share one :class:`Router` object.  See the module
    docstring for the within-layer order, the ``k = 1`` equivalence with SparseGPT and memory.
    """
    cfg = cfg or ExpansionConfig()
    roles = _check_expandable(model, cfg)
    layers = cfg.layers
    adapter, hf = model.adapter, model.hf_model
    holders = _bridge_holders(model, roles)
    sdpa_ctx = native_sdpa(hf) if cfg.sdpa else nullcontext(False)
    with sdpa_ctx:
        # interrupting a layer's forward is only safe without bridge wrappers
        builder = _Builder(model, cfg, not has_bridge_modules(hf), holders)
        sequential_layerwise(
            model,
            windows,
            builder.process,
            layers=layers,
            batch_size=cfg.batch_size,
            offload=cfg.offload,
            progress=progress,
            desc=f"sparse expansion k={cfg.n_experts}",
        )
        builder._compact_pending()
    for (layer, role), module in builder.installed.items():
        if adapter.linear(hf, layer, role) is not module:
            raise RuntimeError(
                f"layer {layer} {role!r}: the expert module was not kept in the model "
                "(bridge wrapper restored over it?)"
            )
    if builder.small or builder.fallback:
        _warn_small_clusters(builder.small, builder.fallback)
    return pd.DataFrame.from_records(builder.records, columns=list(SUMMARY_COLUMNS))


def _check_expandable(model, cfg: ExpansionConfig) -> tuple[str, ...]:
    """The roles to expand (forward order); raises ``ValueError`` for a bad config or a model
    whose linears of those roles are already expanded."""
    roles = _layer_roles(model, cfg)
    if not roles:
        raise ValueError("no MLP linear to expand (empty roles)")
    if cfg.compact and getattr(model, "offload", None) is not None:
        raise ValueError(
            "compact=True packs experts held in memory; an offloaded model stores each "
            "layer's experts with the layer (off the device between uses)"
        )
    if cfg.neuron_rows is not None:
        bad = [layer for layer in cfg.neuron_rows if not 0 <= layer < model.adapter.n_layers]
        if bad:
            raise ValueError(f"neuron_rows has layers out of range: {bad}")
    done = [key for key in expanded_modules(model) if key[1] in roles]
    if done:
        raise ValueError(
            f"the model is already expanded ({len(done)} expert modules, e.g. layer "
            f"{done[0][0]} {done[0][1]!r}); start from a freshly loaded dense model"
        )
    return roles


def _bridge_holders(model, roles: Sequence[str]) -> dict[tuple[int, str], Any]:
    """The MLP attribute of every ``(layer, role)`` linear: with a bridge, its ``LinearBridge``.

    Caught before :func:`~wasserstein_neurons.bridge.native_modules` detaches the bridge
    wrappers: replacements must go into them too (:meth:`_Builder._install`).
    """
    adapter, hf = model.adapter, model.hf_model
    return {
        (layer, role): adapter.holder(hf, layer, role)
        for layer in range(adapter.n_layers)
        for role in roles
    }


def _warn_small_clusters(small: list[str], fallback: list[str]) -> None:
    """One :class:`SmallClusterWarning` for :func:`build_sparse_expansion`'s caller.

    ``small`` lists the linears with clusters below ``min_cluster_tokens``, ``fallback`` those
    whose experts fell back to the whole-layer Hessian (at most four of each are named).
    """

    def some(items: list[str]) -> str:
        return "; ".join(items[:4]) + (" ..." if len(items) > 4 else "")

    msg = []
    if small:
        msg.append(
            f"{len(small)} expanded linear(s) have clusters with few calibration tokens "
            f"({some(small)}): their experts' Hessians are poorly estimated — use more "
            "calibration windows (--nsamples) or fewer experts"
        )
    if fallback:
        msg.append(f"empty clusters fell back to the whole-layer Hessian in {some(fallback)}")
    warnings.warn(
        "sparse expansion: " + ". ".join(msg) + " (see the summary's small_clusters / "
        "fallbacks columns)",
        SmallClusterWarning,
        stacklevel=3,  # the caller of build_sparse_expansion
    )
