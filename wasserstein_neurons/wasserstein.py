r"""Wasserstein-1 distance between neuron output distributions and a Gaussian.

A *neuron* is one column of an activation matrix ``activations[tokens, neurons]`` (for the
paper: the pre-activation of one output channel of an MLP's first projection, over tokens).
Its Wasserstein distance to a Gaussian (WD) is

.. math::

    \mathrm{WD}_j = W_1\big(\hat P_j,\ \mathcal N(0, 1)\big)
                  = \int_0^1 \big|F_{n,j}^{-1}(u) - \Phi^{-1}(u)\big|\,du,

where :math:`\hat P_j` is the empirical distribution of the z-scored outputs
:math:`z_t = (y_t - \bar y) / \sigma`, :math:`F_{n,j}^{-1}` its quantile function (a step
function) and :math:`\Phi` the standard normal CDF.

**Standardisation.** :math:`\sigma` is the *population* standard deviation
(``ddof=0``), so that the z-scored sample has exactly mean 0 and variance 1, the first two
moments of the reference N(0, 1). Using ``ddof=1`` instead rescales ``z`` by
:math:`\sqrt{(n-1)/n}` and changes WD by at most :math:`\approx 0.8 / (2n)`.
A constant neuron (zero variance) cannot be z-scored; its WD is NaN.

**Exact closed form** (``method="exact"``, the default). Split :math:`[0, 1]` into the ``n``
pieces :math:`[(i-1)/n, i/n]` on which the empirical quantile equals the order statistic
:math:`x_{(i)}` and substitute :math:`u = \Phi(t)`:

.. math::

    W_1 = \sum_{i=1}^n \int_{a_i}^{b_i} |x_{(i)} - t|\,\varphi(t)\,dt,
    \qquad a_i = \Phi^{-1}\!\big(\tfrac{i-1}{n}\big),\ b_i = \Phi^{-1}\!\big(\tfrac{i}{n}\big),

which integrates to (with :math:`c_i = \mathrm{clip}(x_{(i)}, a_i, b_i)` and
:math:`\varphi(\pm\infty) = 0`)

.. math::

    W_1 = \sum_i \Big[ 2\big(x_{(i)}\Phi(c_i) + \varphi(c_i)\big)
          - x_{(i)}\tfrac{2i-1}{n} - \varphi(a_i) - \varphi(b_i) \Big].

When :math:`x_{(i)} \notin (a_i, b_i)` the ``i``-th term equals :math:`|x_{(i)} - \mu_i| / n`
with :math:`\mu_i = n\,(\varphi(a_i) - \varphi(b_i))` the mean of N(0, 1) restricted to the
piece. The implementation therefore computes :math:`\frac1n\sum_i |z_{(i)} - \mu_i|` in one
vectorised float64 pass and adds the (non-negative) exact correction only on the few elements
where the empirical quantile function crosses the Gaussian one. ``a_i, b_i, mu_i`` depend only
on ``n`` and are cached (:func:`gaussian_quantile_pieces`). Because z-scoring is a positive
affine map, the raw values are sorted (in their float32/float64 precision, which is exact) and
standardised afterwards. The sort is the cost floor: ``O(n log n)`` per neuron. float16 inputs
(the default activation store) are sorted as int16 keys whose integer order is the float order,
which numpy sorts with a radix sort, about 5x faster than a float sort on CPUs where numpy has
no SIMD sort; the results are identical.

**Sample estimate** (``method="sample"``, the paper's estimator): ``W1`` between the z-scored
sample and ``n`` i.i.d. N(0, 1) draws ``g`` from ``np.random.default_rng(seed)``; the *same*
``g`` is used for every neuron. For equal sample sizes
``scipy.stats.wasserstein_distance(z, g) == mean(|sort(z) - sort(g)|)``, which is what is
computed (vectorised). ``method="pot"`` computes the same quantity with
``ot.wasserstein_1d`` (Python Optimal Transport).

Large inputs (``np.memmap`` on disk, float16, larger than RAM) are processed in blocks of
neuron columns; each block is copied to a contiguous float16 / float32 (float64 for
float64/integer inputs) array, so peak memory is about
``num_threads * tokens * neuron_chunk * 4`` bytes plus cache-sized temporaries, never
``tokens * neurons``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import ndtr, ndtri

__all__ = [
    "METHODS",
    "GaussianQuantilePieces",
    "constant_neurons",
    "gaussian_quantile_pieces",
    "neuron_statistics",
    "wasserstein_between",
    "wasserstein_to_gaussian",
]

#: Valid values of ``method`` for :func:`wasserstein_to_gaussian`.
METHODS = ("exact", "sample", "pot")

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Columns sorted together (np.sort along axis 0 of an [n, 64] contiguous block is ~3x faster
# than along axis 0 of a wide array: the per-column gather stays in cache).
_SORT_COLS = 64
# Target number of float64 elements of the per-row-block temporaries (~1 MiB, L2-sized).
_ROW_BLOCK_ELEMS = 1 << 17
# Default size of one block read from an np.memmap, in elements (16 Mi values).
_MEMMAP_BLOCK_ELEMS = 1 << 24


def _phi(x: np.ndarray) -> np.ndarray:
    """Standard normal density; exactly 0 at +-inf."""
    return np.exp(-0.5 * x * x) * _INV_SQRT_2PI


@dataclass(frozen=True)
class GaussianQuantilePieces:
    r"""The ``n`` quantile pieces of N(0, 1) (all arrays ``[n]``, float64, read-only).

    Piece ``i`` (1-based) is :math:`[a_i, b_i] = [\Phi^{-1}((i-1)/n), \Phi^{-1}(i/n)]`, so
    ``a[0] = -inf`` and ``b[-1] = +inf``.

    Attributes
    ----------
    n : int
        Number of pieces (sample size).
    a, b : np.ndarray
        Lower and upper edges.
    phi_a, phi_b : np.ndarray
        :math:`\varphi(a_i)`, :math:`\varphi(b_i)` (0 at the infinite edges).
    mu : np.ndarray
        :math:`\mu_i = n(\varphi(a_i) - \varphi(b_i))`, the mean of N(0, 1) restricted to
        piece ``i`` (the conditional mean).
    reach : np.ndarray
        :math:`\max(\mu_i - a_i, b_i - \mu_i)` (``inf`` for the two tail pieces):
        ``|z - mu_i| < reach_i`` is necessary for ``a_i < z < b_i``.
    mid_weight : np.ndarray
        :math:`\Phi(a_i) + \Phi(b_i) = (2i - 1) / n`.
    """

    n: int
    a: np.ndarray
    b: np.ndarray
    phi_a: np.ndarray
    phi_b: np.ndarray
    mu: np.ndarray
    reach: np.ndarray
    mid_weight: np.ndarray


@functools.lru_cache(maxsize=8)
def gaussian_quantile_pieces(n: int) -> GaussianQuantilePieces:
    """Edges, densities and conditional means of the ``n`` equal-mass pieces of N(0, 1).

    Parameters
    ----------
    n : int
        Sample size (``>= 1``).

    Returns
    -------
    GaussianQuantilePieces
        Cached per ``n``; the arrays are read-only.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    edges = ndtri(np.arange(n + 1, dtype=np.float64) / n)  # [n + 1], -inf ... +inf
    phi_e = _phi(edges)
    phi_e[0] = phi_e[-1] = 0.0
    a, b = edges[:-1], edges[1:]
    mu = n * (phi_e[:-1] - phi_e[1:])
    arrays = {
        "a": a.copy(),
        "b": b.copy(),
        "phi_a": phi_e[:-1].copy(),
        "phi_b": phi_e[1:].copy(),
        "mu": mu,
        "reach": np.maximum(mu - a, b - mu),
        "mid_weight": (2.0 * np.arange(1, n + 1, dtype=np.float64) - 1.0) / n,
    }
    for arr in arrays.values():
        arr.setflags(write=False)
    return GaussianQuantilePieces(n=n, **arrays)


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _as_source(activations: Any, *, min_tokens: int = 2, name: str = "activations") -> Any:
    """Validate a ``[tokens, neurons]`` input; return a torch tensor or numpy array (no copy)."""
    if isinstance(activations, torch.Tensor):
        src = activations.detach()
        if src.is_complex() or src.dtype == torch.bool:
            raise ValueError(f"{name} must be real-valued, got dtype {src.dtype}")
    else:
        src = activations if isinstance(activations, np.ndarray) else np.asarray(activations)
        if not (np.issubdtype(src.dtype, np.floating) or np.issubdtype(src.dtype, np.integer)):
            raise ValueError(f"{name} must be a real numeric array, got dtype {src.dtype}")
    if src.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D [tokens, neurons], got shape {tuple(src.shape)} "
            f"({src.ndim}-D); reshape e.g. [batch, seq, neurons] to [-1, neurons]"
        )
    if src.shape[0] < min_tokens:
        raise ValueError(
            f"{name} needs at least {min_tokens} tokens (rows) to define a distribution, "
            f"got shape {tuple(src.shape)}"
        )
    return src


