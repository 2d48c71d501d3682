r"""Why Sparse Expansion works: a per-neuron disentanglement analysis of one linear layer.

The study takes one MLP linear (default: the layer's first projection, Llama ``gate_proj``,
GPT-NeoX ``dense_h_to_4h``, GPT-2 ``c_fc``) of one chosen layer and compares, neuron by
neuron, three versions of it on **held-out** tokens:

* the dense layer :math:`y = W x + b`;
* SparseGPT: one copy of :math:`W` pruned with the Hessian of *all* calibration tokens;
* Sparse Expansion (SE) with :math:`k` experts: a PCA + k-means router fitted on the
  calibration inputs sends each token to one of :math:`k` copies of :math:`W`, copy :math:`c`
  pruned by SparseGPT with the Hessian of cluster :math:`c`'s calibration tokens only
  (:math:`H_c = \tfrac{2}{N_c} X_c^\top X_c`; an empty cluster falls back to the full Hessian).

Scope
-----
This is a *single-layer* study, like the paper's layer-wise analysis (Sawmya et al., arXiv
2405.15756): the layer's calibration and evaluation inputs both come from the **dense**
model, so every difference is due to this layer alone. The model-level, sequential expansion
(each layer calibrated on the outputs of the already-expanded earlier layers) is built by the
Sparse Expansion builder in :mod:`wasserstein_neurons.expansion`; its perplexities are not
comparable with the reconstruction errors here.

Metrics (per neuron :math:`j`, over the :math:`M` held-out tokens)
------------------------------------------------------------------
Let :math:`Y \in \mathbb{R}^{M \times d_{out}}` be the dense outputs and :math:`\hat Y` a
sparse reconstruction.

* relative reconstruction error
  :math:`e_j = \lVert \hat Y_{:,j} - Y_{:,j} \rVert_2 / \lVert Y_{:,j} \rVert_2`
  (:func:`relative_error`);
* relative improvement of SE over SparseGPT
  :math:`\mathrm{RI}_j = (e^{\mathrm{SGPT}}_j - e^{\mathrm{SE}}_j) / e^{\mathrm{SGPT}}_j`
  (:func:`relative_improvement`; the normalisation :math:`\lVert Y_{:,j} \rVert` cancels, so
  RI is the relative drop of the raw error norm), and its Spearman correlation with the
  neuron's WD (exact W1 of the z-scored dense outputs to N(0, 1)), compared with the
  correlation with the output mean and variance (the paper's claim: WD predicts RI better);
* :math:`W_1(\hat Y_{:,j}, Y_{:,j})`, the W1 distance between the sparse and dense output
  distributions in output units, and the same divided by the dense standard deviation
  :math:`\sigma_j` (equal to W1 after z-scoring both samples with the *dense* mean and std,
  since W1 is equivariant under a common affine map);
* cluster-size-weighted WD of the per-expert output distributions,
  :math:`\overline{\mathrm{WD}}_j = \sum_c \tfrac{n_c}{n}\,\mathrm{WD}(Y_{S_c, j})`, where
  :math:`S_c` are the held-out tokens routed to expert :math:`c` (:func:`weighted_expert_wd`),
  next to the neuron's own WD and to a control in which the tokens are split at random into
  groups of the same sizes (small samples have a larger W1 to N(0, 1) by chance alone);
* mapping difficulty (:func:`mapping_difficulty`): how far apart the neuron sends close inputs.

The run-folder workflow (model loading, input collection, tables, figures) is
:func:`wasserstein_neurons.workflows.disentangle.run_disentangle`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .capture import run_hooked
from .expansion import DEFAULT_KMEANS_RESTARTS, fit_router, prune_experts
from .pruning import PruneSpec, SparseGPTPruner
from .ranking import check_percent, count_for_percent
from .wasserstein import neuron_statistics, wasserstein_between, wasserstein_to_gaussian

__all__ = [
    "BASE_COLUMNS",
    "DEFAULT_EXPERTS",
    "PER_K_COLUMNS",
    "DisentangleResult",
    "NeuronOutputs",
    "check_layer",
    "collect_linear_inputs",
    "disentangle_linear",
    "linear_outputs",
    "mapping_difficulty",
    "prune_experts",
    "random_pairs",
    "resolve_experts",
    "resolve_role",
    "relative_error",
    "relative_improvement",
    "routed_outputs",
    "weighted_expert_wd",
]

#: Numbers of experts studied by default (``1`` is the SparseGPT baseline itself).
DEFAULT_EXPERTS = (1, 2, 4, 8, 16)

#: Per-neuron columns that do not depend on the number of experts.
BASE_COLUMNS = (
    "neuron",
    "wd",
    "mean",
    "variance",
    "std",
    "skew",
    "kurtosis",
    "constant",
    "wd_rank",
    "is_top",
    "mapping_difficulty",
    "err_sparsegpt",
    "w1_sparse_dense_sparsegpt",
    "w1z_sparse_dense_sparsegpt",
)

#: Per-neuron columns written once per number of experts ``K`` as ``{name}_k{K}``.
PER_K_COLUMNS = (
    "err_se",
    "ri",
    "w1_sparse_dense",
    "w1z_sparse_dense",
    "weighted_expert_wd",
    "weighted_random_wd",
)

_ROW_CHUNK = 8192  # tokens per matmul / error chunk
_SPEC_FIELDS = ("sparsity", "prunen", "prunem", "wbits")  # of the PruneSpec, in the summary


# ============================================================================================
# Small, independently testable pieces
# ============================================================================================


def check_layer(adapter, layer: int) -> int:
    """Validate a layer index against an architecture adapter.

    Parameters
    ----------
    adapter : ArchitectureAdapter
    layer : int

    Returns
    -------
    int
        ``layer``.

    Raises
    ------
    ValueError
        If ``layer`` is not an integer in ``[0, n_layers)``; the message gives the valid range.
    """
    n = adapter.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or not 0 <= layer < n:
        raise ValueError(
            f"layer {layer!r} is out of range: the model has {n} layers, valid layers are "
            f"0..{n - 1}"
        )
    return int(layer)


def resolve_role(adapter, role: str | None) -> str:
    """``role`` checked against the adapter (default: the first projection)."""
    role = adapter.first_role if role is None else role
    adapter.spec(role)  # raises a ValueError listing the valid roles
    return role


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def relative_error(y_sparse, y_dense, chunk: int = _ROW_CHUNK) -> np.ndarray:
    r"""Per-neuron relative reconstruction error.

    .. math::

        e_j = \frac{\lVert \hat Y_{:,j} - Y_{:,j} \rVert_2}{\lVert Y_{:,j} \rVert_2}
            = \sqrt{\frac{\sum_t (\hat y_{tj} - y_{tj})^2}{\sum_t y_{tj}^2}}

    Parameters
    ----------
    y_sparse, y_dense : np.ndarray or Tensor, shape ``[tokens, neurons]``
        Sparse and dense outputs of the same tokens. Sums are accumulated in float64, ``chunk``
        tokens at a time (no full-size temporary).
    chunk : int
        Tokens per step.

    Returns
    -------
    np.ndarray
        float64, shape ``[neurons]``; NaN where the dense column is identically zero.
    """
    ys, yd = _as_numpy(y_sparse), _as_numpy(y_dense)
    if ys.shape != yd.shape or ys.ndim != 2:
        raise ValueError(
            f"y_sparse and y_dense must both be [tokens, neurons], got {ys.shape} and {yd.shape}"
        )
    num = np.zeros(ys.shape[1])
    den = np.zeros(ys.shape[1])
    for i in range(0, ys.shape[0], chunk):
        d = yd[i : i + chunk].astype(np.float64)
        num += np.square(ys[i : i + chunk] - d).sum(0)
        den += np.square(d).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, np.sqrt(num / np.where(den > 0, den, 1.0)), np.nan)


def relative_improvement(err_baseline, err_new) -> np.ndarray:
    r"""Relative improvement of a method over a baseline, per neuron.

    .. math:: \mathrm{RI}_j = \frac{e^{\mathrm{base}}_j - e^{\mathrm{new}}_j}{e^{\mathrm{base}}_j}

    Positive when the new method reconstructs neuron :math:`j` better; 1 means perfect.

    Parameters
    ----------
    err_baseline, err_new : array-like, shape ``[neurons]``

    Returns
    -------
    np.ndarray
        float64, shape ``[neurons]``; NaN where the baseline error is 0 or NaN.
    """
    base = np.asarray(err_baseline, dtype=np.float64)
    new = np.asarray(err_new, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base > 0, (base - new) / np.where(base > 0, base, 1.0), np.nan)


def weighted_expert_wd(y, labels, n_clusters: int | None = None, min_tokens: int = 2) -> np.ndarray:
    r"""Cluster-size-weighted WD of the per-expert output distributions.

    .. math::

        \overline{\mathrm{WD}}_j = \frac{\sum_{c \in V_j} n_c\, \mathrm{WD}(Y_{S_c, j})}
                                        {\sum_{c \in V_j} n_c},

    with :math:`S_c` the tokens routed to cluster :math:`c`, :math:`n_c = |S_c|` and
    :math:`\mathrm{WD}` the exact W1 distance of the z-scored sample to N(0, 1)
    (:func:`~wasserstein_neurons.wasserstein.wasserstein_to_gaussian`). :math:`V_j` holds the
    clusters with at least ``min_tokens`` tokens on which neuron :math:`j` is not constant; when
    every cluster qualifies the weights are exactly :math:`n_c / n`. With one cluster this is the
    neuron's own WD.

    Parameters
    ----------
    y : np.ndarray or Tensor, shape ``[tokens, neurons]``
        Dense outputs.
    labels : array-like of int, shape ``[tokens]``
        Cluster (expert) of each token.
    n_clusters : int, optional
        Number of clusters (default ``labels.max() + 1``).
    min_tokens : int
        Clusters with fewer tokens are left out (W1 to N(0, 1) needs at least 2 values).

    Returns
    -------
    np.ndarray
        float64, shape ``[neurons]``; NaN where no cluster qualifies.
    """
    y = _as_numpy(y)
    labels = _as_numpy(labels).astype(np.int64).ravel()
    if y.ndim != 2 or labels.shape[0] != y.shape[0]:
        raise ValueError(
            f"need y [tokens, neurons] and labels [tokens], got {y.shape}, {labels.shape}"
        )
    k = int(labels.max()) + 1 if n_clusters is None else int(n_clusters)
    acc = np.zeros(y.shape[1])
    norm = np.zeros(y.shape[1])
    counts = np.bincount(labels, minlength=k)
    for c in range(k):
        if counts[c] < max(2, min_tokens):
            continue
        wd = wasserstein_to_gaussian(y[labels == c]).numpy()
        ok = np.isfinite(wd)
        acc[ok] += counts[c] * wd[ok]
        norm[ok] += counts[c]
    with np.errstate(invalid="ignore"):
        return np.where(norm > 0, acc / np.where(norm > 0, norm, 1.0), np.nan)


def random_pairs(n: int, n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random token pairs ``(a, b)`` with ``a != b``, drawn uniformly with replacement.

    Parameters
    ----------
    n : int
        Number of tokens (at least 2).
    n_pairs : int
        Number of pairs.
    seed : int
        Seed of ``np.random.default_rng``.

    Returns
    -------
    a, b : np.ndarray
        int64, shape ``[n_pairs]`` each.
    """
    if n < 2:
        raise ValueError(f"random pairs need at least 2 tokens, got {n}")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be at least 1, got {n_pairs}")
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, size=n_pairs)
    b = rng.integers(0, n - 1, size=n_pairs)
    b += b >= a  # uniform over the other n - 1 tokens
    return a, b


