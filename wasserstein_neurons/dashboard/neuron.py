r"""What a neuron page shows, computed from one neuron's column of the activation store.

:func:`neuron_data` turns the neuron's outputs ``y: [n_tokens]`` (one column of a hook's
``[tokens, neurons]`` array) into a :class:`NeuronData`:

* the z-scored outputs ``z = (y_K - mean) / std`` over the kept rows ``K`` of the run (population
  std, the ranking's convention), as a histogram (:data:`HIST_BINS` equal bins over
  ``[min(z.min(), -4), max(z.max(), 4)]``) with the counts N(0, 1) predicts per bin;
* a Q–Q plot against N(0, 1): the sorted ``z`` at :data:`QQ_POINTS` evenly spaced ranks plus the
  :data:`QQ_TAIL` most extreme values at each end, against ``Φ⁻¹((i + ½) / n)``;
* the ``k`` kept tokens with the highest and with the lowest output, each with its context
  (:class:`ActivationRecord`: up to ``before`` tokens before it and ``after`` after it, never
  crossing the window boundary), every context token carrying the neuron's stored output;
* ``k`` kept tokens drawn uniformly at random (the record's ``random_sample``);
* quantile-binned examples: the kept tokens sorted by output and cut at the ranks
  ``round(q · n)`` of :data:`QUANTILE_LEVELS` ``q``, ``per_quantile`` tokens drawn at random
  (seeded per neuron) from every bin, so a page shows what the bulk of the distribution does
  and not only its tails; ``quantile_boundaries`` are the outputs at the cut ranks (the last:
  the maximum), so every bin's outputs lie between its two boundaries.

Nothing here loads a model: token strings come from a tokenizer (:class:`TokenDecoder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtri
from scipy.stats import norm

#: Equal-width bins of the z-scored histogram.
HIST_BINS = 100
#: Evenly spaced ranks of the Q–Q plot, plus ``QQ_TAIL`` exact extremes at each end.
QQ_POINTS = 200
QQ_TAIL = 20
#: Quantile levels splitting a neuron's kept tokens into bins for the binned examples.
QUANTILE_LEVELS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


class TokenDecoder:
    """Token id -> display string, decoded one id at a time and cached (``tokenizer.decode``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            text = self._cache.get(i)
            if text is None:
                text = self._cache[i] = self.tokenizer.decode([i])
            out.append(text)
        return out


@dataclass
class ActivationRecord:
    """One context: its tokens and the neuron's output on every one of them.

    ``tokens[target]`` is the token the record was chosen for; ``position`` is its store row
    (``window · seqlen + window_position``) and ``start`` the window position of ``tokens[0]``.
    """

    tokens: list[str]
    activations: list[float]
    target: int
    position: int
    window: int
    start: int

    @property
    def value(self) -> float:
        """The neuron's output on the chosen token."""
        return self.activations[self.target]


@dataclass
class NeuronData:
    """Everything a neuron page and its JSON record show (see the module docstring)."""

    hook: str
    layer: int
    neuron: int
    stats: dict
    n: int
    mean: float
    std: float
    edges: np.ndarray  # [HIST_BINS + 1] z
    counts: np.ndarray  # [HIST_BINS] kept tokens per bin
    expected: np.ndarray  # [HIST_BINS] N(0, 1) counts per bin
    qq_theory: np.ndarray
    qq_sample: np.ndarray
    top: list[ActivationRecord]
    bottom: list[ActivationRecord]
    quantile_levels: tuple[float, ...]
    quantile_boundaries: list[float]
    by_quantile: list[list[ActivationRecord]] = field(default_factory=list)
    random: list[ActivationRecord] = field(default_factory=list)
    overlays: dict = field(default_factory=dict)

    @property
    def page_id(self) -> str:
        """``<layer>_<neuron>`` (the file name of its page and record without extension)."""
        return self.stats.get("page_id", f"{self.layer}_{self.neuron}")


def _histogram(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = min(float(z.min()), -4.0), max(float(z.max()), 4.0)
    counts, edges = np.histogram(z, bins=HIST_BINS, range=(lo, hi))
    expected = len(z) * np.diff(norm.cdf(edges))
    return edges, counts, expected


def _qq(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(z)
    ranks = np.unique(
        np.concatenate(
            [
                np.linspace(0, n - 1, min(n, QQ_POINTS)).round().astype(np.int64),
                np.arange(min(n, QQ_TAIL)),
                np.arange(max(0, n - QQ_TAIL), n),
            ]
        )
    )
    sample = np.partition(z, ranks)[ranks]
    return ndtri((ranks + 0.5) / n), sample


def _context_maker(column, token_ids, seqlen: int, decode, before: int, after: int):
    def record(pos: int) -> ActivationRecord:
        window = pos // seqlen
        lo = max(window * seqlen, pos - before)
        hi = min((window + 1) * seqlen, pos + after + 1)
        return ActivationRecord(
            tokens=decode(token_ids[lo:hi]),
            activations=[float(v) for v in column[lo:hi]],
            target=pos - lo,
            position=int(pos),
            window=int(window),
            start=int(lo - window * seqlen),
        )

    return record


def neuron_data(
    column,
    token_ids,
    seqlen: int,
    stats: dict,
    decode,
    rows=None,
    k: int = 8,
    per_quantile: int = 2,
    before: int = 12,
    after: int = 4,
    seed: int = 0,
) -> NeuronData:
    """The page data of one neuron.

    Parameters
    ----------
    column : array-like, shape ``[n_tokens]``
        The neuron's stored outputs on every row of the store (float16 or float32).
    token_ids : np.ndarray, shape ``[n_tokens]``
        The store's token ids (``ActivationStore.tokens()``).
    seqlen : int
        Window length of the store.
    stats : dict
        The neuron's row of the ranking table (``hook``, ``layer``, ``neuron``, ``wd``, …).
    decode : callable
        ``ids -> list[str]`` (a :class:`TokenDecoder`).
    rows : np.ndarray of int64, optional
        Kept rows (the run's token exclusions); ``None``: all rows.
    k, per_quantile : int
        Records per tail and per quantile bin.
    before, after : int
        Context tokens around the chosen token.
    seed : int
        Seeds the quantile-bin draws (with the layer and neuron).
    """
    column = np.asarray(column, dtype=np.float32)
    kept = np.arange(len(column)) if rows is None else np.asarray(rows, dtype=np.int64)
    y = column[kept].astype(np.float64)
    n, mean, std = len(y), float(y.mean()), float(y.std())
    z = (y - mean) / std if std > 0 else y - mean
    edges, counts, expected = _histogram(z)
    qq_theory, qq_sample = _qq(z)
    record = _context_maker(column, token_ids, seqlen, decode, before, after)
    order = np.argsort(y, kind="stable")
    kk = min(k, n)
    layer, neuron = int(stats["layer"]), int(stats["neuron"])
    rng = np.random.default_rng([seed, max(layer, 0), neuron])
    # bin b holds the tokens of ranks cut[b] .. cut[b + 1] - 1 (at least one token each)
    cut = np.minimum(np.round(np.asarray(QUANTILE_LEVELS) * n).astype(np.int64), n)
    cut[:-1] = np.minimum(cut[:-1], n - 1)
    by_quantile = []
    for b in range(len(QUANTILE_LEVELS) - 1):
        members = order[cut[b] : max(cut[b + 1], cut[b] + 1)]
        picks = rng.choice(members, size=min(per_quantile, len(members)), replace=False)
        by_quantile.append([record(int(kept[i])) for i in np.sort(picks)])
    random = np.sort(rng.choice(n, size=kk, replace=False))
    return NeuronData(
        hook=str(stats["hook"]),
        layer=layer,
        neuron=neuron,
        stats=dict(stats),
        n=n,
        mean=mean,
        std=std,
        edges=edges,
        counts=counts,
        expected=expected,
        qq_theory=qq_theory,
        qq_sample=qq_sample,
        top=[record(int(kept[i])) for i in order[::-1][:kk]],
        bottom=[record(int(kept[i])) for i in order[:kk]],
        quantile_levels=QUANTILE_LEVELS,
        quantile_boundaries=[float(y[order[min(c, n - 1)]]) for c in cut],
        by_quantile=by_quantile,
        random=[record(int(kept[i])) for i in random],
    )
