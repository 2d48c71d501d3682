"""Per-neuron tables and the selection of Wasserstein neurons.

:func:`rank_store` turns an :class:`~wasserstein_neurons.capture.ActivationStore` into one row
per (hook, neuron) with the neuron's W1 distance to N(0, 1) after z-scoring (``wd``) and its
shape statistics. :func:`top_neurons` keeps the top ``p``% by WD *within each hook* (the paper's
Wasserstein neurons, p = 3). :func:`top_activating_contexts` shows which tokens drive a neuron to
either tail of its distribution.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .capture import ActivationStore, hook_layer
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
]


def check_percent(top_percent: float) -> float:
    """Validate a per-layer percentage in (0, 100]."""
    top_percent = float(top_percent)
    if not (0.0 < top_percent <= 100.0) or math.isnan(top_percent):
        raise ValueError(f"top_percent must be in (0, 100], got {top_percent}")
    return top_percent


def count_for_percent(n_neurons: int, top_percent: float) -> int:
    """Number of neurons in the top ``top_percent``% of ``n_neurons`` (at least one)."""
    return max(1, int(round(n_neurons * check_percent(top_percent) / 100.0)))


def statistics_table(activations, hook: str, method: str = "exact") -> pd.DataFrame:
    """Per-neuron statistics of one ``[tokens, neurons]`` block as a DataFrame.

    The statistics are computed on the CPU in neuron chunks (the block may be a memory map).
    """
    stats = neuron_statistics(activations, method=method)
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
    store: ActivationStore, method: str = "exact", hooks=None, progress: bool = True
) -> pd.DataFrame:
    """One row per (hook, neuron) of the store, with ``wd`` and its per-hook rank.

    Columns: ``layer, hook, neuron, wd, mean, std, skew, kurtosis, n_tokens, constant,
    wd_rank`` (0 = largest WD within the hook; constant neurons rank last).
    """
    names = store.hook_names if hooks is None else list(hooks)
    tables = [
        statistics_table(store.array(h), h, method=method)
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
    store: ActivationStore, tokenizer, hook: str, neurons, k: int = 5, width: int = 12
) -> pd.DataFrame:
    """The ``k`` tokens with the highest and the lowest output of each neuron, with context.

    Returns columns ``hook, neuron, tail ("high"|"low"), rank, position, value, z, token,
    context``; the context shows up to ``width`` tokens before the token (marked ``[[…]]``) and
    a few after it, never crossing a window boundary.
    """
    acts = store.array(hook)
    ids = store.tokens()
    seqlen = int(store.meta["seqlen"])
    neurons = np.atleast_1d(np.asarray(neurons, dtype=np.int64))
    block = np.asarray(acts[:, np.sort(neurons)], dtype=np.float64)  # one pass over the file
    columns = dict(zip(np.sort(neurons).tolist(), block.T, strict=True))
    rows = []
    for neuron in neurons.tolist():
        column = columns[neuron]
        mean, std = column.mean(), column.std()
        kk = min(k, len(column))
        for tail, order in (("high", -1), ("low", 1)):
            picks = np.argpartition(order * column, kk - 1)[:kk]
            picks = picks[np.argsort(order * column[picks])]
            for rank, pos in enumerate(picks.tolist()):
                token, text = _context(tokenizer, ids, pos, seqlen, width)
                z = (column[pos] - mean) / std if std > 0 else float("nan")
                rows.append(
                    dict(
                        hook=hook,
                        neuron=neuron,
                        tail=tail,
                        rank=rank,
                        position=pos,
                        value=column[pos],
                        z=z,
                        token=token,
                        context=text,
                    )
                )
    return pd.DataFrame(rows)
