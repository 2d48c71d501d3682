r"""Sparse Expansion router: PCA projection followed by k-means, hard top-1 routing.

A token :math:`x \in \mathbb{R}^{d_{in}}` is projected onto the top :math:`p` principal
components of the calibration inputs and sent to the nearest of :math:`k` centroids:

.. math::

    z = (x - \mu)^\top C \in \mathbb{R}^{p}, \qquad
    e(x) = \operatorname*{arg\,min}_{j} \lVert z - c_j \rVert^2
         = \operatorname*{arg\,min}_{j} \left( \lVert c_j \rVert^2 - 2\, z^\top c_j \right),

with :math:`\mu \in \mathbb{R}^{d_{in}}` the calibration mean, :math:`C \in \mathbb{R}^{d_{in}
\times p}` the principal directions (orthonormal columns) and :math:`c_j \in \mathbb{R}^p` the
k-means centroids.  There are no gate weights: each token goes to exactly one expert.

The paper (Sawmya et al., arXiv:2405.15756) uses :math:`p = d_{in} / 32`, :math:`k = 16`,
100 k-means restarts and seed 0 (scikit-learn ``PCA`` + ``KMeans``).  :func:`fit_router` does the
same in torch, so it runs on CPU or CUDA:

* PCA: centre with the mean (float32 chunk sums added in float64), accumulate the covariance
  :math:`\frac{1}{n-1} \sum_t (x_t - \mu) (x_t - \mu)^\top` chunk by chunk (float32
  products as a symmetric Gram, float64 sums), ``torch.linalg.eigh`` in float64, keep the
  top-:math:`p` eigenvectors (sign fixed so the largest-magnitude entry of each is positive);
* k-means: k-means++ seeding, Lloyd iterations (assignment with the matmul expansion in
  float32, centroid sums in float64), several restarts, keep the lowest inertia
  :math:`\sum_t \lVert z_t - c_{e(t)} \rVert^2`.  A cluster that becomes empty is re-seeded
  with the point farthest from its current centroid (as scikit-learn does).

Routing of the fitted router is recomputed with :meth:`Router.route` itself, so the cluster
sizes in :attr:`Router.counts` (and any per-cluster statistics a caller derives from
``router.route(x)``) match what the module does at inference exactly.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..gram import gram_update_
from .threads import cpu_threads, resolve_workers, thread_map

__all__ = ["Router", "RouterFitInfo", "SmallClusterWarning", "fit_router"]

#: Rows per chunk when streaming the calibration inputs through the covariance / projection.
_CHUNK = 16384


class SmallClusterWarning(UserWarning):
    """A cluster received fewer calibration tokens than requested (its Hessian is poor)."""


@dataclass
class RouterFitInfo:
    """Diagnostics of :func:`fit_router` (kept on ``router.fit_info``; not saved).

    Attributes
    ----------
    inertia : float
        Best (lowest) k-means inertia :math:`\\sum_t \\lVert z_t - c_{e(t)} \\rVert^2` over the
        restarts, in PCA space, computed in float64 from the final routing.
    restart_inertia : list of float
        Final inertia of every restart (Lloyd labels), in the order they were run.
    n_iter : int
        Lloyd iterations of the best restart.
    converged : bool
        Whether the best restart met the tolerance before ``max_iter``.
    explained_variance_ratio : Tensor, shape ``[p]``
        Fraction of the total input variance carried by each kept principal component (empty
        without PCA).
    n_tokens : int
        Number of calibration tokens.
    time_s : float
        Wall-clock seconds of the fit.
    """

    inertia: float
    restart_inertia: list[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = True
    explained_variance_ratio: Tensor = field(default_factory=lambda: torch.zeros(0))
    n_tokens: int = 0
    time_s: float = 0.0


class Router(nn.Module):
    r"""Hard top-1 nearest-centroid router in a PCA subspace.

    Parameters
    ----------
    mean : Tensor, shape ``[d_in]``
        Calibration mean :math:`\mu`.
    components : Tensor, shape ``[d_in, p]``, or None
        Orthonormal principal directions :math:`C`; ``None`` routes in the full (centred)
        input space (``p = d_in``, no projection).
    centroids : Tensor, shape ``[k, p]``
        Cluster centres in the projected space.
    counts : Tensor, shape ``[k]``, optional
        Calibration tokens routed to each cluster (used to weight FLOP counts by routing
        frequency); zeros when unknown.

    Notes
    -----
    All buffers are kept in float32 whatever ``module.to(dtype)`` / ``.half()`` asks for (device
    moves do apply), so casting a model to fp16/bf16 does not change its routing.  Inputs of any
    floating dtype are routed in float32.

    The state dict holds ``mean``, ``components`` (absent without PCA), ``centroids`` and
    ``counts``; :meth:`from_state_dict` rebuilds a router of the right shape from it.
    """

    mean: Tensor
    components: Tensor | None
    centroids: Tensor
    counts: Tensor

    def __init__(
        self,
        mean: Tensor,
        components: Tensor | None,
        centroids: Tensor,
        counts: Tensor | None = None,
    ) -> None:
        super().__init__()
        if mean.dim() != 1:
            raise ValueError(f"mean must be 1-D [d_in], got shape {tuple(mean.shape)}")
        d_in = mean.shape[0]
        p = d_in if components is None else components.shape[-1]
        if components is not None and (components.dim() != 2 or components.shape[0] != d_in):
            raise ValueError(
                f"components must have shape [d_in={d_in}, p], got {tuple(components.shape)}"
            )
        if centroids.dim() != 2 or centroids.shape[1] != p or centroids.shape[0] < 1:
            raise ValueError(
                f"centroids must have shape [k >= 1, p={p}], got {tuple(centroids.shape)}"
            )
        k = centroids.shape[0]
        if counts is None:
            counts = torch.zeros(k, dtype=torch.long, device=mean.device)
        if counts.shape != (k,):
            raise ValueError(f"counts must have shape [{k}], got {tuple(counts.shape)}")
        self.register_buffer("mean", mean.detach().to(torch.float32).clone())
        if components is None:
            self.register_buffer("components", None)
        else:
            self.register_buffer("components", components.detach().to(torch.float32).clone())
        self.register_buffer("centroids", centroids.detach().to(torch.float32).clone())
        self.register_buffer("counts", counts.detach().to(torch.long).clone())
        #: Diagnostics of the fit (not saved in the state dict).
        self.fit_info: RouterFitInfo | None = None

    # ------------------------------------------------------------------ properties
    @property
    def d_in(self) -> int:
        """Input features."""
        return self.mean.shape[0]

    @property
    def pca_dim(self) -> int:
        """Dimension ``p`` of the routing space (``d_in`` without PCA)."""
        return self.centroids.shape[1]

    @property
    def uses_pca(self) -> bool:
        """Whether inputs are projected onto principal components before routing."""
        return self.components is not None

    @property
    def n_clusters(self) -> int:
        """Number of clusters (experts) ``k``."""
        return self.centroids.shape[0]

    def flops_per_token(self) -> int:
        r"""Floating-point operations to route one token.

        With the mean folded into the centroids (:math:`z^\top c_j` with
        :math:`z = x^\top C - \mu^\top C`), routing costs the projection :math:`2 d_{in} p`
        plus the cross terms :math:`2 p k` plus adding :math:`\lVert c_j \rVert^2` (:math:`k`);
        without PCA :math:`2 d_{in} k + k`.  The argmin is not counted; a single-cluster
        router costs 0.

        Returns
        -------
        int
        """
        k, p = self.n_clusters, self.pca_dim
        if k == 1:
            return 0
        proj = 2 * self.d_in * p if self.uses_pca else 0
        return proj + 2 * p * k + k

    # ------------------------------------------------------------------ routing
    def _check_inputs(self, x: Tensor) -> None:
        """Raise a ``ValueError`` unless ``x`` is ``[..., d_in]``."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"router expects inputs [..., {self.d_in}], got {tuple(x.shape)}")

    def project(self, x: Tensor) -> Tensor:
        """Centre and project inputs into the routing space.

        Parameters
        ----------
        x : Tensor, shape ``[..., d_in]``

        Returns
        -------
        Tensor, float32, shape ``[..., p]``
        """
        self._check_inputs(x)
        z = x.to(device=self.mean.device, dtype=torch.float32) - self.mean
        return z if self.components is None else z @ self.components

    @torch.no_grad()
    def route(self, x: Tensor) -> Tensor:
        """Expert index of every token.

        Parameters
        ----------
        x : Tensor, shape ``[..., d_in]``

        Returns
        -------
        LongTensor, shape ``[...]``
            ``argmin_j ||z - c_j||^2`` (first index on ties), on the router's device.
        """
        lead = x.shape[:-1]
        self._check_inputs(x)
        if self.n_clusters == 1:
            return torch.zeros(lead, dtype=torch.long, device=self.mean.device)
        z = self.project(x.reshape(-1, self.d_in))
        return _assign(z, self.centroids).reshape(lead)

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`route`."""
        return self.route(x)

    # ------------------------------------------------------------------ (de)serialisation
    def _apply(self, fn, recurse: bool = True):
        # Let device moves through but keep float32 / int64 (routing must not change on casts).
        super()._apply(fn, recurse)
        for name, dtype in (
            ("mean", torch.float32),
            ("components", torch.float32),
            ("centroids", torch.float32),
            ("counts", torch.long),
        ):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != dtype:
                self._buffers[name] = buf.to(dtype)
        return self

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], prefix: str = "") -> Router:
        """Rebuild a router from ``router.state_dict()`` (keys optionally under ``prefix``).

        Parameters
        ----------
        state_dict : dict
            Holds ``{prefix}mean``, ``{prefix}centroids``, optionally ``{prefix}components``
            (PCA) and ``{prefix}counts``.
        prefix : str
            Key prefix, e.g. ``"router."``.

        Returns
        -------
        Router
        """
        return cls(
            state_dict[prefix + "mean"],
            state_dict.get(prefix + "components"),
            state_dict[prefix + "centroids"],
            state_dict.get(prefix + "counts"),
        )

    def extra_repr(self) -> str:
        pca = f"pca_dim={self.pca_dim}" if self.uses_pca else "no PCA"
        return f"d_in={self.d_in}, {pca}, n_clusters={self.n_clusters}"


# ============================================================================================
# Fitting
# ============================================================================================


def _assign(z: Tensor, centroids: Tensor) -> Tensor:
    """``argmin_j ||z_t - c_j||^2`` via ``||c_j||^2 - 2 z_t . c_j`` (float32, chunked).

    The centroids are passed to the GEMM as a contiguous ``[p, k]`` matrix and the index is
    taken with ``min(1)``: the same scores and the same first-of-ties index as ``addmm`` with
    the transposed view and ``argmin``, in about 40% of the time (measured: 65,536 x 48
    points, 16 centroids, one thread: 11.9 -> 4.5 ms; this is the inner step of every Lloyd
    iteration).
    """
    c = centroids.to(torch.float32)
    c2 = (c * c).sum(1)
    cT = c.T.contiguous()
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    # [chunk, k] score blocks keep the temporary small for huge token counts.
    step = max(1, (1 << 22) // max(1, c.shape[0]))
    for i in range(0, z.shape[0], step):
        scores = torch.addmm(c2, z[i : i + step], cT, beta=1.0, alpha=-2.0)
        out[i : i + step] = scores.min(1).indices
    return out


def _resolve_pca_dim(d_in: int, pca_dim: int | None, pca_factor: int | None) -> int:
    """0 means no PCA."""
    if pca_dim is None:
        if not pca_factor:
            return 0
        if not isinstance(pca_factor, int) or pca_factor < 1:
            raise ValueError(f"pca_factor must be a positive integer or 0/None, got {pca_factor!r}")
        return max(1, d_in // pca_factor)
    if isinstance(pca_dim, bool) or not isinstance(pca_dim, int) or pca_dim < 0:
        raise ValueError(f"pca_dim must be a non-negative integer or None, got {pca_dim!r}")
    if pca_dim > d_in:
        raise ValueError(f"pca_dim={pca_dim} exceeds the input dimension d_in={d_in}")
    return pca_dim


def _checked_mean(x: Tensor, device: torch.device) -> Tensor:
    """Mean ``[d]`` of ``x: [n, d]``: float32 column sums of each chunk, added in float64.

    Doubles as the finiteness check of the inputs: a sum is finite only if every summand is
    (a NaN or an infinity propagates), so a chunk whose float32 sum is not finite is summed
    again in float64, and a ``ValueError`` is raised if that is not finite either.
    """
    mean = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    for i in range(0, x.shape[0], _CHUNK):
        chunk = x[i : i + _CHUNK].to(device)
        part = chunk.sum(0, dtype=torch.float32)
        if not bool(torch.isfinite(part).all()):
            part = chunk.sum(0, dtype=torch.float64)  # float32 overflow of finite values?
            if not bool(torch.isfinite(part).all()):
                raise ValueError("calibration inputs contain NaN or Inf")
        mean += part
    mean /= x.shape[0]
    return mean


@torch.no_grad()
def _pca(x: Tensor, p: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Mean ``[d]``, top-``p`` components ``[d, p]`` (both float64) and their variance ratios."""
    n, d = x.shape
    mean = _checked_mean(x, device)
    mean32 = mean.to(torch.float32)
    cov = torch.zeros(d, d, dtype=torch.float64, device=device)
    part = torch.empty(d, d, dtype=torch.float32, device=device)  # one chunk's Gram
    for i in range(0, n, _CHUNK):
        xc = x[i : i + _CHUNK].to(device=device, dtype=torch.float32) - mean32
        cov += gram_update_(part, xc, beta=0.0)  # beta = 0: the old contents are ignored
    cov /= max(n - 1, 1)
    with cpu_threads(1, device):  # one small eigensolve (see .threads)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals = evals.flip(0).clamp_min(0.0)
    comps = evecs.flip(1)[:, :p]
    # Deterministic sign: the largest-magnitude entry of each component is positive.
    idx = comps.abs().argmax(0)
    signs = torch.sign(comps[idx, torch.arange(p, device=device)])
    signs[signs == 0] = 1.0
    comps = comps * signs
    tot = evals.sum()
    ratio = evals[:p] / tot if tot > 0 else torch.zeros(p, dtype=torch.float64, device=device)
    return mean, comps, ratio


