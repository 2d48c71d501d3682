"""Corpora, splits and windows."""

from __future__ import annotations

import pytest
import torch

from wasserstein_neurons import data
from wasserstein_neurons.data import CorpusError


def test_embedded_split_is_disjoint_and_deterministic():
    docs = data.embedded_documents()
    assert len(docs) > 9000
    cal = data.split_documents(docs, "calibration")
    ev = data.split_documents(docs, "evaluation")
    assert len(cal) + len(ev) == len(docs)
    assert not set(cal) & set(ev)
    assert 0.05 < len(ev) / len(docs) < 0.15
    # independent of dict order
    shuffled = dict(reversed(list(docs.items())))
    assert data.split_documents(shuffled, "evaluation") == ev


def test_text_file_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"document number {i} about topic {i % 7}" for i in range(200)))
    cal = data.load_text(str(path), "calibration")
    ev = data.load_text(str(path), "evaluation")
    cal_docs, ev_docs = set(cal.split("\n\n")), set(ev.split("\n\n"))
    assert cal_docs and ev_docs and not cal_docs & ev_docs
    assert len(cal_docs | ev_docs) == 200


def test_unknown_corpus_and_split():
    with pytest.raises(CorpusError, match="valid: 'embedded', 'wikitext2'"):
        data.load_text("no-such-corpus")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_text("embedded", "train")


def test_wikitext_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match="WikiText-2"):
        data.load_text("wikitext2", "evaluation")


def test_calibration_windows_seeded():
    tokens = torch.arange(10_000)
    a = data.calibration_windows(tokens, 16, 64, seed=3)
    b = data.calibration_windows(tokens, 16, 64, seed=3)
    c = data.calibration_windows(tokens, 16, 64, seed=4)
    assert a.shape == (16, 64) and torch.equal(a, b) and not torch.equal(a, c)
    # each window is a contiguous slice of the corpus
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)


def test_evaluation_windows_non_overlapping():
    tokens = torch.arange(1000)
    w = data.evaluation_windows(tokens, 128)
    assert w.shape == (7, 128)
    assert torch.equal(w.reshape(-1), tokens[:896])
    assert data.evaluation_windows(tokens, 128, max_tokens=300).shape == (2, 128)


def test_sample_windows_distinct():
    tokens = torch.arange(4096)
    w = data.sample_windows(tokens, 1024, 128, seed=0)
    assert w.shape == (8, 128)
    starts = w[:, 0]
    assert len(set(starts.tolist())) == 8 and torch.all(starts % 128 == 0)


@pytest.mark.parametrize(
    "call",
    [
        lambda t: data.calibration_windows(t, 4, 200),
        lambda t: data.evaluation_windows(t, 200),
        lambda t: data.sample_windows(t, 400, 64),
    ],
)
def test_too_short_corpus(call):
    with pytest.raises(CorpusError, match="tokens"):
        call(torch.arange(150))


def test_prepend_bos_keeps_the_window_length(tiny_tokenizer):
    bos = data.bos_token_id(tiny_tokenizer)
    windows = torch.arange(2, 26).reshape(3, 8)
    out = data.prepend_bos(windows, bos)
    assert out.shape == windows.shape and out.dtype == windows.dtype
    assert (out[:, 0] == bos).all()
    assert torch.equal(out[:, 1:], windows[:, :-1])
    with pytest.raises(ValueError, match="seqlen >= 2"):
        data.prepend_bos(torch.zeros(3, dtype=torch.long), bos)


def test_bos_token_id_missing_is_a_clear_error():
    class NoBos:
        bos_token_id = None

    with pytest.raises(ValueError, match="no BOS token"):
        data.bos_token_id(NoBos())
