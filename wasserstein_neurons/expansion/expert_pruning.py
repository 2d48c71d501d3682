r"""The ``k`` SparseGPT experts of one input group of MLP linears (internal to the builder).

An *input group* is the set of linears of a layer that read the same input
:math:`X \in \mathbb{R}^{N \times d_{in}}` (Llama's ``gate`` and ``up``; ``down`` alone).
:class:`GroupExperts` turns the dense weights :math:`W` of a group into
:class:`~wasserstein_neurons.expansion.ExpertRoutedLinear` modules that share one router:

1. :meth:`GroupExperts.cluster` fits the router on :math:`X` and routes every token with
   :meth:`Router.route`, giving clusters :math:`X_1, \dots, X_k` of :math:`N_c` tokens;
2. :meth:`GroupExperts.prune_clusters` accumulates each cluster's Hessian
   :math:`H_c = \frac{2}{N_c} X_c^\top X_c` and prunes a copy of every :math:`W` under it
   (expert :math:`W_c`), and sums :math:`H_\Sigma = \sum_c N_c H_c = 2 X^\top X`;
3. :meth:`GroupExperts.prune_fallbacks` prunes the experts of clusters with fewer than
   ``min_expert_tokens`` tokens with the whole-layer Hessian :math:`H = H_\Sigma / N`;
4. :meth:`GroupExperts.module` builds the module of one linear (neuron-level mode: its
   non-expert rows pruned once under :math:`H`) and :meth:`GroupExperts.stats` its summary.

With ``k = 1`` the only cluster's Hessian is fed batch by batch exactly as
:func:`~wasserstein_neurons.pruning.sequential_prune` does, so the expert is bit-identical to
SparseGPT.  :func:`prune_in_place` is the single-expert path of a group that gets no experts
(neuron-level mode).  :func:`prune_experts` is the same per-cluster rule for one weight and
given labels (the disentanglement analysis uses it).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..pruning import PruneSpec, SparseGPTPruner
from ..pruning.sparsegpt_batched import prune_batched
from .expert_linear import ExpertRoutedLinear
from .router import Router, SmallClusterWarning, fit_router
from .threads import cpu_threads, resolve_workers, thread_imap, thread_map

if TYPE_CHECKING:
    from .builder import ExpansionConfig

__all__ = ["GroupExperts", "cluster_pruner", "hessian_pruner", "prune_experts", "prune_in_place"]

#: Rows per ``add_batch`` call when a cluster's tokens are fed to its Hessian (k > 1).
_HESSIAN_CHUNK = 16384

#: Bytes of stacked ``[g, d_in, d_in]`` Hessians one batched prune may hold (``g`` experts at
#: a time; it also holds their factors and ``[g, d_out, d_in]`` weights).
_BATCH_BYTES = 1 << 30


@torch.no_grad()
def hessian_pruner(x: Tensor, bounds: list[int], device) -> SparseGPTPruner:
    r"""SparseGPT pruner with :math:`H = \frac{2}{N} X^\top X` over all tokens of ``x``.

    Tokens are fed batch by batch in calibration order (``bounds``), i.e. exactly the
    ``add_batch`` sequence of :func:`sequential_prune`, so the Hessian is bit-identical.
    """
    pruner = SparseGPTPruner(x.shape[1], device=device)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        pruner.add_batch(x[a:b])
    return pruner


@torch.no_grad()
def cluster_pruner(
    x: Tensor, index: Tensor | slice, device, chunk: int = _HESSIAN_CHUNK
) -> SparseGPTPruner:
    r"""SparseGPT pruner with the Hessian :math:`H_c = \frac{2}{N_c} X_c^\top X_c` of one cluster.

    The cluster's tokens are ``x[index]`` (``x: [N, d_in]``; ``index`` a LongTensor of token
    indices or a slice of a cluster-sorted ``x``), fed in calibration order ``chunk`` rows per
    ``add_batch`` call.
    """
    pruner = SparseGPTPruner(x.shape[1], device=device)
    if isinstance(index, slice):
        start, stop, _ = index.indices(x.shape[0])
        for a in range(start, stop, chunk):
            pruner.add_batch(x[a : min(a + chunk, stop)])
    else:
        for i in range(0, index.numel(), chunk):
            pruner.add_batch(x[index[i : i + chunk]])
    return pruner


@torch.no_grad()
def prune_experts(
    weight: Tensor,
    x: Tensor,
    labels: Tensor,
    n_clusters: int,
    spec: PruneSpec,
    full_hessian: Tensor | None = None,
    device=None,
    chunk: int = 8192,
) -> tuple[list[Tensor], list[int]]:
    r"""One SparseGPT expert per cluster, each pruned with its own cluster's Hessian.

    Expert :math:`c` is :math:`W` pruned by SparseGPT with
    :math:`H_c = \tfrac{2}{N_c} \sum_{t \in S_c} x_t x_t^\top` (:class:`SparseGPTPruner`); a
    cluster with no calibration token uses ``full_hessian`` (the Hessian of all tokens)
    instead, i.e. its expert is the SparseGPT baseline.  The builder's experts
    (:class:`GroupExperts`) get their Hessians from the same :func:`cluster_pruner`.

    Parameters
    ----------
    weight : Tensor, shape ``[d_out, d_in]``
        Dense weight (not modified).
    x : Tensor, shape ``[tokens, d_in]``
        Calibration inputs.
    labels : LongTensor, shape ``[tokens]``
        Cluster of each calibration token.
    n_clusters : int
    spec : PruneSpec
    full_hessian : Tensor, shape ``[d_in, d_in]``, optional
        Needed only if a cluster is empty.
    device : torch.device or str, optional
        Where Hessians are accumulated and pruning runs (default ``weight``'s device).
    chunk : int
        Tokens per ``add_batch`` call (the Hessian's float rounding depends on it).

    Returns
    -------
    experts : list of ``n_clusters`` Tensors, shape ``[d_out, d_in]`` (float32)
    counts : list of int
        Calibration tokens per cluster.
    """
    device = weight.device if device is None else torch.device(device)
    w = weight.detach().to(device=device, dtype=torch.float32)
    labels = torch.as_tensor(labels).cpu().long()
    experts, counts = [], []
    for c in range(n_clusters):
        idx = (labels == c).nonzero().flatten()
        counts.append(int(idx.numel()))
        if idx.numel() == 0:
            if full_hessian is None:
                raise ValueError(f"cluster {c} is empty and no full_hessian was given")
            pruner = SparseGPTPruner.from_hessian(full_hessian.to(device), nsamples=x.shape[0])
        else:
            pruner = cluster_pruner(x, idx, device, chunk)
        experts.append(pruner.prune(w, spec).weight)
    return experts, counts


def _trace_quad(d: Tensor, H: Tensor) -> float:
    r""":math:`\mathrm{tr}(D H D^\top)` (float32 product, float64 sum)."""
    d = d.to(device=H.device, dtype=H.dtype)
    return float(((d @ H) * d).sum(dtype=torch.float64))


def _relative_error(num: float, den: float) -> float:
    r""":math:`\sqrt{\max(\text{num}, 0) / \text{den}}`, NaN unless ``den > 0``."""
    return math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")


def prune_in_place(w: Tensor, pruner: SparseGPTPruner, cfg: ExpansionConfig) -> dict[str, Any]:
    r"""SparseGPT on all tokens, written into the linear's weight ``w: [out, in]`` in place.

    Returns the summary entries ``sparsity``, ``rel_error``
    :math:`\sqrt{\mathrm{tr}(D H D^\top) / \mathrm{tr}(W H W^\top)}` with :math:`D = W - \hat W`
    (NaN with ``measure_error=False``) and ``prune_seconds``.
    """
    t0 = time.perf_counter()
    w0 = w.clone() if cfg.measure_error else None
    with cpu_threads(cfg.cpu_threads, w.device):
        res = pruner.prune(w, cfg.spec())
        w.copy_(res.weight)
        rel = float("nan")
        if w0 is not None:
            den = _trace_quad(w0, pruner.H)
            rel = _relative_error(_trace_quad(w0 - w, pruner.H), den)
    return {
        "sparsity": res.sparsity,
        "rel_error": rel,
        "prune_seconds": time.perf_counter() - t0,
    }


class GroupExperts:
    r"""Router, cluster Hessians and pruned experts of the linears of one input group.

    Call, in this order: :meth:`cluster`, :meth:`prune_clusters`, :meth:`prune_fallbacks`,
    then :meth:`module` and :meth:`stats` for every role.

    Parameters
    ----------
    cfg : ExpansionConfig
        ``n_experts`` :math:`k`, the SparseGPT settings, router settings, ``cpu_threads``,
        ``measure_error``, ``store_routing``.
    device : torch.device
        Where the routers and Hessians are computed.
    names : list of str
        Roles of the group that get experts (all read the same input).
    weights : dict[str, Tensor]
        Dense weight ``[d_out, d_in]`` of every role (``nn.Linear`` layout; read only).
    rows : dict[str, LongTensor or None]
        Output rows of each role that get experts (``None``: all); the other rows are pruned
        once under the whole-layer Hessian.

    Attributes
    ----------
    router : Router
        Shared by the group's modules (after :meth:`cluster`).
    counts : LongTensor, shape ``[k]``
        Calibration tokens :math:`N_c` routed to each cluster (on CPU).
    n_small : int
        Clusters with fewer than ``min_cluster_tokens`` tokens.
    fallbacks : list of int
        Clusters with fewer than ``min_expert_tokens`` tokens, pruned with the whole-layer
        Hessian.
    """

    def __init__(
        self,
        cfg: ExpansionConfig,
        device: torch.device,
        names: list[str],
        weights: dict[str, Tensor],
        rows: dict[str, Tensor | None],
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.names = names
        self.weights = weights
        self.rows = rows
        self.k = cfg.n_experts
        self.router: Router | None = None
        self.counts: Tensor | None = None
        self.n_tokens = 0
        self.d_in = 0
        self.n_small = 0
        self.min_tokens = 0
        self.router_seconds = 0.0
        self.fallbacks: list[int] = []
        #: expert rows ``[k, r, d_in]`` of every role (handed to its module by :meth:`module`)
        self.experts: dict[str, Tensor] = {}
        #: :math:`\sum_c N_c \mathrm{tr}(D_c H_c D_c^\top)`, :math:`D_c = W - W_c` (+ shared rows)
        self.num = dict.fromkeys(names, 0.0)
        #: :math:`\mathrm{tr}(W H_\Sigma W^\top)` of every role (set by :meth:`module`)
        self.den = dict.fromkeys(names, 0.0)
        self.zeros = dict.fromkeys(names, 0)
        self.shared_zeros = dict.fromkeys(names, 0)
        self.H_sum: Tensor | None = None  # sum_c N_c H_c = 2 X^T X
        self._full: SparseGPTPruner | None = None
        self._tiny: dict[int, SparseGPTPruner] = {}
        #: concurrent workers (1 unless ``cfg.cpu_threads == 1`` on the CPU), resolved once,
        #: outside any single-thread section (``None`` reads torch's thread count)
        self.workers = 1 if cfg.cpu_threads != 1 else resolve_workers(cfg.workers, self.device)

    # ------------------------------------------------------------------ router and clusters
    def cluster(self, x: Tensor) -> tuple[Tensor, list[int] | None]:
        """Fit the router on ``x: [N, d_in]`` and route every calibration token.

        Returns
        -------
        xs : Tensor, shape ``[N, d_in]``
            The tokens grouped by cluster (a permuted copy; ``x`` itself with ``k = 1``).
        starts : list of int or None
            Cluster boundaries ``[0, N_1, N_1 + N_2, ..., N]`` in ``xs`` (``None`` with
            ``k = 1``: the only cluster is fed batch by batch).
        """
        cfg, k = self.cfg, self.k
        self.n_tokens, self.d_in = x.shape
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmallClusterWarning)  # summarised by the builder
            router, labels = fit_router(
                x,
                k,
                pca_factor=cfg.pca_factor,
                restarts=cfg.kmeans_restarts,
                seed=cfg.seed,
                device=self.device,
                min_cluster_tokens=0,
                workers=self.workers,
                return_labels=True,
            )
        if k == 1:
            counts = torch.tensor([self.n_tokens])
            xs, starts = x, None
        else:
            labels = labels.to(x.device)
            counts = torch.bincount(labels, minlength=k).cpu()
            xs = x.index_select(0, torch.argsort(labels, stable=True))  # grouped by cluster
            del labels
            starts = [0, *torch.cumsum(counts, 0).tolist()]
        router.counts.copy_(counts.to(router.counts.device))
        self.router, self.counts = router, counts
        self.router_seconds = time.perf_counter() - t0
        min_tokens = 2 * self.d_in if cfg.min_cluster_tokens is None else cfg.min_cluster_tokens
        self.min_tokens = min_tokens
        self.n_small = int((counts < min_tokens).sum()) if min_tokens > 0 else 0
        return xs, starts

    # ------------------------------------------------------------------ experts
    def prune_clusters(self, xs: Tensor, starts: list[int] | None, bounds: list[int]) -> None:
        r"""Accumulate every cluster's Hessian :math:`H_c` and prune its experts under it.

        ``xs`` and ``starts`` come from :meth:`cluster`; ``bounds`` are the calibration batch
        boundaries (for ``k = 1``).  Clusters below ``min_expert_tokens`` are only recorded
        (their :math:`H_c` kept to measure their error) for :meth:`prune_fallbacks`.

        With ``k > 1`` the clusters are built by ``workers`` threads (:func:`.threads.thread_imap`,
        each Hessian and prune with ``cpu_threads`` torch threads, so the experts do not depend
        on the worker count); :math:`H_\Sigma` and the error sums are added in cluster order,
        and at most ``workers + 1`` finished clusters wait to be added (bounded memory).
        """
        cfg, k = self.cfg, self.k
        self.experts = {
            r: torch.empty(
                k,
                self._n_rows(r),
                self.d_in,
                dtype=self.weights[r].dtype,
                device=self.weights[r].device,
            )
            for r in self.names
        }
        min_expert = max(1, cfg.min_expert_tokens)
        self.fallbacks = [c for c in range(k) if int(self.counts[c]) < min_expert]
        if starts is None:  # k = 1: the batch-by-batch Hessian of sequential_prune
            own = hessian_pruner(xs, bounds, self.device)
            self._full = own
            self._add_cluster(
                0, own, self._prune_expert(own, own) if 0 not in self.fallbacks else None
            )
            return
        todo = [c for c in range(k) if int(self.counts[c]) > 0]
        if self.batched:
            self._prune_clusters_batched(todo, xs, starts)
            return
        built = thread_imap(lambda c: self._build_cluster(c, xs, starts), todo, self.workers)
        for c, (own, res) in zip(todo, built, strict=True):
            self._add_cluster(c, own, res)

    @property
    def batched(self) -> bool:
        """Whether the experts are pruned together (``prune_batched``): ``cfg.batched_experts``,
        ``None`` meaning on CUDA only; never with quantization or neuron rows (one by one)."""
        want = self.cfg.batched_experts
        want = self.device.type == "cuda" if want is None else want
        plain = not self.cfg.spec().quantize and all(r is None for r in self.rows.values())
        return bool(want) and plain

    def _prune_clusters_batched(self, todo: list[int], xs: Tensor, starts: list[int]) -> None:
        r"""The clusters ``todo`` in groups of ``g``: their Hessians (side by side on the
        ``workers``), then every role's ``g`` experts by one batched SparseGPT run
        (:math:`g \cdot d_{in}^2` floats of Hessians at most :data:`_BATCH_BYTES`)."""
        g = max(1, _BATCH_BYTES // (4 * self.d_in * self.d_in))
        for i in range(0, len(todo), g):
            group = todo[i : i + g]
            owns = thread_map(lambda c: self._cluster_hessian(c, xs, starts), group, self.workers)
            live = [j for j, c in enumerate(group) if c not in self.fallbacks]
            res = self._prune_experts_batched([owns[j] for j in live])
            by_cluster = dict(zip([group[j] for j in live], res, strict=True))
            for c, own in zip(group, owns, strict=True):
                self._add_cluster(c, own, by_cluster.get(c))

    def _prune_experts_batched(self, owns: list[SparseGPTPruner]) -> list[dict[str, Any]]:
        """Every role pruned under each of ``owns``' Hessians at once; one
        :meth:`_prune_expert`-like result per pruner, errors measured under its own Hessian."""
        cfg, out = self.cfg, [{} for _ in owns]
        if not owns:
            return out
        spec = cfg.spec()
        with cpu_threads(cfg.cpu_threads, self.device):
            H = torch.stack([own.H for own in owns])  # [g, d_in, d_in]
            for r in self.names:
                w = self.weights[r]
                W, _, _ = prune_batched(w.to(self.device), H, spec, per_row=spec.per_row is True)
                for e, own in enumerate(owns):
                    sel = W[e].to(device=w.device, dtype=w.dtype)
                    num = own.nsamples * _trace_quad(w - sel, own.H) if cfg.measure_error else 0.0
                    out[e][r] = (sel, int((sel == 0).sum()), num)
        return out

    def _cluster_hessian(self, c: int, xs: Tensor, starts: list[int]) -> SparseGPTPruner:
        """The pruner holding cluster ``c``'s Hessian (its tokens ``xs[starts[c]:starts[c+1]]``)."""
        with cpu_threads(self.cfg.cpu_threads, self.device):
            return cluster_pruner(xs, slice(starts[c], starts[c + 1]), self.device)

    def _build_cluster(
        self, c: int, xs: Tensor, starts: list[int]
    ) -> tuple[SparseGPTPruner, dict[str, Any] | None]:
        """Hessian of cluster ``c`` and, unless it is a fallback, its pruned experts."""
        own = self._cluster_hessian(c, xs, starts)
        return own, None if c in self.fallbacks else self._prune_expert(own, own)

    def _add_cluster(self, c: int, own: SparseGPTPruner, res: dict[str, Any] | None) -> None:
        r"""Record cluster ``c``: :math:`H_\Sigma \mathrel{+}= N_c H_c` and its experts
        (``res`` from :meth:`_prune_expert`; ``None`` for a fallback, kept for later)."""
        n_c = int(self.counts[c])
        self.H_sum = own.H * n_c if self.H_sum is None else self.H_sum.add_(own.H, alpha=n_c)
        if res is not None:
            self._store_expert(c, res)
        elif self.cfg.measure_error:  # a tiny cluster: its error is measured on its own tokens
            self._tiny[c] = own

    def _prune_expert(self, pruner: SparseGPTPruner, own: SparseGPTPruner | None) -> dict[str, Any]:
        r"""Prune every role under ``pruner`` -> ``{role: (rows, zeros, error term)}``; the error
        :math:`N_c \mathrm{tr}(D H_c D^\top)` is measured under ``own`` (``None``: not)."""
        cfg, out = self.cfg, {}
        with cpu_threads(cfg.cpu_threads, self.device):
            for r in self.names:
                w, rows = self.weights[r], self.rows[r]
                res = pruner.prune(w, cfg.spec(rows))
                sel = res.weight if rows is None else res.weight[rows]
                num = 0.0
                if cfg.measure_error and own is not None:
                    w0 = w if rows is None else w[rows]
                    num = own.nsamples * _trace_quad(w0 - sel, own.H)
                out[r] = (sel, int((sel == 0).sum()), num)
        return out

    def _store_expert(self, c: int, res: dict[str, Any]) -> None:
        """Put expert ``c``'s rows in place and add its zeros and error terms."""
        for r, (sel, zeros, num) in res.items():
            self.experts[r][c] = sel
            self.zeros[r] += zeros
            self.num[r] += num

    def full_pruner(self) -> SparseGPTPruner:
        r"""Pruner with the whole-layer Hessian :math:`H = H_\Sigma / N` (built once)."""
        if self._full is None:
            self._full = SparseGPTPruner.from_hessian(
                self.H_sum / self.n_tokens, nsamples=self.n_tokens
            )
        return self._full

    def prune_fallbacks(self) -> None:
        """Prune the experts of the :attr:`fallbacks` clusters under the whole-layer Hessian.

        Their errors are measured under their own :math:`H_c` (kept by :meth:`prune_clusters`).
        """
        for c in self.fallbacks:
            self._store_expert(c, self._prune_expert(self.full_pruner(), self._tiny.pop(c, None)))

    # ------------------------------------------------------------------ modules
    def _n_rows(self, r: str) -> int:
        """Rows of role ``r`` that get experts."""
        rows = self.rows[r]
        return self.weights[r].shape[0] if rows is None else rows.numel()

    def module(self, r: str, bias: Tensor | None) -> ExpertRoutedLinear:
        """The :class:`ExpertRoutedLinear` of role ``r`` (takes over its expert tensor).

        Neuron-level mode: the rows without experts are pruned once under the whole-layer
        Hessian into the module's shared weight.
        """
        cfg, w, rows = self.cfg, self.weights[r], self.rows[r]
        shared = None
        if rows is not None:
            keep = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
            keep[rows] = False
            with cpu_threads(cfg.cpu_threads, self.device):
                shared = self.full_pruner().prune(w, cfg.spec(keep)).weight
                self.shared_zeros[r] = int((shared[keep] == 0).sum())
                if cfg.measure_error:
                    self.num[r] += _trace_quad((w - shared)[keep], self.H_sum)
        self.den[r] = _trace_quad(w, self.H_sum) if cfg.measure_error else 0.0
        return ExpertRoutedLinear(
            self.experts.pop(r),
            self.router,
            None if bias is None else bias.detach(),
            rows=rows,
            shared_weight=shared,
            store_routing=cfg.store_routing,
        )

    def stats(self, r: str) -> dict[str, Any]:
        """Summary entries of role ``r`` (all but the timings ``prune_seconds``)."""
        k, n_rows, d_in = self.k, self._n_rows(r), self.d_in
        total = k * n_rows * d_in + (self.weights[r].shape[0] - n_rows) * d_in
        router, counts = self.router, self.counts
        return {
            "experts": k,
            "expert_rows": n_rows,
            "pca_dim": router.pca_dim if router.uses_pca else 0,
            "cluster_min": int(counts.min()),
            "cluster_max": int(counts.max()),
            "small_clusters": self.n_small,
            "fallbacks": len(self.fallbacks),
            "sparsity": (self.zeros[r] + self.shared_zeros[r]) / max(total, 1),
            "rel_error": _relative_error(self.num[r], self.den[r]),
            "router_seconds": self.router_seconds,
        }
