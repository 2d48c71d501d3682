"""Shared interface of the one-shot weight pruners.

Every pruner works on one weight matrix ``W`` of shape ``[out, in]`` (the layout of
``torch.nn.Linear.weight``): a row ``W[j]`` is one neuron (output channel), a column
``W[:, i]`` multiplies input feature ``i``.  The life cycle is

1. ``pruner = make_pruner("sparsegpt", d_in=W.shape[1], device=...)``
2. ``pruner.add_batch(x)`` for every calibration batch of the layer's *inputs*
   (``x: [..., in]``, e.g. ``[batch, seq, in]`` or ``[tokens, in]``);
3. ``result = pruner.prune(W, PruneSpec(sparsity=0.5))`` returns a new weight, the mask and
   statistics; the input weight is left untouched unless ``inplace=True``.

Conventions shared by all methods
---------------------------------
* ``sparsity`` is the fraction of weights zeroed *per pruned row* (methods that compare
  scores within a row) or over the pruned rows taken together (per-matrix magnitude).  The
  number of weights removed from ``n`` candidates is ``k = floor(sparsity * n + 1/2)``
  (nearest integer), and exactly ``k`` are chosen (ties are broken by a stable sort, lowest
  column index first), so the achieved sparsity is exact even when many ``|w|`` tie.
* ``prunen:prunem`` (n:m) sparsity zeroes exactly ``n`` weights in every group of ``m``
  consecutive input columns of every pruned row; ``in`` must be divisible by ``m``.  When
  n:m is set, ``sparsity`` must be ``0`` or ``n / m``.
* ``rows`` restricts pruning to a subset of neurons: every other row of the returned weight
  is bit-identical to the input.
* Zero sparsity (and no n:m, no quantization) returns an exact copy.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "Pruner",
    "PruneResult",
    "PruneSpec",
    "lowest_k_mask",
    "lowest_k_mask_per_row",
    "n_to_prune",
    "nm_mask",
]


def n_to_prune(sparsity: float, n: int) -> int:
    """Number of weights to remove from ``n`` candidates at a given sparsity.

    Parameters
    ----------
    sparsity : float
        Target fraction in ``[0, 1)``.
    n : int
        Number of candidate weights.

    Returns
    -------
    int
        ``floor(sparsity * n + 1/2)``, the nearest integer (halves round up), clipped to
        ``[0, n]``.
    """
    return min(max(int(math.floor(sparsity * n + 0.5)), 0), n)


def lowest_k_mask_per_row(scores: Tensor, k: int) -> Tensor:
    """Mark the ``k`` lowest scores of every row.

    Parameters
    ----------
    scores : Tensor, shape ``[rows, cols]``
        Importance scores (lower = pruned first).
    k : int
        Number of entries to mark per row, ``0 <= k <= cols``.

    Returns
    -------
    Tensor, bool, shape ``[rows, cols]``
        ``True`` at the ``k`` lowest entries of each row.  Ties are broken by a stable sort
        (lowest column index first), so exactly ``k`` entries per row are marked.
    """
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0 or scores.numel() == 0:
        return mask
    idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return mask.scatter_(1, idx, True)


def lowest_k_mask(scores: Tensor, k: int) -> Tensor:
    r"""Mark the ``k`` lowest scores of the whole tensor.

    Parameters
    ----------
    scores : Tensor, any shape
        Importance scores (lower = pruned first).
    k : int
        Number of entries to mark, ``0 <= k <= scores.numel()``.

    Returns
    -------
    Tensor, bool, same shape as ``scores``
        ``True`` at exactly ``k`` entries (stable tie-breaking in flattened order).

    Notes
    -----
    The entries a stable sort would put first, found by selection (:math:`O(n)`, not
    :math:`O(n \log n)`): with :math:`t` the ``k``-th smallest score, every score below
    :math:`t` and the first ``k - #{s < t}`` scores equal to :math:`t` in flattened order.
    Scores holding NaN go through the stable sort.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full(scores.shape, k > 0 and n > 0, dtype=torch.bool, device=scores.device)
    if bool(torch.isnan(flat).any()):
        mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
        mask[torch.sort(flat, stable=True).indices[:k]] = True
        return mask.view(scores.shape)
    t = torch.kthvalue(flat, k).values
    below = flat < t
    ties = flat == t
    need = k - below.sum()
    mask = below | (ties & (torch.cumsum(ties, 0) <= need))
    return mask.view(scores.shape)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """n:m mask: the ``n`` lowest scores in every group of ``m`` consecutive columns.

    Parameters
    ----------
    scores : Tensor, shape ``[rows, cols]``
        Importance scores; ``cols`` must be a multiple of ``m``.
    n, m : int
        ``0 < n < m``.

    Returns
    -------
    Tensor, bool, shape ``[rows, cols]``
        Exactly ``n`` ``True`` entries in every ``[row, g*m:(g+1)*m]`` group.
    """
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    idx = torch.sort(grouped, dim=2, stable=True).indices[..., :n]
    mask = torch.zeros(grouped.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(2, idx, True).reshape(rows, cols)


@dataclass
class PruneSpec:
    """What to prune and how much.

    Parameters
    ----------
    sparsity : float
        Target fraction of zeroed weights in ``[0, 1)``.  With ``rows`` it is the per-row
        sparsity of the selected rows (or, for per-matrix magnitude, the sparsity of the
        selected rows taken together); other rows are not counted and not touched.
    prunen, prunem : int
        n:m semi-structured sparsity: ``prunen`` zeros in every group of ``prunem``
        consecutive input columns (e.g. ``2, 4``).  Both ``0`` (default) disables it;
        otherwise ``0 < prunen < prunem`` and ``in % prunem == 0``.  ``sparsity`` must then be
        ``0`` or ``prunen / prunem``.
    rows : LongTensor of shape ``[r]``, bool tensor of shape ``[out]``, sequence of int, or None
        Output rows (neurons) to prune.  ``None`` prunes every row.  Indices must be unique
        and in ``[0, out)``.
    wbits : int
        Quantize the kept weights to ``wbits`` bits (asymmetric per-row min-max grid,
        GPTQ-style, inside the SparseGPT loop).  ``>= 16`` means no quantization.  Only the
        ``sparsegpt`` method supports ``wbits < 16``.
    blocksize : int
        SparseGPT column block size (default 128).  With n:m it must be a multiple of
        ``prunem``.
    percdamp : float
        SparseGPT damping: ``percdamp * mean(diag(H))`` is added to the Hessian diagonal.
    per_row : bool or None
        Compare scores within each row (``True``) or over all pruned rows at once
        (``False``).  ``None`` uses the method's reference rule: magnitude per matrix, Wanda
        per row, SparseGPT one count per column block over all rows (as IST-DASLab's
        ``fasterprune``, but pruning exactly the requested count: its ``<=`` threshold prunes
        one weight more in most blocks).  ``True`` makes every row's sparsity exact (our
        variant; the neuron-set ablation uses it), at +1.5-3% held-out error for SparseGPT.

    Raises
    ------
    ValueError
        For a sparsity outside ``[0, 1)``, a malformed n:m pattern, ``wbits < 1``,
        ``blocksize < 1`` or a negative ``percdamp``.
    """

    sparsity: float = 0.0
    prunen: int = 0
    prunem: int = 0
    rows: Tensor | Sequence[int] | None = None
    wbits: int = 16
    blocksize: int = 128
    percdamp: float = 0.01
    per_row: bool | None = None

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
            raise ValueError(f"sparsity must be a float in [0, 1), got {s!r}")
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {s!r}")
        self.sparsity = float(s)
        n, m = self.prunen, self.prunem
        if not (isinstance(n, int) and isinstance(m, int)):
            raise ValueError(f"prunen and prunem must be integers, got {n!r}:{m!r}")
        if (n, m) != (0, 0):
            if not 0 < n < m:
                raise ValueError(
                    f"malformed n:m sparsity {n}:{m}: need 0 < prunen < prunem "
                    "(or prunen = prunem = 0 to disable)"
                )
            if self.sparsity != 0.0 and not math.isclose(self.sparsity, n / m, abs_tol=1e-9):
                raise ValueError(
                    f"sparsity={self.sparsity} contradicts the {n}:{m} pattern; "
                    f"pass sparsity=0 or {n / m}"
                )
            if self.blocksize % m != 0:
                raise ValueError(
                    f"n:m sparsity {n}:{m}: prunem must divide the {self.blocksize}-column "
                    "pruning block (e.g. 2:4, 4:8)"
                )
        if not isinstance(self.wbits, int) or not 1 <= self.wbits <= 16:
            raise ValueError(
                f"wbits must be an integer in 1..15 (quantize) or 16 (no quantization), "
                f"got {self.wbits!r}"
            )
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize must be a positive integer, got {self.blocksize!r}")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp!r}")

    @classmethod
    def from_settings(
        cls, sparsity: float = 0.0, prunen: int = 0, prunem: int = 0, **kwargs: Any
    ) -> PruneSpec:
        """The spec of the sparsity flags ``--sparsity / --prunen / --prunem``.

        The one home of the rule "n:m overrides sparsity": with an n:m pattern the sparsity
        flag is ignored (the pattern fixes it at ``prunen / prunem``).

        Raises
        ------
        ValueError
            When only one of ``prunen`` / ``prunem`` is given, or for any invalid value.
        """
        if (prunen == 0) != (prunem == 0):
            raise ValueError(
                f"malformed n:m sparsity {prunen}:{prunem}: give both --prunen and --prunem"
            )
        return cls(sparsity=0.0 if prunem else sparsity, prunen=prunen, prunem=prunem, **kwargs)

    @classmethod
    def from_pattern(cls, pattern: str | float, **kwargs: Any) -> PruneSpec:
        """``"2:4"`` -> ``PruneSpec(prunen=2, prunem=4)``; ``"0.9"`` or ``0.9`` ->
        ``PruneSpec(sparsity=0.9)``.

        >>> PruneSpec.from_pattern("2:4").target_sparsity
        0.5

        Raises
        ------
        ValueError
            For a malformed value, a sparsity outside ``[0, 1)`` or a bad n:m pattern.
        """
        text = str(pattern).strip()
        if ":" in text:
            try:
                n, m = (int(p) for p in text.split(":"))
            except ValueError:
                raise ValueError(f"malformed n:m sparsity {text!r}; expected e.g. '2:4'") from None
            return cls(prunen=n, prunem=m, **kwargs)
        try:
            s = float(text)
        except ValueError:
            raise ValueError(f"malformed sparsity {text!r}; expected e.g. 0.5 or 2:4") from None
        return cls(sparsity=s, **kwargs)

    @property
    def target_sparsity(self) -> float:
        """Fraction of zeroed weights asked for: ``prunen / prunem`` with n:m, else ``sparsity``."""
        return self.prunen / self.prunem if self.is_nm else self.sparsity

    @property
    def label(self) -> str:
        """``"2:4"`` for n:m, else the sparsity (``"0.5"``): the inverse of :meth:`from_pattern`."""
        return f"{self.prunen}:{self.prunem}" if self.is_nm else f"{self.sparsity:g}"

    @property
    def is_nm(self) -> bool:
        """Whether n:m semi-structured sparsity is requested."""
        return self.prunen > 0

    @property
    def quantize(self) -> bool:
        """Whether quantization is requested (``wbits < 16``)."""
        return self.wbits < 16

    @property
    def is_identity(self) -> bool:
        """Whether the spec leaves every weight unchanged (no pruning, no quantization)."""
        return self.sparsity == 0.0 and not self.is_nm and not self.quantize

    def resolve_rows(self, n_out: int, device: torch.device | str) -> Tensor | None:
        """Validate ``rows`` against a weight with ``n_out`` rows.

        Returns
        -------
        LongTensor of shape ``[r]`` on ``device`` (sorted, unique), or None for all rows.
        """
        rows = self.rows
        if rows is None:
            return None
        rows = torch.as_tensor(rows, device=device)
        if rows.dtype == torch.bool:
            if rows.shape != (n_out,):
                raise ValueError(
                    f"boolean rows mask must have shape ({n_out},), got {tuple(rows.shape)}"
                )
            return rows.nonzero().flatten()
        if rows.is_floating_point() or rows.is_complex() or rows.dim() != 1:
            raise ValueError("rows must be a 1-D integer (LongTensor) index or a boolean mask")
        rows = rows.long()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_out):
            raise ValueError(
                f"rows must lie in [0, {n_out}), got min {int(rows.min())}, max {int(rows.max())}"
            )
        rows = torch.sort(rows).values
        if rows.numel() > 1 and bool((rows[1:] == rows[:-1]).any()):
            raise ValueError("rows contains duplicate indices")
        return rows


