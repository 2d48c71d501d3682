r"""Where each token sits in its window, and which rows a statistic keeps.

A batch of windows ``[n_windows, seqlen]`` (the activation store's ``tokens.npy``, or the
calibration / evaluation windows of a workflow) is flattened to rows ``t = w · seqlen + p``:
token ``t`` is position ``p`` of window ``w``. Everything here is derived from those token ids
and ``seqlen``, so nothing per token is ever stored and the arrays built are plain numpy
integers / booleans (the row indices are 8 bytes a token: 256 KiB for the default 32,768).

Row filters
-----------
``exclude_positions = N`` leaves out positions ``0 … N-1`` of every window (the first-position
/ attention-sink tokens; with a prepended BOS, ``N = 1`` leaves out exactly the BOS);
``exclude_special`` leaves out every token whose id is one of the tokenizer's special ids
(BOS, EOS, pad, …, :func:`special_token_ids`). The kept rows ``K`` are sorted; a statistic of
an activation block ``x: [n_tokens, d]`` "with exclusions" is the statistic of ``x[K]``.

Window start
------------
The *window-start* token of a window is its first kept token: position 0 by default, position
``N`` with ``exclude_positions = N`` (and the first token after BOS when BOS is excluded as a
special token). The ranking's ``first_pos_share`` counts these tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "RowSelection",
    "check_exclude_positions",
    "select_rows",
    "special_token_ids",
]


def check_exclude_positions(exclude_positions: int, seqlen: int) -> int:
    """Validate ``0 <= exclude_positions < seqlen`` (a window keeps at least one position)."""
    if int(exclude_positions) != exclude_positions or exclude_positions < 0:
        raise ValueError(f"--exclude-positions must be an integer >= 0, got {exclude_positions}")
    if exclude_positions >= seqlen:
        raise ValueError(
            f"--exclude-positions ({exclude_positions}) must be smaller than --seqlen "
            f"({seqlen}): it would leave out every token of every window"
        )
    return int(exclude_positions)


def special_token_ids(tokenizer) -> list[int]:
    """Sorted ids of the tokenizer's special tokens (BOS, EOS, pad, unk, … when defined)."""
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return sorted({int(i) for i in ids if i is not None})


@dataclass(frozen=True)
class RowSelection:
    """The rows a statistic keeps, and which of them start a window.

    Attributes
    ----------
    rows : np.ndarray or None
        Sorted int64 row indices ``[n_kept]``; ``None`` means every row (nothing excluded), so
        that callers keep their unfiltered code path and its numbers bit for bit.
    start : np.ndarray
        bool ``[n_kept]``, aligned with ``rows`` (with every row when ``rows`` is None): True
        for the first kept token of its window.
    n_tokens : int
        Rows before selection (``n_windows · seqlen``).
    """

    rows: np.ndarray | None
    start: np.ndarray
    n_tokens: int

    @property
    def n_kept(self) -> int:
        return self.n_tokens if self.rows is None else len(self.rows)


def _keep_mask(tokens: np.ndarray, exclude_positions: int, special_ids) -> np.ndarray:
    """bool ``[n_windows, seqlen]``: True for the tokens the statistics keep."""
    keep = np.ones(tokens.shape, dtype=bool)
    keep[:, :exclude_positions] = False
    if special_ids:
        keep &= ~np.isin(tokens, np.asarray(list(special_ids), dtype=tokens.dtype))
    return keep


def select_rows(tokens, exclude_positions: int = 0, special_ids=None) -> RowSelection:
    """The rows of ``tokens`` left after the exclusions, and their window-start flags.

    Parameters
    ----------
    tokens : array-like of int, shape ``[n_windows, seqlen]``
        Token ids of the windows (row ``w · seqlen + p`` is window ``w``, position ``p``).
    exclude_positions : int
        Leave out positions ``0 … exclude_positions - 1`` of every window.
    special_ids : iterable of int, optional
        Leave out the tokens with these ids (``None`` or empty: none).

    Returns
    -------
    RowSelection
        ``rows`` is None when no token is left out.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_windows, seqlen], got shape {tuple(tokens.shape)}")
    n_windows, seqlen = tokens.shape
    keep = _keep_mask(tokens, check_exclude_positions(exclude_positions, seqlen), special_ids)
    first = keep.argmax(axis=1)  # first kept position of each window
    start = np.zeros_like(keep)
    start[np.arange(n_windows), first] = keep[np.arange(n_windows), first]
    if keep.all():
        return RowSelection(rows=None, start=start.reshape(-1), n_tokens=tokens.size)
    rows = np.flatnonzero(keep.reshape(-1)).astype(np.int64)
    if len(rows) == 0:
        raise ValueError("the exclusions leave no token: every position is excluded or special")
    return RowSelection(rows=rows, start=start.reshape(-1)[rows], n_tokens=tokens.size)