def mapping_difficulty(
    x,
    y,
    n_pairs: int = 32768,
    seed: int = 0,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    neuron_chunk: int = 256,
) -> np.ndarray:
    r"""How far apart a neuron maps close inputs: mean normalised output / input distance ratio.

    For random token pairs :math:`p = (a, b)` (:func:`random_pairs`) with input distance
    :math:`\Delta x_p = \lVert x_a - x_b \rVert_2` and output distance
    :math:`\Delta y_{pj} = |y_{aj} - y_{bj}|`,

    .. math::

        \mathrm{MD}_j = \frac{1}{|P|} \sum_{p \in P}
            \frac{\Delta y_{pj} / \operatorname{median}_{q \in P} \Delta y_{qj}}
                 {\Delta x_p / \max_{q \in P} \Delta x_q}.

    This is our reading of the paper's definition (ARCHITECTURE.md, "Science notes": the mean
    ratio of normalised output distance to normalised input distance over random token pairs,
    outputs scaled by the median :math:`|\Delta y|`, inputs by the max
    :math:`\lVert \Delta x \rVert`): the output scale is
    per neuron (so MD does not depend on the neuron's units or spread), the input scale is one
    number for the layer (so it rescales every neuron of the layer alike and does not change
    their ranking). A neuron with a large MD maps many close input pairs to output differences
    that are large relative to its typical one. Pairs with :math:`\Delta x_p = 0` (identical
    inputs, e.g. the same token at the start of two windows) are left out, since the ratio is
    undefined for them.

    Parameters
    ----------
    x : np.ndarray or Tensor, shape ``[tokens, d_in]``
        Inputs of the layer.
    y : np.ndarray or Tensor, shape ``[tokens, neurons]``
        Outputs of the neurons for the same tokens.
    n_pairs : int
        Number of random pairs (ignored when ``pairs`` is given).
    seed : int
        Seed of the pair draw.
    pairs : tuple of two int arrays ``[P]``, optional
        Explicit pairs ``(a, b)``.
    neuron_chunk : int
        Neurons processed at once (peak memory about ``P * neuron_chunk * 8`` bytes).

    Returns
    -------
    np.ndarray
        float64, shape ``[neurons]``; NaN for a neuron whose median :math:`\Delta y` is 0
        (e.g. a constant neuron).
    """
    x, y = _as_numpy(x), _as_numpy(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need x [tokens, d_in] and y [tokens, neurons], got {x.shape}, {y.shape}")
    a, b = random_pairs(x.shape[0], n_pairs, seed) if pairs is None else map(np.asarray, pairs)
    dx = np.linalg.norm(x[a].astype(np.float64) - x[b].astype(np.float64), axis=1)
    keep = dx > 0
    if not keep.any():
        return np.full(y.shape[1], np.nan)
    a, b, dx = a[keep], b[keep], dx[keep]
    dx_norm = dx / dx.max()  # [P] in (0, 1]
    out = np.empty(y.shape[1])
    for j0 in range(0, y.shape[1], neuron_chunk):
        j1 = min(j0 + neuron_chunk, y.shape[1])
        dy = np.abs(y[a, j0:j1].astype(np.float64) - y[b, j0:j1])  # [P, c]
        med = np.median(dy, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (dy / dx_norm[:, None]).mean(0)
            out[j0:j1] = np.where(med > 0, ratio / np.where(med > 0, med, 1.0), np.nan)
    return out


@torch.no_grad()
def linear_outputs(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, device=None, chunk: int = _ROW_CHUNK
) -> np.ndarray:
    r"""Outputs :math:`Y = X W^\top + b` of a linear layer, computed in row chunks.

    Parameters
    ----------
    x : Tensor, shape ``[tokens, d_in]``
    weight : Tensor, shape ``[d_out, d_in]``
    bias : Tensor, shape ``[d_out]``, optional
    device : torch.device or str, optional
        Where the products run (default ``weight``'s device).

    Returns
    -------
    np.ndarray
        float32, CPU, shape ``[tokens, d_out]``.
    """
    device = weight.device if device is None else torch.device(device)
    w = weight.to(device=device, dtype=torch.float32)
    b = None if bias is None else bias.to(device=device, dtype=torch.float32)
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    for i in range(0, x.shape[0], chunk):
        xi = x[i : i + chunk].to(device=device, dtype=torch.float32)
        yi = xi @ w.T if b is None else torch.addmm(b, xi, w.T)
        out[i : i + chunk] = yi.cpu().numpy()
    return out


@torch.no_grad()
def routed_outputs(
    x: Tensor,
    experts: Sequence[Tensor],
    labels: Tensor,
    bias: Tensor | None = None,
    device=None,
) -> np.ndarray:
    r"""Outputs of a mixture of experts with hard routing: :math:`y_t = W_{e(t)} x_t + b`.

    Parameters
    ----------
    x : Tensor, shape ``[tokens, d_in]``
    experts : sequence of ``k`` Tensors, shape ``[d_out, d_in]`` each
    labels : LongTensor, shape ``[tokens]``
        Expert of each token, in ``[0, k)``.
    bias : Tensor, shape ``[d_out]``, optional
        Shared by all experts.
    device : torch.device or str, optional

    Returns
    -------
    np.ndarray
        float32, CPU, shape ``[tokens, d_out]``.
    """
    labels = torch.as_tensor(labels).cpu().long()
    out = np.empty((x.shape[0], experts[0].shape[0]), dtype=np.float32)
    for c, w in enumerate(experts):
        idx = (labels == c).nonzero().flatten()
        if idx.numel():
            out[idx.numpy()] = linear_outputs(x[idx], w, bias, device=device)
    return out


@torch.no_grad()
def collect_linear_inputs(
    model,
    windows: Tensor,
    layer: int,
    role: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Tensor:
    """Inputs of one MLP linear for every token of ``windows``, via a TransformerLens hook.

    The hook ``adapter.input_hook_name(layer, role)`` (``blocks.{layer}.mlp.{gate|in|out}.hook_in``)
    sees the linear's input ``[batch, pos, d_in]``; the forward pass stops after ``layer``.

    Parameters
    ----------
    model : LoadedModel
    windows : LongTensor, shape ``[n_windows, seqlen]``
        Token ids (no BOS is added).
    layer : int
    role : str, optional
        ``"gate"``, ``"up"`` or ``"down"`` (default: ``adapter.first_role``).
    batch_size : int
        Windows per forward pass.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    Tensor
        float32, CPU, shape ``[n_windows * seqlen, d_in]``; row ``i * seqlen + p`` is window
        ``i``, position ``p``.
    """
    adapter = model.adapter
    layer = check_layer(adapter, layer)
    role = resolve_role(adapter, role)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [n_windows, seqlen], got {tuple(windows.shape)}")
    name = adapter.input_hook_name(layer, role)
    d_in = adapter.weight(model.hf_model, layer, role).shape[1]
    n_windows, seqlen = windows.shape
    out = torch.empty(n_windows * seqlen, d_in, dtype=torch.float32)
    pos = [0]

    def hook(act: Tensor, hook) -> None:
        flat = act.detach().reshape(-1, act.shape[-1])
        out[pos[0] : pos[0] + flat.shape[0]] = flat.to(device="cpu", dtype=torch.float32)
        pos[0] += flat.shape[0]

    run_hooked(
        model,
        windows,
        [(name, hook)],
        batch_size=batch_size,
        progress=progress,
        desc=f"inputs L{layer}",
    )
    if pos[0] != out.shape[0]:
        raise RuntimeError(f"hook {name} delivered {pos[0]} of {out.shape[0]} token inputs")
    return out


# ============================================================================================
# The analysis
# ============================================================================================


@dataclass
class NeuronOutputs:
    """Held-out outputs of a few neurons (the top-WD ones), for figures.

    Attributes
    ----------
    neurons : np.ndarray, int64, shape ``[P]``
        Neuron indices, highest WD first.
    wd : np.ndarray, shape ``[P]``
        Their WD.
    dense : np.ndarray, float32, shape ``[tokens, P]``
    sparsegpt : np.ndarray, float32, shape ``[tokens, P]``
    se : dict[int, np.ndarray]
        Number of experts ``k`` -> SE outputs ``[tokens, P]``.
    labels : dict[int, np.ndarray]
        ``k`` -> expert of every held-out token, int64 ``[tokens]``.
    """

    neurons: np.ndarray
    wd: np.ndarray
    dense: np.ndarray
    sparsegpt: np.ndarray
    se: dict[int, np.ndarray] = field(default_factory=dict)
    labels: dict[int, np.ndarray] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write everything to one ``.npz`` file (keys ``se_k{K}``, ``labels_k{K}``)."""
        arrays = dict(neurons=self.neurons, wd=self.wd, dense=self.dense, sparsegpt=self.sparsegpt)
        arrays.update({f"se_k{k}": v for k, v in self.se.items()})
        arrays.update({f"labels_k{k}": v for k, v in self.labels.items()})
        np.savez_compressed(path, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> NeuronOutputs:
        """Read a file written by :meth:`save`."""
        with np.load(path) as f:
            se = {int(k[4:]): f[k] for k in f.files if k.startswith("se_k")}
            labels = {int(k[8:]): f[k] for k in f.files if k.startswith("labels_k")}
            return cls(f["neurons"], f["wd"], f["dense"], f["sparsegpt"], se, labels)


@dataclass
class DisentangleResult:
    """What :func:`disentangle_linear` and
    :func:`~wasserstein_neurons.workflows.disentangle.run_disentangle` return.

    Attributes
    ----------
    table : pd.DataFrame
        One row per neuron: :data:`BASE_COLUMNS` plus ``{name}_k{K}`` for every ``name`` in
        :data:`PER_K_COLUMNS` and every number of experts ``K`` (and ``layer, hook`` from
        ``run_disentangle``).
    per_k : pd.DataFrame
        One row per ``K``: ``layer_err`` (Frobenius relative error of the whole layer), medians
        of the per-neuron metrics over all neurons and over the top-WD neurons, Spearman
        correlations of RI with WD / mean / variance / kurtosis, cluster sizes.
    summary : dict
        JSON-ready: settings, token counts, SparseGPT baseline, ``per_k`` as a list of dicts,
        mapping-difficulty correlations, timings.
    outputs : NeuronOutputs
        Held-out outputs of the plotted neurons.
    out : Path or None
        Run folder (``run_disentangle`` only).
    """

    table: pd.DataFrame
    per_k: pd.DataFrame
    summary: dict
    outputs: NeuronOutputs
    out: Path | None = None


def _spearman(a, b) -> tuple[float, float]:
    """Spearman ρ and p-value over the entries finite in both; NaN if undefined."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan"), float("nan")
    res = spearmanr(a[ok], b[ok])
    return float(res.statistic), float(res.pvalue)


def _median(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


def _medians(top: np.ndarray, **values: np.ndarray) -> dict[str, float]:
    """``median_{name}_top`` and ``median_{name}_all`` (finite entries) of every ``name=values``."""
    out = {}
    for name, v in values.items():
        out[f"median_{name}_top"] = _median(v[top])
        out[f"median_{name}_all"] = _median(v)
    return out


def _frobenius_error(y_sparse: np.ndarray, y_dense: np.ndarray) -> float:
    num = den = 0.0
    for i in range(0, y_dense.shape[0], _ROW_CHUNK):
        d = y_dense[i : i + _ROW_CHUNK].astype(np.float64)
        num += float(np.square(y_sparse[i : i + _ROW_CHUNK] - d).sum())
        den += float(np.square(d).sum())
    return math.sqrt(num / den) if den > 0 else float("nan")


def resolve_experts(experts) -> list[int]:
    """Sorted unique numbers of experts from ``"1,2,4"`` or a sequence; ValueError if not >= 1."""
    if isinstance(experts, str):
        experts = [e for e in experts.replace(" ", "").split(",") if e]
    try:
        values = sorted({int(e) for e in experts})
    except (TypeError, ValueError):
        raise ValueError(f"experts must be positive integers, got {experts!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"experts must be positive integers, got {experts!r}")
    return values


@torch.no_grad()
def disentangle_linear(
    x_cal: Tensor,
    x_eval: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    experts: Sequence[int] | str = DEFAULT_EXPERTS,
    spec: PruneSpec | None = None,
    pca_factor: int | None = 32,
    kmeans_restarts: int = DEFAULT_KMEANS_RESTARTS,
    seed: int = 0,
    top_percent: float = 3.0,
    plot_neurons: int = 4,
    mapping_pairs: int = 32768,
    device=None,
    progress: bool = False,
) -> DisentangleResult:
    r"""Compare dense, SparseGPT and Sparse Expansion outputs of one linear, neuron by neuron.

    Parameters
    ----------
    x_cal : Tensor, shape ``[N, d_in]``
        Calibration inputs of the layer (Hessians and router). Any float dtype; kept on CPU.
    x_eval : Tensor, shape ``[M, d_in]``
        Held-out inputs on which every metric is measured.
    weight : Tensor, shape ``[d_out, d_in]``
        Dense weight (``nn.Linear`` layout; not modified).
    bias : Tensor, shape ``[d_out]``, optional
        Shared by every sparse version (pruning leaves it untouched).
    experts : sequence of int or comma-separated str
        Numbers of experts ``K`` to study. ``K = 1`` is SparseGPT itself: its columns reuse the
        baseline (so ``ri_k1`` is exactly 0), a built-in control.
    spec : PruneSpec, optional
        Sparsity pattern of every sparse copy (default ``PruneSpec(sparsity=0.9)``, the
        paper's setting for this analysis).
    pca_factor : int or None
        Router PCA dimension ``d_in // pca_factor`` (paper: 32; ``None``/0: no PCA).
    kmeans_restarts : int
        k-means++ restarts of each router (paper: 100; the builder's
        :data:`~wasserstein_neurons.expansion.DEFAULT_KMEANS_RESTARTS` by default).
    seed : int
        Seed of the routers, the random partition control and the mapping-difficulty pairs.
    top_percent : float
        Wasserstein neurons = the top ``top_percent``% by WD (paper: 3).
    plot_neurons : int
        Keep the held-out outputs of this many top-WD neurons for figures.
    mapping_pairs : int
        Random token pairs for :func:`mapping_difficulty`.
    device : torch.device or str, optional
        Where matmuls, Hessians, routers and pruning run (default ``weight``'s device).
    progress : bool
        Show a tqdm bar over the numbers of experts.

    Returns
    -------
    DisentangleResult

    Notes
    -----
    Memory: the inputs, the dense outputs ``[M, d_out]`` and one sparse output ``[M, d_out]``
    (float32) at a time; the SE outputs of each ``K`` are dropped after its metrics are taken,
    except the columns of the plotted neurons.
    """
    t_start = time.perf_counter()
    ks = resolve_experts(experts)
    spec = PruneSpec(sparsity=0.9) if spec is None else spec
    check_percent(top_percent)
    router_kw = dict(pca_factor=pca_factor, restarts=kmeans_restarts, seed=seed)
    study = _Study(x_cal, x_eval, weight, bias, device, spec, seed, router_kw)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    study.dense_step(top_percent, plot_neurons)
    seconds["dense"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    study.table["mapping_difficulty"] = mapping_difficulty(
        study.x_eval.numpy(), study.y, n_pairs=mapping_pairs, seed=seed
    )
    seconds["mapping_difficulty"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    study.sparsegpt_step()
    seconds["sparsegpt"] = time.perf_counter() - t0

    per_k_rows = []
    for k in tqdm(ks, desc="experts", disable=not progress):
        t0 = time.perf_counter()
        row = study.experts_step(k)
        row["seconds"] = time.perf_counter() - t0
        per_k_rows.append(row)
        seconds[f"experts_{k}"] = row["seconds"]
    per_k = pd.DataFrame(per_k_rows)

    md_corr = _spearman(study.table["mapping_difficulty"].to_numpy(), study.wd)
    seconds["total"] = time.perf_counter() - t_start
    summary = study.summary(ks, top_percent, mapping_pairs, md_corr)
    summary.update({"per_k": per_k.to_dict(orient="records"), "seconds": seconds})
    return DisentangleResult(table=study.table, per_k=per_k, summary=summary, outputs=study.outputs)


# --------------------------------------------------------------------------------------------
# Steps of disentangle_linear
# --------------------------------------------------------------------------------------------


@dataclass
class _Sparse:
    r"""How one sparse version reconstructs the dense outputs on the held-out tokens.

    ``err`` (:func:`relative_error`), ``w1`` (:math:`W_1(\hat Y_{:,j}, Y_{:,j})`) and ``w1z``
    (``w1`` over the dense std) are ``[d_out]``; ``layer_err`` is the Frobenius relative error
    of the whole layer and ``plot`` ``[M, P]`` the sparse outputs of the plotted neurons.
    """

    err: np.ndarray
    w1: np.ndarray
    w1z: np.ndarray
    layer_err: float
    plot: np.ndarray


class _Study:
    """The state of one :func:`disentangle_linear` call; its methods are the analysis steps.

    Attributes
    ----------
    x_cal, x_eval : Tensor, float32, CPU, shape ``[N, d_in]`` / ``[M, d_in]``
    w : Tensor, float32, shape ``[d_out, d_in]``, on ``device``
    b : Tensor, float32, shape ``[d_out]``, on ``device``, or None
    y, std, wd : dense held-out outputs ``[M, d_out]`` and their per-neuron std and WD
        ``[d_out]`` (from :meth:`dense_step`)
    table : pd.DataFrame
        The per-neuron table, one column group added per step.
    order, top, plot_idx : neurons by decreasing WD (non-finite last) ``[d_out]``, the
        Wasserstein-neuron mask ``[d_out]`` and the plotted neurons ``[P]``
    full, base : the SparseGPT pruner of all calibration tokens (its Hessian ``H`` replaces the
        one of an empty cluster) and the baseline's :class:`_Sparse` (from :meth:`sparsegpt_step`)
    outputs : NeuronOutputs
    """

    def __init__(self, x_cal, x_eval, weight, bias, device, spec, seed, router_kw):
        if x_cal.ndim != 2 or x_eval.ndim != 2 or weight.ndim != 2:
            raise ValueError("x_cal, x_eval must be [tokens, d_in] and weight [d_out, d_in]")
        d_in = weight.shape[1]
        if x_cal.shape[1] != d_in or x_eval.shape[1] != d_in:
            raise ValueError(
                f"input widths {x_cal.shape[1]} / {x_eval.shape[1]} do not match the weight's "
                f"d_in={d_in}"
            )
        if x_eval.shape[0] < 2:
            raise ValueError("need at least 2 held-out tokens")
        self.device = weight.device if device is None else torch.device(device)
        self.x_cal = x_cal.detach().to(device="cpu", dtype=torch.float32)
        self.x_eval = x_eval.detach().to(device="cpu", dtype=torch.float32)
        self.w = weight.detach().to(device=self.device, dtype=torch.float32)
        self.b = None if bias is None else bias.detach().to(device=self.device, dtype=torch.float32)
        self.spec, self.seed, self.router_kw = spec, seed, router_kw

    def dense_step(self, top_percent: float, plot_neurons: int) -> None:
        """Dense outputs, their statistics, the WD ranking and the top / plotted neurons."""
        self.y = linear_outputs(self.x_eval, self.w, self.b, device=self.device)
        stats = neuron_statistics(self.y)
        wd = self.wd = stats["wd"]
        self.std = stats["std"]
        d_out = self.y.shape[1]
        n_top = count_for_percent(d_out, top_percent)
        order = self.order = np.argsort(np.where(np.isfinite(wd), -wd, np.inf), kind="stable")
        wd_rank = np.empty(d_out, dtype=np.int64)
        wd_rank[order] = np.arange(d_out)
        is_top = (wd_rank < n_top) & np.isfinite(wd)
        plot_idx = order[: min(plot_neurons, d_out)]
        self.plot_idx = plot_idx[np.isfinite(wd[plot_idx])]
        columns = {"neuron": np.arange(d_out), "wd": wd, "mean": stats["mean"]}
        columns["variance"] = stats["std"] ** 2
        columns.update({name: stats[name] for name in ("std", "skew", "kurtosis", "constant")})
        self.table = pd.DataFrame({**columns, "wd_rank": wd_rank, "is_top": is_top})
        self.top = is_top

    def compare(self, y_sparse: np.ndarray) -> _Sparse:
        """Per-neuron and layer reconstruction errors of ``y_sparse`` ``[M, d_out]``."""
        w1 = wasserstein_between(self.y, y_sparse).numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            w1z = np.where(self.std > 0, w1 / self.std, np.nan)
        return _Sparse(
            err=relative_error(y_sparse, self.y),
            w1=w1,
            w1z=w1z,
            layer_err=_frobenius_error(y_sparse, self.y),
            plot=np.ascontiguousarray(y_sparse[:, self.plot_idx]),
        )

    def sparsegpt_step(self) -> None:
        """SparseGPT with the Hessian of all calibration tokens: its columns and outputs."""
        self.full = SparseGPTPruner(self.w.shape[1], device=self.device)
        for i in range(0, self.x_cal.shape[0], _ROW_CHUNK):
            self.full.add_batch(self.x_cal[i : i + _ROW_CHUNK])
        w_sgpt = self.full.prune(self.w, self.spec).weight
        base = self.base = self.compare(linear_outputs(self.x_eval, w_sgpt, self.b, self.device))
        self.table["err_sparsegpt"] = base.err
        self.table["w1_sparse_dense_sparsegpt"] = base.w1
        self.table["w1z_sparse_dense_sparsegpt"] = base.w1z
        self.outputs = NeuronOutputs(
            neurons=self.plot_idx.astype(np.int64),
            wd=self.wd[self.plot_idx],
            dense=np.ascontiguousarray(self.y[:, self.plot_idx]),
            sparsegpt=base.plot,
        )

    def fit_experts(self, k: int) -> tuple[np.ndarray, list[int], np.ndarray]:
        """Sparse Expansion with ``k > 1`` experts: router, per-cluster SparseGPT, outputs.

        Returns the expert of every held-out token (int64 ``[M]``), the calibration tokens per
        cluster and the SE outputs ``[M, d_out]``.
        """
        x, dev = self.x_cal, self.device
        router = fit_router(x, k, device=dev, **self.router_kw)
        experts_w, cal_counts = prune_experts(
            self.w, x, router.route(x).cpu(), k, self.spec, full_hessian=self.full.H, device=dev
        )
        labels = router.route(self.x_eval).cpu().numpy().astype(np.int64)
        y_sparse = routed_outputs(self.x_eval, experts_w, torch.from_numpy(labels), self.b, dev)
        return labels, cal_counts, y_sparse

    def experts_step(self, k: int) -> dict:
        """``k`` experts: their :data:`PER_K_COLUMNS` and outputs; returns their ``per_k`` row.

        ``k = 1`` is the SparseGPT baseline itself. The random-partition control shuffles the
        held-out labels with ``np.random.default_rng([seed, k])``.
        """
        if k == 1:
            labels = np.zeros(self.x_eval.shape[0], dtype=np.int64)
            cal_counts, se = [self.x_cal.shape[0]], self.base
            self.outputs.se[k] = self.outputs.sparsegpt.copy()
        else:
            labels, cal_counts, y_sparse = self.fit_experts(k)
            se = self.compare(y_sparse)
            del y_sparse
            self.outputs.se[k] = se.plot
        self.outputs.labels[k] = labels
        ri = relative_improvement(self.base.err, se.err)
        wexp = weighted_expert_wd(self.y, labels, k)
        shuffled = np.random.default_rng([self.seed, k]).permutation(labels)
        wrand = weighted_expert_wd(self.y, shuffled, k)
        for name, v in zip(PER_K_COLUMNS, (se.err, ri, se.w1, se.w1z, wexp, wrand), strict=True):
            self.table[f"{name}_k{k}"] = v
        eval_counts = np.bincount(labels, minlength=k)
        return self.per_k_row(k, se, ri, wexp, wrand, cal_counts, eval_counts)

    def errors(self, se: _Sparse) -> dict:
        """Layer error and median per-neuron error (all and top neurons) of a sparse version."""
        top_err = _median(se.err[self.top])
        return {"layer_err": se.layer_err, "median_err": _median(se.err), "median_err_top": top_err}

    def per_k_row(self, k, se: _Sparse, ri, wexp, wrand, cal_counts, eval_counts) -> dict:
        """The ``per_k`` row of ``k`` experts, without its ``seconds``.

        ``ri``, ``wexp``, ``wrand`` ``[d_out]``: RI over SparseGPT and the weighted expert /
        random-partition WD; ``cal_counts``, ``eval_counts`` ``[k]``: tokens per cluster.
        """
        top = self.top
        row = {
            "experts": k,
            **self.errors(se),
            "median_ri": _median(ri),
            "median_ri_top": _median(ri[top]),
            "frac_ri_positive": float(np.mean(ri[np.isfinite(ri)] > 0)) if k > 1 else 0.0,
        }
        for other in ("wd", "mean", "variance", "kurtosis"):
            rho, p = _spearman(ri, self.table[other]) if k > 1 else (float("nan"),) * 2
            row[f"spearman_ri_{other}"] = rho
            row[f"pvalue_ri_{other}"] = p
        row.update(_medians(top, w1=se.w1, w1z=se.w1z, weighted_wd=wexp, weighted_random_wd=wrand))
        row["min_cluster_calibration_tokens"] = int(min(cal_counts))
        row["max_cluster_calibration_tokens"] = int(max(cal_counts))
        row["min_cluster_eval_tokens"] = int(eval_counts.min())
        row["max_cluster_eval_tokens"] = int(eval_counts.max())
        return row

    def summary(self, ks, top_percent: float, mapping_pairs: int, md_corr) -> dict:
        """The JSON-ready summary, up to its ``per_k`` rows and ``seconds``."""
        top, wd, base = self.top, self.wd, self.base
        md = self.table["mapping_difficulty"].to_numpy()
        n_top = int(top.sum())
        d_out, d_in = self.w.shape
        return {
            "n_calibration_tokens": int(self.x_cal.shape[0]),
            "n_eval_tokens": int(self.x_eval.shape[0]),
            "d_in": int(d_in),
            "d_out": int(d_out),
            "experts": ks,
            "spec": {name: getattr(self.spec, name) for name in _SPEC_FIELDS},
            "top_percent": float(top_percent),
            "n_top": n_top,
            "top_neurons": self.order[:n_top].tolist(),
            **_medians(top, wd=wd),
            "sparsegpt": {**self.errors(base), **_medians(top, w1=base.w1)},
            "mapping_difficulty": {
                "pairs": int(mapping_pairs),
                "median_top": _median(md[top]),
                "median_all": _median(md),
                "spearman_md_wd": md_corr[0],
                "pvalue_md_wd": md_corr[1],
            },
        }