@dataclass
class PruneResult:
    """Output of :meth:`Pruner.prune`.

    Attributes
    ----------
    weight : Tensor, shape ``[out, in]``
        The pruned (and possibly quantized) weight; same dtype and device as the input.
    mask : Tensor, bool, shape ``[out, in]``
        ``True`` where a weight was pruned (set to zero) by this call; all ``False`` on rows
        that were not selected.
    sparsity : float
        Achieved fraction of exact zeros in the pruned rows of ``weight`` (includes weights
        that were already zero).
    time_s : float
        Wall-clock seconds spent in :meth:`Pruner.prune`.
    rows : LongTensor or None
        The pruned rows (sorted), ``None`` for all.
    stats : dict
        Method-specific extras, e.g. ``mask_sparsity`` (fraction of ``mask`` over the pruned
        rows), ``error`` (SparseGPT's summed OBS loss), ``dead_inputs``.
    """

    weight: Tensor
    mask: Tensor
    sparsity: float
    time_s: float
    rows: Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class Pruner(ABC):
    """Base class: accumulate calibration statistics, then prune one weight matrix.

    Parameters
    ----------
    d_in : int
        Number of input features (columns of the weight).
    device : torch.device or str, optional
        Where calibration statistics are accumulated (default CPU).  Pruning runs on the
        weight's device; statistics are moved there when needed.
    dtype : torch.dtype
        Accumulation (and, for SparseGPT, computation) dtype of the statistics.
    """

    #: Name used by :func:`~wasserstein_neurons.pruning.make_pruner`.
    name: ClassVar[str] = ""
    #: Whether ``wbits < 16`` is supported.
    supports_quantization: ClassVar[bool] = False
    #: Default of ``PruneSpec.per_row`` when it is None.
    default_per_row: ClassVar[bool] = True
    #: Whether :meth:`prune` needs :meth:`add_batch` to have been called.
    needs_calibration: ClassVar[bool] = True
    #: Accumulation dtype of the statistics when none is given.
    default_dtype: ClassVar[torch.dtype] = torch.float32

    def __init__(
        self,
        d_in: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(d_in, int) or d_in < 1:
            raise ValueError(f"d_in must be a positive integer, got {d_in!r}")
        self.d_in = d_in
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = self.default_dtype if dtype is None else dtype
        #: Number of calibration tokens (rows of the flattened inputs) seen so far.
        self.nsamples = 0
        self._init_statistics()

    def _init_statistics(self) -> None:  # noqa: B027 - optional hook
        """Allocate zeroed calibration statistics (called by ``__init__`` and :meth:`reset`)."""

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        """Accumulate calibration statistics from a batch of the layer's inputs.

        Parameters
        ----------
        x : Tensor, shape ``[..., in]``
            Inputs of the linear layer, e.g. ``[batch, seq, in]`` or ``[tokens, in]``; every
            leading index is one token.  Moved to ``self.device`` / ``self.dtype``.
        """
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"expected inputs with last dimension {self.d_in}, got {tuple(x.shape)}"
            )
        x = x.detach().reshape(-1, self.d_in).to(device=self.device, dtype=self.dtype)
        if x.shape[0] == 0:
            return
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            raise ValueError(
                f"{bad} of {x.shape[0]} calibration inputs hold NaN or inf values: the model's "
                "activations overflow (try --dtype float32) or its weights are broken"
            )
        self._accumulate(x)
        self.nsamples += x.shape[0]

    def _accumulate(self, x: Tensor) -> None:  # noqa: B027 - optional hook
        """Update the statistics with ``x: [tokens, in]`` (before ``nsamples`` is increased)."""

    def reset(self) -> None:
        """Forget all calibration statistics."""
        self.nsamples = 0
        self._init_statistics()

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune(
        self,
        weight: Tensor,
        spec: PruneSpec | None = None,
        *,
        inplace: bool = False,
        **spec_kwargs: Any,
    ) -> PruneResult:
        """Prune ``weight`` according to ``spec``.

        Parameters
        ----------
        weight : Tensor, shape ``[out, in]``
            Weight in ``nn.Linear`` layout (transpose GPT-2 ``Conv1D`` weights first).
        spec : PruneSpec, optional
            What to prune; alternatively pass its fields as keyword arguments
            (``prune(W, sparsity=0.5)``).
        inplace : bool
            Write the result into ``weight`` (only the pruned rows change) and return it as
            ``result.weight``.  Default: ``weight`` is not modified.

        Returns
        -------
        PruneResult
        """
        t0 = time.perf_counter()
        if spec is None:
            spec = PruneSpec(**spec_kwargs)
        elif spec_kwargs:
            raise TypeError("pass either a PruneSpec or its fields as keywords, not both")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        n_out, n_in = weight.shape
        if n_in != self.d_in:
            raise ValueError(
                f"weight has {n_in} input columns but the pruner was built for "
                f"d_in={self.d_in} (is the weight transposed?)"
            )
        if spec.is_nm and n_in % spec.prunem != 0:
            raise ValueError(f"n:m sparsity needs in % m == 0, got in={n_in}, m={spec.prunem}")
        if spec.quantize and not self.supports_quantization:
            raise ValueError(
                f"method {self.name!r} does not support wbits={spec.wbits} "
                "(only 'sparsegpt' quantizes); use wbits=16"
            )
        rows = spec.resolve_rows(n_out, weight.device)
        sub = weight if rows is None else weight[rows]
        stats: dict[str, Any] = {}
        if spec.is_identity or sub.shape[0] == 0:
            new_sub = sub.clone()
            mask_sub = torch.zeros(sub.shape, dtype=torch.bool, device=weight.device)
        else:
            if self.needs_calibration and self.nsamples == 0:
                raise RuntimeError(f"{self.name}: no calibration data; call add_batch() first")
            new_sub, mask_sub, stats = self._prune_rows(sub, spec)
            new_sub = new_sub.to(dtype=weight.dtype)

        out = weight if inplace else (new_sub if rows is None else weight.clone())
        if rows is None:
            if inplace:
                out.copy_(new_sub)
            mask = mask_sub
        else:
            out[rows] = new_sub
            mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
            mask[rows] = mask_sub
        n_cand = max(new_sub.numel(), 1)
        stats["mask_sparsity"] = float(mask_sub.sum()) / n_cand
        return PruneResult(
            weight=out,
            mask=mask,
            sparsity=float((new_sub == 0).sum()) / n_cand,
            time_s=time.perf_counter() - t0,
            rows=rows,
            stats=stats,
        )

    def _per_row(self, spec: PruneSpec) -> bool:
        return self.default_per_row if spec.per_row is None else bool(spec.per_row)

    def _score_mask(self, scores: Tensor, spec: PruneSpec) -> Tensor:
        """Mask ``[r, in]`` of the weights to zero: the lowest ``scores`` in every n:m group, in
        every row (per-row rule) or over the whole matrix (per-matrix rule)."""
        if spec.is_nm:
            return nm_mask(scores, spec.prunen, spec.prunem)
        if self._per_row(spec):
            return lowest_k_mask_per_row(scores, n_to_prune(spec.sparsity, scores.shape[1]))
        return lowest_k_mask(scores, n_to_prune(spec.sparsity, scores.numel()))

    @abstractmethod
    def _prune_rows(self, w: Tensor, spec: PruneSpec) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Prune every row of ``w: [r, in]``.

        Returns the new rows (any float dtype, same device, a new tensor), the bool mask
        ``[r, in]`` of pruned entries, and a dict of extra statistics.
        """

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(d_in={self.d_in}, device={str(self.device)!r}, "
            f"nsamples={self.nsamples})"
        )
