"""Row selection by window position and special tokens (wasserstein_neurons.positions)."""

from __future__ import annotations

import numpy as np
import pytest

from wasserstein_neurons.positions import (
    check_exclude_positions,
    select_rows,
    special_token_ids,
)


def windows(n_windows=4, seqlen=6, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, 50, size=(n_windows, seqlen)).astype(np.int32)


def test_nothing_excluded_keeps_every_row_and_flags_position_zero():
    tokens = windows()
    sel = select_rows(tokens)
    assert sel.rows is None and sel.n_kept == sel.n_tokens == tokens.size
    assert np.array_equal(np.flatnonzero(sel.start), np.arange(4) * 6)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_exclude_positions_drops_first_n_of_every_window(n):
    tokens = windows()
    sel = select_rows(tokens, exclude_positions=n)
    expected = [w * 6 + p for w in range(4) for p in range(n, 6)]
    assert sel.rows.tolist() == expected and sel.rows.dtype == np.int64
    # the window start is now position n
    assert np.array_equal(sel.rows[sel.start] % 6, np.full(4, n))
    assert np.array_equal(sel.rows[sel.start] // 6, np.arange(4))


def test_exclude_special_drops_those_ids_and_moves_the_window_start():
    tokens = windows()
    tokens[:, 0] = 1  # a BOS in front of every window
    tokens[2, 3] = 2  # an EOS inside window 2
    sel = select_rows(tokens, special_ids=[1, 2, 7])
    flat = tokens.reshape(-1)
    assert not np.isin(flat[sel.rows], [1, 2, 7]).any()
    assert sel.n_kept == tokens.size - 5
    assert np.array_equal(sel.rows[sel.start] % 6, np.ones(4))
    # special ids absent from the windows: nothing excluded
    assert select_rows(windows(), special_ids=[1, 2]).rows is None


def test_a_window_with_nothing_kept_has_no_start():
    tokens = windows(n_windows=2, seqlen=3)
    tokens[0, 1:] = 1
    sel = select_rows(tokens, exclude_positions=1, special_ids=[1])
    assert sel.rows.tolist() == [4, 5] and sel.start.tolist() == [True, False]
    tokens[1, 1:] = 1
    with pytest.raises(ValueError, match="leave no token"):
        select_rows(tokens, exclude_positions=1, special_ids=[1])


@pytest.mark.parametrize("n, message", [(-1, ">= 0"), (6, "smaller than --seqlen"), (1.5, ">= 0")])
def test_bad_exclude_positions(n, message):
    with pytest.raises(ValueError, match=message):
        check_exclude_positions(n, 6)
    with pytest.raises(ValueError, match=message):
        select_rows(windows(), exclude_positions=n)


def test_special_token_ids(tiny_tokenizer):
    ids = special_token_ids(tiny_tokenizer)
    assert ids == sorted(set(tiny_tokenizer.all_special_ids))
    assert tiny_tokenizer.bos_token_id in ids