def _kmeans_pp(z64: Tensor, zz: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: centres ``[k, p]`` (float64) drawn with probability ``∝ D(x)^2``.

    ``z64`` is the float64 data ``[n, p]`` and ``zz`` its squared row norms ``[n]``.  Sampling
    uses one uniform draw from ``gen`` and a search in the cumulative sum of ``D^2``.
    """
    n = z64.shape[0]
    dev = z64.device
    centers = torch.empty(k, z64.shape[1], dtype=torch.float64, device=dev)
    pick = int(torch.randint(n, (1,), generator=gen, device=dev))
    d2 = None
    for j in range(k):
        if j:
            cdf = torch.cumsum(d2, 0)
            tot = float(cdf[-1])
            u = torch.rand(1, generator=gen, device=dev, dtype=torch.float64)
            if tot > 0 and math.isfinite(tot):
                pick = min(int(torch.searchsorted(cdf, u * tot, right=True)), n - 1)
            else:  # every point coincides with a chosen centre (fewer distinct points than k)
                pick = min(int(u * n), n - 1)
        c = z64[pick]
        centers[j] = c
        # ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2  (clamped: rounding may go slightly negative)
        new = (zz - 2.0 * (z64 @ c) + c.dot(c)).clamp_min_(0.0)
        d2 = new if d2 is None else torch.minimum(d2, new)
    return centers


def _lloyd(
    z: Tensor, z64: Tensor, centers: Tensor, max_iter: int, tol: float
) -> tuple[Tensor, int, bool]:
    """Lloyd iterations from ``centers`` (float64 ``[k, p]``) -> centres, iterations, converged.

    Empty clusters are re-seeded with the points farthest from their assigned centroid (points
    already on their centroid are never moved, so duplicates cannot produce NaNs).
    """
    k = centers.shape[0]
    converged = False
    it = 0
    prev: Tensor | None = None
    for it in range(1, max_iter + 1):  # noqa: B007 - returned
        labels = _assign(z, centers)
        if prev is not None and torch.equal(labels, prev):
            converged = True  # same partition -> same centroids: a fixed point
            break
        prev = labels
        counts = torch.bincount(labels, minlength=k).to(torch.float64)
        sums = torch.zeros_like(centers).index_add_(0, labels, z64)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            d2 = ((z64 - centers[labels]) ** 2).sum(1)
            far = torch.topk(d2, min(empty.numel(), d2.numel())).indices
            for e, t in zip(empty.tolist(), far.tolist(), strict=False):
                if float(d2[t]) <= 0:
                    break
                old = int(labels[t])
                if counts[old] <= 1:
                    continue
                prev = None  # the partition changed outside the assignment step
                sums[old] -= z64[t]
                counts[old] -= 1
                sums[e] = z64[t]
                counts[e] = 1
        nonempty = counts > 0
        new = torch.where(nonempty[:, None], sums / counts.clamp_min(1)[:, None], centers)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol:
            converged = True
            break
    return centers, it, converged


@torch.no_grad()
def fit_router(
    x: Tensor,
    n_clusters: int,
    pca_dim: int | None = None,
    *,
    pca_factor: int | None = 32,
    restarts: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    device: torch.device | str | None = None,
    min_cluster_tokens: int | None = None,
    workers: int | None = None,
    return_labels: bool = False,
) -> Router | tuple[Router, Tensor]:
    r"""Fit a PCA + k-means router on calibration inputs.

    Parameters
    ----------
    x : Tensor, shape ``[tokens, d_in]`` (or ``[..., d_in]``, flattened)
        Calibration inputs of the layer(s) to expand; any floating dtype, any device (streamed
        to ``device`` in chunks).
    n_clusters : int
        Number of clusters / experts ``k >= 1``.  ``k = 1`` gives the trivial router (no PCA,
        everything to expert 0): Sparse Expansion then reduces to plain SparseGPT.
    pca_dim : int, optional
        Routing dimension ``p``.  ``None`` (default) uses ``max(1, d_in // pca_factor)``;
        ``0`` routes in the full input space (no PCA).
    pca_factor : int or None
        Divisor for the default ``pca_dim`` (paper: 32).  ``0``/``None`` with ``pca_dim=None``
        disables PCA.
    restarts : int
        Number of k-means++ initialisations; the run with the lowest inertia is kept (paper:
        100).  Measured on 32,768 SmolLM2 MLP inputs of 5 layers (k = 16) on a loaded 2-core
        CPU: 576-d (p = 18) 2.6 s with 5 restarts, 10 s with 25, 43 s with 100; 1536-d
        (p = 48) 12 / 32 / 97 s; the best inertia of 5 restarts is 0.4-9% above that of 100
        (see :data:`~wasserstein_neurons.expansion.DEFAULT_KMEANS_RESTARTS`).  Restarts share
        one generator, so the first ``r`` restarts of a larger count are those of ``r``.
    max_iter : int
        Maximum Lloyd iterations per restart.
    tol : float
        Convergence when the summed squared centroid shift is at most ``tol`` times the mean
        per-dimension variance of the projected data (scikit-learn's rule).
    seed : int
        Seed of the ``torch.Generator`` for k-means++ (results are deterministic for a given
        seed *and device*; CPU and CUDA random streams differ).
    device : torch.device or str, optional
        Where to compute (default: ``x``'s device).  The router is returned on this device.
    min_cluster_tokens : int, optional
        Emit a :class:`SmallClusterWarning` when a cluster gets fewer calibration tokens than
        this (default ``2 * d_in``: a cluster's Hessian :math:`X_c^\top X_c` needs well over
        ``d_in`` tokens to be informative); ``0`` disables the warning.
    workers : int or None
        Threads that run the restarts' Lloyd iterations side by side on CPU (``None``: torch's
        thread count, at most 4; see :mod:`.threads`).  The router does not depend on it.
    return_labels : bool
        Also return the expert of every calibration token (``[tokens]`` on ``device``, equal
        to :meth:`Router.route` of the inputs), saving a second routing pass.

    Returns
    -------
    Router, or (Router, LongTensor) with ``return_labels``
        With ``counts`` = calibration tokens per cluster (from :meth:`Router.route`) and
        ``fit_info`` (:class:`RouterFitInfo`).

    Raises
    ------
    ValueError
        For empty inputs, non-finite inputs, ``n_clusters < 1``, a bad ``pca_dim``.

    Notes
    -----
    Clusters may end up empty when the data has fewer distinct points than ``k`` (or fewer
    tokens than ``k``); their centroids then duplicate existing ones and ``counts`` is 0 for
    them — no NaNs are produced.  Cost: the covariance is :math:`O(n d_{in}^2)`, each Lloyd
    iteration :math:`O(n p k)`.
    """
    t0 = time.perf_counter()
    x = _check_fit_inputs(x, n_clusters, restarts, max_iter)
    n, d_in = x.shape
    device = torch.device(device) if device is not None else x.device
    min_cluster_tokens = 2 * d_in if min_cluster_tokens is None else int(min_cluster_tokens)
    if n_clusters == 1:
        router = _single_cluster_router(x, device)
        labels = torch.zeros(n, dtype=torch.long, device=device)
    else:
        p = _resolve_pca_dim(d_in, pca_dim, pca_factor)
        workers = resolve_workers(workers, device)
        router, labels = _kmeans_router(
            x, n_clusters, p, restarts, max_iter, tol, seed, device, workers
        )
    router.fit_info.time_s = time.perf_counter() - t0
    _warn_small(router.counts, min_cluster_tokens)  # stacklevel: called from fit_router
    return (router, labels) if return_labels else router


def _check_fit_inputs(x: Tensor, n_clusters: int, restarts: int, max_iter: int) -> Tensor:
    """Validate the arguments of :func:`fit_router`; returns ``x`` as ``[tokens, d_in]``."""
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive integer, got {n_clusters!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be [tokens, d_in], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    x = x.detach().reshape(-1, x.shape[-1])
    if x.shape[0] == 0:
        raise ValueError("fit_router needs at least one calibration token")
    return x  # finiteness is checked by _checked_mean, which every fit runs once


def _single_cluster_router(x: Tensor, device: torch.device) -> Router:
    """The trivial ``k = 1`` router of ``x: [n, d_in]``: no PCA, every token to expert 0."""
    n, d_in = x.shape
    mean = _checked_mean(x, device)
    router = Router(
        mean, None, torch.zeros(1, d_in, device=device), torch.tensor([n], device=device)
    )
    router.fit_info = RouterFitInfo(inertia=float("nan"), n_tokens=n)
    return router


def _kmeans_router(
    x: Tensor,
    k: int,
    p: int,
    restarts: int,
    max_iter: int,
    tol: float,
    seed: int,
    device: torch.device,
    workers: int = 1,
) -> tuple[Router, Tensor]:
    r"""PCA (to ``p`` dimensions; ``p = 0``: none) + k-means router of ``x: [n, d_in]``, k >= 2.

    The centroids are those of the restart with the lowest inertia; ``counts`` and
    ``fit_info.inertia`` come from the final routing :math:`e(x_t)` of every token, which is
    returned too (``[n]``, equal to ``router.route`` of each :data:`_CHUNK`-row chunk).
    """
    n, d_in = x.shape
    if p:
        mean, comps, ratio = _pca(x, p, device)
        router = Router(mean, comps, torch.zeros(k, p, device=device))
    else:
        mean = _checked_mean(x, device)
        ratio = torch.zeros(0, dtype=torch.float64)
        router = Router(mean, None, torch.zeros(k, d_in, device=device))
    # Projected data [n, p] in exactly the arithmetic route() uses.
    z = torch.cat([router.project(x[i : i + _CHUNK].to(device)) for i in range(0, n, _CHUNK)])
    z64 = z.to(torch.float64)
    tol_abs = tol * float(z64.var(0, unbiased=False).mean()) if n > 1 else 0.0
    centers, n_iter, converged, restart_inertia = _best_kmeans(
        z, z64, k, restarts, max_iter, tol_abs, seed, device, workers
    )
    router.centroids.copy_(centers.to(torch.float32))
    # route() of each _CHUNK-row chunk, exactly: its projection is z's chunk (see above)
    labels = torch.cat([_assign(z[i : i + _CHUNK], router.centroids) for i in range(0, n, _CHUNK)])
    router.counts.copy_(torch.bincount(labels, minlength=k))
    c = router.centroids.to(torch.float64)
    router.fit_info = RouterFitInfo(
        inertia=float(((z64 - c[labels]) ** 2).sum()),
        restart_inertia=restart_inertia,
        n_iter=n_iter,
        converged=converged,
        explained_variance_ratio=ratio.to(torch.float32).cpu(),
        n_tokens=n,
    )
    return router, labels


def _best_kmeans(
    z: Tensor,
    z64: Tensor,
    k: int,
    restarts: int,
    max_iter: int,
    tol: float,
    seed: int,
    device: torch.device,
    workers: int = 1,
) -> tuple[Tensor, int, bool, list[float]]:
    r"""k-means++ + Lloyd ``restarts`` times on ``z: [n, p]`` (``z64`` its float64 copy).

    Returns the centres ``[k, p]`` (float64), iterations and convergence of the restart with
    the lowest inertia :math:`\sum_t \lVert z_t - c_{e(t)} \rVert^2` (the first on ties), and
    every restart's inertia in run order.  One ``torch.Generator`` seeded with ``seed`` on
    ``device`` draws every restart's seeding, in order; the Lloyd runs, which draw nothing, then
    go to ``workers`` threads (:func:`.threads.thread_map`), each single-threaded, so the result
    does not depend on ``workers``.
    """
    zz = (z64 * z64).sum(1)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def lloyd(centers: Tensor) -> tuple[float, Tensor, int, bool]:
        centers, n_iter, converged = _lloyd(z, z64, centers, max_iter, tol)
        labels = _assign(z, centers)
        return float(((z64 - centers[labels]) ** 2).sum()), centers, n_iter, converged

    with cpu_threads(1, device):  # small [n, p] kernels (see .threads)
        seeds = [_kmeans_pp(z64, zz, k, gen) for _ in range(restarts)]
        runs = thread_map(lloyd, seeds, workers)
    best = min(range(restarts), key=lambda i: runs[i][0])  # min keeps the first of equals
    _, centers, n_iter, converged = runs[best]
    return centers, n_iter, converged, [r[0] for r in runs]


def _warn_small(counts: Tensor, min_tokens: int) -> None:
    if min_tokens <= 0:
        return
    small = (counts < min_tokens).nonzero().flatten().tolist()
    if small:
        sizes = counts[small].tolist()
        warnings.warn(
            f"{len(small)} of {counts.numel()} clusters have fewer than {min_tokens} calibration "
            f"tokens (clusters {small[:8]} with {sizes[:8]} tokens); their experts' Hessians "
            "are poorly estimated — use more calibration tokens or fewer clusters",
            SmallClusterWarning,
            stacklevel=4,  # the caller of fit_router (past the no_grad wrapper)
        )
