"""Per-neuron tables and the selection of Wasserstein neurons.

:func:`rank_store` turns an :class:`~wasserstein_neurons.capture.ActivationStore` into one row
per (hook, neuron) with the neuron's W1 distance to N(0, 1) after z-scoring (``wd``) and its
shape statistics. :func:`top_neurons` keeps the top ``p``% by WD *within each hook* (the paper's
Wasserstein neurons, p = 3). :func:`top_activating_contexts` shows which tokens drive a neuron to
either tail of its distribution.

Token positions
---------------
Every statistic can leave out each window's first ``exclude_positions`` positions and / or its
special tokens (``exclude_special``; :meth:`~wasserstein_neurons.capture.ActivationStore.select`):
the table is then that of the kept rows ``K``, ``activations[K]``, read one neuron block at a
time. The defaults (nothing excluded) give the unfiltered numbers bit for bit.
``first_pos_share`` (:func:`first_position_share`) is the share of a neuron's most extreme
tokens, the top ``TAIL_FRACTION`` = 0.1% by ``|z|``, that are the first kept token of their
window; ``position_artefact`` flags a share above ``POSITION_ARTEFACT_SHARE`` = 0.5: the
neuron's tail is mostly window-start (attention-sink) tokens, an artefact of where windows
are cut rather than of what the text says.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .capture import ActivationStore, hook_layer
from .positions import RowSelection
from .wasserstein import neuron_statistics

TABLE_COLUMNS = [
    "layer",
    "hook",
    "neuron",
    "wd",
    "mean",
    "std",
    "skew",
    "kurtosis",
    "n_tokens",
    "constant",
    "first_pos_share",
    "position_artefact",
]
#: Share of a neuron's tokens in its tail (top 0.1% by |z|) that ``first_pos_share`` looks at.
TAIL_FRACTION = 0.001
#: ``position_artefact`` is ``first_pos_share > POSITION_ARTEFACT_SHARE``.
POSITION_ARTEFACT_SHARE = 0.5


def check_percent(top_percent: float) -> float:
    """Validate a per-layer percentage in (0, 100]."""
    top_percent = float(top_percent)
    if not (0.0 < top_percent <= 100.0) or math.isnan(top_percent):
        raise ValueError(f"top_percent must be in (0, 100], got {top_percent}")
    return top_percent


def count_for_percent(n_neurons: int, top_percent: float) -> int:
    """Number of neurons in the top ``top_percent``% of ``n_neurons`` (at least one)."""
    return max(1, int(round(n_neurons * check_percent(top_percent) / 100.0)))


def _tail_count(n: int, tail_fraction: float) -> int:
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    return max(1, int(round(n * tail_fraction)))


def first_position_share(
    activations, start, rows=None, tail_fraction: float = TAIL_FRACTION, neuron_chunk: int = 64
) -> np.ndarray:
    r"""Share of each neuron's most extreme tokens that start a window.

    With :math:`z_t = (y_t - \bar y) / \sigma` over the kept tokens (``rows``; population
    std), the tail :math:`T_j` is the tokens whose :math:`|z_t|` is at least the ``k``-th
    largest, ``k = max(1, round(tail_fraction · n))`` (every token tied at the threshold
    counts), and :math:`\mathrm{share}_j = |T_j \cap S| / |T_j|` with :math:`S` the tokens
    flagged in ``start``.

    Parameters
    ----------
    activations : np.ndarray or np.memmap, shape ``[tokens, neurons]``
    start : array-like of bool, shape ``[n]``
        Window-start flags of the kept tokens (:attr:`RowSelection.start`).
    rows : np.ndarray of int64, shape ``[n]``, optional
        Kept rows (``None``: all).
    tail_fraction : float
        Share of the tokens in the tail (default 0.1%).
    neuron_chunk : int
        Neurons read at once (``n · neuron_chunk`` float64 values, a few times over).

    Returns
    -------
    np.ndarray
        float64 ``[neurons]`` in [0, 1]; NaN for constant neurons.
    """
    start = np.asarray(start, dtype=bool)
    n, first = len(start), np.flatnonzero(start)
    k = _tail_count(n, tail_fraction)
    parts = []
    for j0 in range(0, activations.shape[1], neuron_chunk):
        blk = activations[:, j0 : j0 + neuron_chunk]
        z = np.array((blk if rows is None else blk[rows]).T, dtype=np.float64, order="C")  # [c, n]
        if z.shape[1] != n:
            raise ValueError(f"start has {n} flags for {z.shape[1]} tokens")
        z -= z.mean(axis=1, keepdims=True)
        std = np.sqrt(np.square(z).sum(axis=1) / n)  # = np.std, population
        with np.errstate(invalid="ignore", divide="ignore"):  # constant neurons: NaN
            np.abs(z, out=z)
            z /= std[:, None]
            at_start = z[:, first]  # [c, n_start], before z is reordered
            z.partition(n - k, axis=1)
            threshold = z[:, n - k, None]
            share = (at_start >= threshold).sum(axis=1) / (z >= threshold).sum(axis=1)
        parts.append(np.where(std > 0, share, np.nan))
    return np.concatenate(parts) if parts else np.zeros(0)


def statistics_table(
    activations, hook: str, method: str = "exact", selection: RowSelection | None = None
) -> pd.DataFrame:
    """Per-neuron statistics of one ``[tokens, neurons]`` block as a DataFrame.

    The statistics are computed on the CPU in neuron chunks (the block may be a memory map).
    With ``selection`` they are those of the kept rows only, and the table gains
    ``first_pos_share`` and ``position_artefact`` (see the module docstring).
    """
    rows = None if selection is None else selection.rows
    stats = neuron_statistics(activations, method=method, rows=rows)
    if selection is not None:
        stats["first_pos_share"] = first_position_share(activations, selection.start, rows)
        stats["position_artefact"] = stats["first_pos_share"] > POSITION_ARTEFACT_SHARE
    n_neurons = len(stats["wd"])
    df = pd.DataFrame(
        {
            "layer": hook_layer(hook),
            "hook": hook,
            "neuron": np.arange(n_neurons),
            **{k: np.asarray(stats[k]) for k in TABLE_COLUMNS[3:] if k in stats},
        }
    )
    return df[[c for c in TABLE_COLUMNS if c in df.columns]]


def rank_store(
    store: ActivationStore,
    method: str = "exact",
    hooks=None,
    progress: bool = True,
    exclude_positions: int = 0,
    exclude_special: bool = False,
) -> pd.DataFrame:
    """One row per (hook, neuron) of the store, with ``wd`` and its per-hook rank.

    Columns: ``layer, hook, neuron, wd, mean, std, skew, kurtosis, n_tokens, constant,
    first_pos_share, position_artefact, wd_rank`` (0 = largest WD within the hook; constant
    neurons rank last). Every statistic leaves out the first ``exclude_positions`` positions
    of each window and, with ``exclude_special``, the special tokens; ``n_tokens`` is the
    number of tokens kept.
    """
    names = store.hook_names if hooks is None else list(hooks)
    selection = store.select(exclude_positions, exclude_special)
    tables = [
        statistics_table(store.array(h), h, method=method, selection=selection)
        for h in tqdm(names, desc=f"W1 ({method})", unit="hook", disable=not progress)
    ]
    df = pd.concat(tables, ignore_index=True)
    df["wd_rank"] = (
        df.groupby("hook")["wd"]
        .rank(ascending=False, method="first", na_option="bottom")
        .astype(int)
        - 1
    )
    return df


def top_neurons(
    df: pd.DataFrame, top_percent: float = 3.0, by: str = "wd", largest: bool = True
) -> pd.DataFrame:
    """The top ``top_percent``% rows of each hook by ``by`` (NaN never selected), best first."""
    if by not in df.columns:
        raise ValueError(f"unknown column {by!r}; columns: {', '.join(df.columns)}")
    parts = []
    for _, group in df.groupby("hook", sort=False):
        k = count_for_percent(len(group), top_percent)
        valid = group.dropna(subset=[by])
        parts.append(valid.nlargest(k, by) if largest else valid.nsmallest(k, by))
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(
        ["layer", "hook", by], ascending=[True, True, not largest], ignore_index=True
    )


def _context(tokenizer, ids: np.ndarray, pos: int, seqlen: int, width: int) -> tuple[str, str]:
    start_of_window = pos - pos % seqlen
    left = ids[max(start_of_window, pos - width) : pos]
    right = ids[pos + 1 : min(start_of_window + seqlen, pos + 1 + width // 2)]
    token = tokenizer.decode([int(ids[pos])])
    text = tokenizer.decode(left.tolist()) + f"[[{token}]]" + tokenizer.decode(right.tolist())
    return token, " ".join(text.split())


def top_activating_contexts(
    store: ActivationStore,
    tokenizer,
    hook: str,
    neurons,
    k: int = 5,
    width: int = 12,
    selection: RowSelection | None = None,
) -> pd.DataFrame:
    """The ``k`` tokens with the highest and the lowest output of each neuron, with context.

    Returns columns ``hook, neuron, tail ("high"|"low"), rank, position, window,
    window_position, value, z, token, context``: ``position`` is the store row, ``window`` and
    ``window_position`` where it sits (``position = window · seqlen + window_position``). The
    context shows up to ``width`` tokens before the token (marked ``[[…]]``) and a few after
    it, never crossing a window boundary. With ``selection`` only its kept rows are candidates
    and ``z`` uses their mean and std.
    """
    ids = store.tokens()
    seqlen = store.seqlen
    rows = None if selection is None else selection.rows
    neurons = np.atleast_1d(np.asarray(neurons, dtype=np.int64))
    block = store.array(hook)[:, np.sort(neurons)]  # one pass over the file
    block = np.asarray(block if rows is None else block[rows], dtype=np.float64)
    columns = dict(zip(np.sort(neurons).tolist(), block.T, strict=True))
    records = []
    for neuron in neurons.tolist():
        column = columns[neuron]
        mean, std = column.mean(), column.std()
        kk = min(k, len(column))
        for tail, order in (("high", -1), ("low", 1)):
            picks = np.argpartition(order * column, kk - 1)[:kk]
            picks = picks[np.argsort(order * column[picks])]
            for rank, pick in enumerate(picks.tolist()):
                pos = pick if rows is None else int(rows[pick])
                token, text = _context(tokenizer, ids, pos, seqlen, width)
                z = (column[pick] - mean) / std if std > 0 else float("nan")
                records.append(
                    dict(
                        hook=hook,
                        neuron=neuron,
                        tail=tail,
                        rank=rank,
                        position=pos,
                        window=pos // seqlen,
                        window_position=pos % seqlen,
                        value=column[pick],
                        z=z,
                        token=token,
                        context=text,
                    )
                )
    return pd.DataFrame(records)