def _work_dtype(src: Any) -> np.dtype:
    """Dtype of the blocks that are sorted: float64 for float64/integer inputs, float16 for
    float16 inputs (sorted through int16 keys, see :func:`_sort_columns`, then widened), else
    float32 (exact for bfloat16)."""
    if isinstance(src, torch.Tensor):
        if src.dtype == torch.float16:
            return np.dtype(np.float16)
        wide = src.dtype in (torch.float64,) or not src.dtype.is_floating_point
    else:
        if src.dtype == np.float16:
            return np.dtype(np.float16)
        wide = src.dtype == np.float64 or np.issubdtype(src.dtype, np.integer)
        wide = wide or (np.issubdtype(src.dtype, np.floating) and src.dtype.itemsize > 8)
    return np.dtype(np.float64 if wide else np.float32)


_TORCH_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}


def _as_rows(rows: Any, n_tokens: int) -> np.ndarray | None:
    """Validate a row selection: ``None``, int indices ``[k]`` or a bool mask ``[n_tokens]``;
    returns int64 indices (or ``None``: every row)."""
    if rows is None:
        return None
    rows = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n_tokens,):
            raise ValueError(f"a bool rows mask must have shape ({n_tokens},), got {rows.shape}")
        return np.flatnonzero(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be 1-D integer indices or a bool mask, got {rows.dtype}")
    if len(rows) and (rows.min() < 0 or rows.max() >= n_tokens):
        raise ValueError(f"rows must index the {n_tokens} tokens, got {rows.min()}..{rows.max()}")
    return rows.astype(np.int64, copy=False)


def _selected_shape(src: Any, rows: Any) -> tuple[np.ndarray | None, int, int]:
    """``(rows, tokens kept, neurons)`` of a validated source; at least 2 tokens kept."""
    n, n_neurons = (int(s) for s in src.shape)
    rows = _as_rows(rows, n)
    if rows is not None and len(rows) < 2:
        raise ValueError(f"rows keeps {len(rows)} token(s); a distribution needs at least 2")
    return rows, (n if rows is None else len(rows)), n_neurons


def _read_block(src: Any, j0: int, j1: int, dtype: np.dtype, rows=None) -> np.ndarray:
    """Contiguous ``[tokens, j1 - j0]`` copy of columns ``j0:j1`` in ``dtype`` (owned, writable);
    with ``rows`` (int64 indices) only those tokens, read one column block at a time."""
    if isinstance(src, torch.Tensor):
        blk = src[:, j0:j1] if rows is None else src[:, j0:j1][torch.from_numpy(rows)]
        blk = blk.to(device="cpu", dtype=_TORCH_DTYPES[np.dtype(dtype)])
        return np.array(blk.numpy(), dtype=dtype, order="C", copy=True)
    if rows is not None:
        return np.ascontiguousarray(src[:, j0:j1][rows], dtype=dtype)
    return np.array(src[:, j0:j1], dtype=dtype, order="C", copy=True)


def _flip_negative_keys(keys: np.ndarray) -> None:
    """In place, map the int16 bit patterns of float16 values to keys whose signed-integer order
    is the float order (flip the 15 magnitude bits of negative values); its own inverse."""
    keys ^= (keys >> 15) & np.int16(0x7FFF)


def _sort_columns(xs: np.ndarray) -> np.ndarray:
    """Sort a contiguous ``[n, c]`` block along axis 0 in place; return it, float16 widened.

    float16 blocks are sorted as int16 keys with numpy's stable sort, which is a radix sort
    for 16-bit integers: measured 5x faster than quicksort of the same float16 or float32
    block on a 2-core CPU without SIMD sorting.  NaNs are made positive first, so that they
    sort last as with ``np.sort``.  The result is then widened to float32 (exact).
    """
    if xs.dtype != np.float16:
        xs.sort(axis=0)
        return xs
    nan = np.isnan(xs)
    if nan.any():
        xs[nan] = np.float16(np.nan)
    keys = xs.view(np.int16)
    _flip_negative_keys(keys)
    keys.sort(axis=0, kind="stable")
    _flip_negative_keys(keys)
    return xs.astype(np.float32)


def _default_threads(num_threads: int | None) -> int:
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        return int(num_threads)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _default_chunk(src: Any, n_tokens: int, neuron_chunk: int | None) -> int:
    if neuron_chunk is not None:
        if neuron_chunk < 1:
            raise ValueError(f"neuron_chunk must be >= 1, got {neuron_chunk}")
        return int(neuron_chunk)
    if isinstance(src, np.memmap):
        # few, large reads of a disk-backed array: ~16 Mi values (64 MiB float32) per block
        return max(1, min(1024, _MEMMAP_BLOCK_ELEMS // max(n_tokens, 1)))
    return _SORT_COLS


def _map_blocks(
    fn: Callable[[int, int], dict[str, np.ndarray]],
    n_neurons: int,
    chunk: int,
    num_threads: int,
) -> dict[str, np.ndarray]:
    """Apply ``fn(j0, j1)`` over column blocks (in threads) and concatenate the results."""
    bounds = [(j0, min(j0 + chunk, n_neurons)) for j0 in range(0, n_neurons, chunk)]
    if not bounds:
        return {}
    if num_threads == 1 or len(bounds) == 1:
        parts = [fn(j0, j1) for j0, j1 in bounds]
    else:
        with ThreadPoolExecutor(max_workers=min(num_threads, len(bounds))) as pool:
            parts = list(pool.map(lambda b: fn(*b), bounds))
    return _concat(parts)


# --------------------------------------------------------------------------------------------
# numpy kernels on a sorted block xs: [n, c] (contiguous, sorted along axis 0)
# --------------------------------------------------------------------------------------------


def _colsum(y: np.ndarray) -> np.ndarray:
    """Column sums of a ``[rows, c]`` float64 block. ``einsum`` is ~1.3x faster than
    ``sum(axis=0)``; a BLAS ``ones @ y`` is faster still single-threaded but serialises the
    worker threads (OpenBLAS's own threading), so it is avoided."""
    return np.einsum("ij->j", y)


def _row_step(c: int) -> int:
    return max(64, _ROW_BLOCK_ELEMS // max(c, 1))


def _sorted_moments(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, population std (ddof=0) and constant flag of each column of a sorted block.

    Shifted by the column median (``|mean - median| <= std``), the one-pass variance
    ``E[(x - p)^2] - E[x - p]^2`` suffers no cancellation. float64 accumulation.
    """
    n, c = xs.shape
    pivot = xs[n // 2].astype(np.float64)
    s1 = np.zeros(c)
    s2 = np.zeros(c)
    step = _row_step(c)
    buf = np.empty((min(step, n), c))
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        y = buf[: r1 - r0]
        np.subtract(xs[r0:r1], pivot, out=y)
        s1 += _colsum(y)
        np.multiply(y, y, out=y)
        s2 += _colsum(y)
    m1 = s1 / n
    var = np.maximum(s2 / n - m1 * m1, 0.0)
    constant = xs[0] == xs[-1]
    return pivot + m1, np.sqrt(var), constant


def _standardized_pass(
    xs: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    constant: np.ndarray,
    ref: np.ndarray,
    pieces: GaussianQuantilePieces | None,
    higher: bool,
) -> dict[str, np.ndarray]:
    r"""One pass over ``z = (xs - mean) / std`` (float64, row blocks).

    Returns ``l1 = mean_i |z_(i) - ref_i|`` (plus, if ``pieces`` is given, the exact correction
    on the elements with ``a_i < z_(i) < b_i`` so that ``l1`` is the exact W1 to N(0, 1)), and
    if ``higher`` the raw moments ``m2, m3, m4`` of ``z``.
    """
    n, c = xs.shape
    inv_std = np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, std))
    step = _row_step(c)
    rows = min(step, n)
    buf = np.empty((rows, c))
    mask = np.empty((rows, c), dtype=bool) if pieces is not None else None
    tmp = np.empty((rows, c)) if higher else None
    l1 = np.zeros(c)
    corr = np.zeros(c)
    m2 = np.zeros(c)
    m3 = np.zeros(c)
    m4 = np.zeros(c)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        z = buf[: r1 - r0]
        np.subtract(xs[r0:r1], mean, out=z)
        np.multiply(z, inv_std, out=z)
        if higher:
            _add_moments(z, tmp[: r1 - r0], m2, m3, m4)
        np.subtract(z, ref[r0:r1, None], out=z)
        np.abs(z, out=z)  # z now holds d = |z - ref|
        l1 += _colsum(z)
        if pieces is None:
            continue
        corr += _crossing_correction(z, xs, r0, mean, inv_std, pieces, mask[: r1 - r0])
    out = {"l1": l1 / n + corr}
    if higher:
        out.update(m2=m2 / n, m3=m3 / n, m4=m4 / n)
    for v in out.values():
        v[constant] = np.nan
    return out


def _add_moments(z: np.ndarray, t: np.ndarray, m2, m3, m4) -> None:
    """Add the column sums of ``z**2``, ``z**3``, ``z**4`` (block ``[rows, c]``) to
    ``m2, m3, m4`` in place; ``t`` is scratch of ``z``'s shape."""
    np.multiply(z, z, out=t)
    m2 += _colsum(t)
    np.multiply(t, t, out=t)
    m4 += _colsum(t)
    np.multiply(z, z, out=t)
    np.multiply(t, z, out=t)
    m3 += _colsum(t)


def _crossing_correction(
    d: np.ndarray,
    xs: np.ndarray,
    r0: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    pieces: GaussianQuantilePieces,
    mk: np.ndarray,
) -> np.ndarray:
    r"""Per-column correction ``[c]`` from ``|z_(i) - \mu_i| / n`` to the exact W1 term, for the
    elements of the row block ``d = |z - ref|`` (rows ``r0 ..``) that may cross their piece.

    Candidates: ``|z - mu_i| < reach_i`` is necessary for ``a_i < z < b_i``; the exact formula
    is correct for every element, so a superset of the crossing elements is fine.  ``mk`` is
    scratch of ``d``'s shape.
    """
    n, c = xs.shape
    np.less(d, pieces.reach[r0 : r0 + d.shape[0], None], out=mk)
    if not mk.any():
        return np.zeros(c)
    ii, jj = np.divmod(np.flatnonzero(mk), c)  # (2-D np.nonzero is ~10x slower)
    di = d[ii, jj]
    zi = (xs[r0 + ii, jj] - mean[jj]) * inv_std[jj]
    gi = r0 + ii
    ci = np.clip(zi, pieces.a[gi], pieces.b[gi])
    exact = (
        2.0 * (zi * ndtr(ci) + _phi(ci))
        - zi * pieces.mid_weight[gi]
        - pieces.phi_a[gi]
        - pieces.phi_b[gi]
    )
    return np.bincount(jj, weights=exact - di / n, minlength=c)


def _sorted_groups(blk: np.ndarray) -> Iterator[np.ndarray]:
    """Yield the columns of a ``[n, c]`` block in groups of ``_SORT_COLS``, each sorted along
    axis 0 as a contiguous array (sorting a contiguous ``[n, 64]`` array is several times faster
    than sorting a strided view of a wider one). ``blk`` itself is reused when narrow enough.
    """
    if blk.shape[1] <= _SORT_COLS:
        yield _sort_columns(blk)
        return
    for k in range(0, blk.shape[1], _SORT_COLS):
        yield _sort_columns(np.array(blk[:, k : k + _SORT_COLS], order="C", copy=True))


def _quiet() -> np.errstate:
    """Silence floating-point warnings from non-finite inputs (they propagate as NaN)."""
    return np.errstate(invalid="ignore", over="ignore", divide="ignore")


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _sorted_gaussian_sample(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal(n)
    g.sort()
    return g


# --------------------------------------------------------------------------------------------
# torch kernel (CUDA; also runs on CPU)
# --------------------------------------------------------------------------------------------


def _exact_torch_block(x: torch.Tensor) -> torch.Tensor:
    """Exact W1 to N(0, 1) of each column of ``x: [n, c]`` with torch ops on ``x.device``.

    Same algorithm as the numpy path (sort raw values, float64 standardisation, closed form on
    the crossing elements, ``|z - mu| / n`` elsewhere). Returns float64 ``[c]`` on ``x.device``.
    """
    n = x.shape[0]
    xs = torch.sort(x, dim=0).values.to(torch.float64)
    constant = xs[0] == xs[-1]
    mean = xs.mean(dim=0)
    z = xs - mean
    std = z.square().mean(dim=0).sqrt()
    z = z * torch.where(constant, 0.0, 1.0 / torch.where(constant, 1.0, std))
    p = gaussian_quantile_pieces(n)

    def col(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a)).to(x.device)[:, None]

    a, b, mu = col(p.a), col(p.b), col(p.mu)
    crossing = (z > a) & (z < b)
    c = torch.minimum(torch.maximum(z, a), b)
    phi_c = torch.exp(-0.5 * c * c) * _INV_SQRT_2PI
    exact = 2.0 * (z * torch.special.ndtr(c) + phi_c) - z * col(p.mid_weight)
    exact = exact - col(p.phi_a) - col(p.phi_b)
    term = torch.where(crossing, exact, (z - mu).abs() / n)
    out = term.sum(dim=0)
    return torch.where(constant, torch.nan, out)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _resolve_device(src: Any, device: str | torch.device | None) -> torch.device | None:
    """``None`` means the numpy CPU path; otherwise the torch device to compute on."""
    if device is None:
        if isinstance(src, torch.Tensor) and src.device.type != "cpu":
            return src.device
        return None
    dev = torch.device(device)
    return None if dev.type == "cpu" else dev


def wasserstein_to_gaussian(
    activations: torch.Tensor | np.ndarray,
    method: str = "exact",
    *,
    neuron_chunk: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    rows: Any = None,
) -> torch.Tensor:
    r"""W1 distance between each z-scored neuron and N(0, 1).

    Parameters
    ----------
    activations : torch.Tensor or np.ndarray or np.memmap, shape ``[tokens, neurons]``
        Neuron outputs, one column per neuron. Any real dtype (float16/bfloat16/float32/
        float64/integer). Disk-backed ``np.memmap`` inputs are read ``neuron_chunk`` columns
        at a time and never loaded whole.
    method : {"exact", "sample", "pot"}
        ``"exact"`` (default): closed-form W1 to the continuous N(0, 1) (see module docs).
        ``"sample"``: the paper's estimate, ``scipy.stats.wasserstein_distance(z, g)`` with
        ``g`` ``tokens`` draws of N(0, 1) from ``np.random.default_rng(seed)`` (the same ``g``
        for every neuron), computed vectorised as ``mean |sort(z) - sort(g)|``.
        ``"pot"``: the same estimate computed by ``ot.wasserstein_1d``.
    neuron_chunk : int, optional
        Neuron columns read and copied at once per worker thread (to a contiguous float32
        array, float64 for float64/integer inputs). Peak memory is about
        ``num_threads * tokens * neuron_chunk * 4`` bytes (8 for float64) plus ~1 MiB of
        temporaries per thread (and one extra sorted group of <= 64 columns when the block is
        wider). Default: 64 for in-memory inputs; for an ``np.memmap`` about 16 Mi values per
        block (at most 1024 columns), since every block read touches every row (page) of the
        file.
        On CUDA: columns moved to the device per step (default about 16 Mi values).
    device : str or torch.device, optional
        Only for ``method="exact"``. ``None`` (default): CUDA if ``activations`` is a CUDA
        tensor, else CPU. On CPU the numpy sort is used (about 10x faster than ``torch.sort``
        on CPU); on CUDA ``torch.sort`` and ``torch.special.ndtr``. The result is on the CPU
        either way.
    seed : int
        Seed of the Gaussian reference sample (``"sample"``/``"pot"`` only).
    num_threads : int, optional
        CPU worker threads, each handling whole neuron blocks (numpy's sort and ufuncs release
        the GIL). Default: the number of available cores, at most 8. Results do not depend
        on it.
    rows : array-like of int ``[k]`` or bool ``[tokens]``, optional
        Compute on these tokens only (e.g. without each window's first positions,
        :mod:`wasserstein_neurons.positions`). The result equals that of
        ``activations[rows]``, but the rows are gathered one neuron block at a time, so a
        memory map is never copied whole. ``None`` (default): every token.

    Returns
    -------
    torch.Tensor
        float64, CPU, shape ``[neurons]``. NaN for constant neurons (and for neurons containing
        NaN/inf).

    Raises
    ------
    ValueError
        Unknown ``method``, input not 2-D, fewer than 2 tokens, non-real dtype.
    ImportError
        ``method="pot"`` without the ``pot`` package.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    src = _as_source(activations)
    rows, n, n_neurons = _selected_shape(src, rows)
    dev = _resolve_device(src, device)
    if dev is not None and method != "exact":
        dev = None  # sample/pot run on CPU
    if dev is not None:
        return _exact_torch(src, dev, neuron_chunk, rows)

    threads = _default_threads(num_threads)
    chunk = _default_chunk(src, n, neuron_chunk)
    dtype = _work_dtype(src)
    if method == "exact":
        pieces = gaussian_quantile_pieces(n)
        ref = pieces.mu
    else:
        pieces = None
        ref = _sorted_gaussian_sample(n, seed)
    ot = _import_pot() if method == "pot" else None

    def group(xs: np.ndarray) -> dict[str, np.ndarray]:
        mean, std, constant = _sorted_moments(xs)
        if method == "pot":
            inv = np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, std))
            z = (xs - mean) * inv
            g = np.repeat(ref[:, None], z.shape[1], axis=1)
            wd = np.asarray(ot.wasserstein_1d(z, g, p=1), dtype=np.float64)
            wd[constant] = np.nan
            return {"wd": wd}
        res = _standardized_pass(xs, mean, std, constant, ref, pieces, higher=False)
        return {"wd": res["l1"]}

    def block(j0: int, j1: int) -> dict[str, np.ndarray]:
        blk = _read_block(src, j0, j1, dtype, rows)
        with _quiet():  # NaN/inf values give NaN, silently
            return _concat([group(xs) for xs in _sorted_groups(blk)])

    out = _map_blocks(block, n_neurons, chunk, threads)
    wd = out["wd"] if out else np.zeros(0)
    return torch.from_numpy(wd)


def _import_pot() -> Any:
    try:
        import ot
    except ImportError as exc:  # pragma: no cover - pot is a core dependency
        raise ImportError(
            "method='pot' needs the POT package (Python Optimal Transport): "
            "pip install pot  (or pip install 'wasserstein_neurons[pot]')"
        ) from exc
    return ot


def _exact_torch(src: Any, dev: torch.device, neuron_chunk: int | None, rows=None) -> torch.Tensor:
    n = int(src.shape[0]) if rows is None else len(rows)
    n_neurons = int(src.shape[1])
    chunk = neuron_chunk if neuron_chunk is not None else max(1, (1 << 24) // n)
    if chunk < 1:
        raise ValueError(f"neuron_chunk must be >= 1, got {chunk}")
    outs = []
    for j0 in range(0, n_neurons, chunk):
        j1 = min(j0 + chunk, n_neurons)
        if isinstance(src, torch.Tensor):
            blk = src[:, j0:j1] if rows is None else src[:, j0:j1][torch.from_numpy(rows)]
            if not blk.dtype.is_floating_point or blk.dtype == torch.float16:
                blk = blk.to(torch.float64 if not blk.dtype.is_floating_point else torch.float32)
            blk = blk.to(dev)
        else:
            dtype = np.promote_types(_work_dtype(src), np.float32)
            blk = torch.from_numpy(_read_block(src, j0, j1, dtype, rows)).to(dev)
        outs.append(_exact_torch_block(blk).cpu())
    return torch.cat(outs) if outs else torch.zeros(0, dtype=torch.float64)


def constant_neurons(activations: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Flag neurons whose output is the same for every token (zero variance).

    Parameters
    ----------
    activations : torch.Tensor or np.ndarray, shape ``[tokens, neurons]``

    Returns
    -------
    torch.Tensor
        bool, CPU, shape ``[neurons]``; ``True`` where ``min == max`` over tokens.
    """
    src = _as_source(activations, min_tokens=1)
    n, n_neurons = (int(s) for s in src.shape)
    chunk = _default_chunk(src, n, None)
    dtype = _work_dtype(src)
    flags = []
    for j0 in range(0, n_neurons, chunk):
        if isinstance(src, torch.Tensor):
            blk = src[:, j0 : j0 + chunk]
            flags.append((blk.amin(dim=0) == blk.amax(dim=0)).cpu().numpy())
        else:
            blk = np.asarray(src[:, j0 : j0 + chunk], dtype=dtype)
            flags.append(blk.min(axis=0) == blk.max(axis=0))
    return torch.from_numpy(np.concatenate(flags) if flags else np.zeros(0, dtype=bool))


def _no_statistics() -> dict[str, np.ndarray]:
    """The statistics of zero neurons."""
    out = {k: np.zeros(0) for k in ("wd", "mean", "std", "skew", "kurtosis", "min", "max")}
    out["constant"] = np.zeros(0, dtype=bool)
    return out


def neuron_statistics(
    activations: torch.Tensor | np.ndarray,
    method: str = "exact",
    *,
    neuron_chunk: int | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    rows: Any = None,
) -> dict[str, np.ndarray]:
    r"""Per-neuron distribution statistics in one chunked pass (float64 accumulation).

    Parameters
    ----------
    activations : torch.Tensor or np.ndarray or np.memmap, shape ``[tokens, neurons]``
    method : {"exact", "sample", "pot"}
        How ``wd`` is computed (see :func:`wasserstein_to_gaussian`).
    neuron_chunk, seed, num_threads
        As in :func:`wasserstein_to_gaussian` (CPU only).
    rows : array-like of int ``[k]`` or bool ``[tokens]``, optional
        Statistics of these tokens only (equal to those of ``activations[rows]``, gathered
        per neuron block), as in :func:`wasserstein_to_gaussian`.

    Returns
    -------
    dict[str, np.ndarray]
        Each value has shape ``[neurons]``:

        - ``wd``: W1 to N(0, 1) of the z-scored neuron (NaN if constant);
        - ``mean``: mean over tokens;
        - ``std``: population standard deviation (``ddof=0``);
        - ``skew``: :math:`m_3 / m_2^{3/2}` (biased, = ``scipy.stats.skew``);
        - ``kurtosis``: excess kurtosis :math:`m_4 / m_2^2 - 3` (biased, Fisher,
          = ``scipy.stats.kurtosis``);
        - ``min``, ``max``: extreme values;
        - ``n_tokens``: int64, the number of tokens (kept ``rows``);
        - ``constant``: bool, zero variance (then ``wd``, ``skew``, ``kurtosis`` are NaN).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    src = _as_source(activations)
    rows, n, n_neurons = _selected_shape(src, rows)
    threads = _default_threads(num_threads)
    chunk = _default_chunk(src, n, neuron_chunk)
    dtype = _work_dtype(src)
    pieces = gaussian_quantile_pieces(n)
    gauss = _sorted_gaussian_sample(n, seed) if method != "exact" else None
    ot = _import_pot() if method == "pot" else None

    def group(xs: np.ndarray) -> dict[str, np.ndarray]:
        mean, std, constant = _sorted_moments(xs)
        # moments (and the exact WD, reused when method == "exact") in one pass
        res = _standardized_pass(xs, mean, std, constant, pieces.mu, pieces, higher=True)
        if method == "exact":
            wd = res["l1"]
        elif method == "sample":
            wd = _standardized_pass(xs, mean, std, constant, gauss, None, higher=False)["l1"]
        else:
            inv = np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, std))
            z = (xs - mean) * inv
            g = np.repeat(gauss[:, None], z.shape[1], axis=1)
            wd = np.asarray(ot.wasserstein_1d(z, g, p=1), dtype=np.float64)
            wd[constant] = np.nan
        return {
            "wd": wd,
            "mean": mean,
            "std": std,
            "skew": res["m3"] / res["m2"] ** 1.5,
            "kurtosis": res["m4"] / res["m2"] ** 2 - 3.0,
            "min": xs[0].astype(np.float64),
            "max": xs[-1].astype(np.float64),
            "constant": constant,
        }

    def block(j0: int, j1: int) -> dict[str, np.ndarray]:
        blk = _read_block(src, j0, j1, dtype, rows)
        with _quiet():  # NaN/inf values give NaN, silently
            return _concat([group(xs) for xs in _sorted_groups(blk)])

    out = _map_blocks(block, n_neurons, chunk, threads) or _no_statistics()
    out["n_tokens"] = np.full(n_neurons, n, dtype=np.int64)
    return out


def wasserstein_between(
    u: torch.Tensor | np.ndarray,
    v: torch.Tensor | np.ndarray,
    *,
    standardize: bool = False,
    neuron_chunk: int | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    r"""Exact W1 between two empirical distributions, per neuron.

    .. math::

        W_1(u_j, v_j) = \int_0^1 |F_{u_j}^{-1}(q) - F_{v_j}^{-1}(q)|\,dq
                      = \sum_k (q_{k+1} - q_k)\,|u_{(\lceil q n \rceil)} - v_{(\lceil q m\rceil)}|,

    over the merged grid :math:`\{i/n\} \cup \{j/m\}` (the same for every neuron, built with
    integer arithmetic). Equals ``scipy.stats.wasserstein_distance(u[:, j], v[:, j])``.

    Parameters
    ----------
    u : torch.Tensor or np.ndarray, shape ``[n, neurons]``
    v : torch.Tensor or np.ndarray, shape ``[m, neurons]``
        Samples (e.g. dense and sparse outputs of the same neurons); ``n != m`` is allowed.
    standardize : bool
        If ``False`` (default) the raw values are compared (so the distance is in the units of
        the outputs). If ``True`` each column of ``u`` and of ``v`` is z-scored separately
        (population std) first; constant columns then give NaN.
    neuron_chunk, num_threads
        As in :func:`wasserstein_to_gaussian`.

    Returns
    -------
    torch.Tensor
        float64, CPU, shape ``[neurons]``.
    """
    su = _as_source(u, min_tokens=1, name="u")
    sv = _as_source(v, min_tokens=1, name="v")
    if su.shape[1] != sv.shape[1]:
        raise ValueError(
            f"u and v must have the same number of neurons (columns), got shapes "
            f"{tuple(su.shape)} and {tuple(sv.shape)}"
        )
    if standardize and min(su.shape[0], sv.shape[0]) < 2:
        raise ValueError("standardize=True needs at least 2 tokens in u and in v")
    n, m = int(su.shape[0]), int(sv.shape[0])
    n_neurons = int(su.shape[1])
    grid = np.union1d(np.arange(n + 1, dtype=np.int64) * m, np.arange(m + 1, dtype=np.int64) * n)
    left = grid[:-1]
    weights = np.diff(grid).astype(np.float64) / (float(n) * float(m))  # [K]
    iu = left // m  # index of the order statistic of u on each merged piece
    iv = left // n
    threads = _default_threads(num_threads)
    chunk = _default_chunk(su, max(n, m), neuron_chunk)
    du, dv = _work_dtype(su), _work_dtype(sv)

    def prep(xs: np.ndarray) -> np.ndarray:
        if standardize:
            mean, std, constant = _sorted_moments(xs)
            return (xs - mean) / np.where(constant, np.nan, std)
        return xs.astype(np.float64, copy=False)

    def block(j0: int, j1: int) -> dict[str, np.ndarray]:
        with _quiet():
            return _between_block(j0, j1)

    def _between_block(j0: int, j1: int) -> dict[str, np.ndarray]:
        gu = _sorted_groups(_read_block(su, j0, j1, du))
        gv = _sorted_groups(_read_block(sv, j0, j1, dv))
        parts = []
        for xu, xv in zip(gu, gv, strict=True):
            # [K, c] quantile-function values of u and v on the merged pieces
            parts.append(weights @ np.abs(prep(xu)[iu] - prep(xv)[iv]))
        return {"w": np.concatenate(parts)}

    out = _map_blocks(block, n_neurons, chunk, threads)
    return torch.from_numpy(out["w"] if out else np.zeros(0))
