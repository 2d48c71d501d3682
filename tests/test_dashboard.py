"""Unit tests of the dashboard's pieces: neuron data, SVG charts, pages, records."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import jsonschema
import numpy as np
import pytest
from scipy.stats import norm

from wasserstein_neurons.dashboard import SCHEMA, neuron_data, neuron_record, neuron_view
from wasserstein_neurons.dashboard.neuron import HIST_BINS, QUANTILE_LEVELS, TokenDecoder
from wasserstein_neurons.dashboard.pages import histogram_svgs, qq_svg
from wasserstein_neurons.dashboard.svg import Chart, nice_ticks

SEQLEN = 64


def _data(values, rows=None, **kw):
    n = len(values)
    ids = np.arange(n) % 50
    stats = {"hook": "blocks.3.mlp.hook_pre", "layer": 3, "neuron": 7, "wd": 0.1, "wd_rank": 2}
    decode = lambda ids: [f"t{int(i)}" for i in ids]  # noqa: E731
    return neuron_data(values, ids, SEQLEN, stats, decode, rows=rows, **kw)


def test_histogram_and_qq_of_a_gaussian_sample():
    rng = np.random.default_rng(0)
    data = _data(rng.standard_normal(SEQLEN * 200).astype(np.float32))
    assert data.counts.sum() == data.n == SEQLEN * 200 and len(data.edges) == HIST_BINS + 1
    assert data.edges[0] <= -4 and data.edges[-1] >= 4
    assert data.expected.sum() == pytest.approx(
        data.n * (norm.cdf(data.edges[-1]) - norm.cdf(data.edges[0]))
    )
    # a Gaussian sample's Q-Q points sit on the identity line, away from the extreme tails
    inner = np.abs(data.qq_theory) < 2.5
    np.testing.assert_allclose(data.qq_sample[inner], data.qq_theory[inner], atol=0.08)
    assert np.all(np.diff(data.qq_sample) >= 0) and np.all(np.diff(data.qq_theory) > 0)


def test_records_tails_and_quantile_bins():
    rng = np.random.default_rng(1)
    values = rng.standard_exponential(SEQLEN * 20).astype(np.float32)
    rows = np.flatnonzero(np.arange(len(values)) % SEQLEN != 0)  # window starts left out
    data = _data(values, rows=rows, k=5, per_quantile=3, before=4, after=2)
    kept = values[rows]
    assert [r.value for r in data.top] == pytest.approx(np.sort(kept)[::-1][:5])
    assert [r.value for r in data.bottom] == pytest.approx(np.sort(kept)[:5])
    for rec in data.top + data.bottom + data.random:
        assert rec.position % SEQLEN != 0  # only kept rows are chosen
        lo = rec.position - rec.target
        assert rec.activations == pytest.approx(values[lo : lo + len(rec.tokens)].tolist())
        assert lo // SEQLEN == rec.window == (lo + len(rec.tokens) - 1) // SEQLEN  # one window
        assert rec.target <= 4 and len(rec.tokens) - rec.target - 1 <= 2
    assert len(data.by_quantile) == len(QUANTILE_LEVELS) - 1
    for b, recs in enumerate(data.by_quantile):
        assert len(recs) == 3
        for rec in recs:
            assert data.quantile_boundaries[b] <= rec.value <= data.quantile_boundaries[b + 1]
    assert data.quantile_boundaries[-1] == pytest.approx(kept.max())
    again = _data(values, rows=rows, k=5, per_quantile=3, before=4, after=2)
    assert [r.position for b in again.by_quantile for r in b] == [
        r.position for b in data.by_quantile for r in b
    ]


def test_svgs_parse_and_neuron_view_escapes_tokens():
    rng = np.random.default_rng(2)
    data = _data(np.concatenate([rng.standard_normal(SEQLEN * 10), [30.0]]).astype(np.float32))
    for svg in [*histogram_svgs(data), qq_svg(data)]:
        root = ET.fromstring(svg)
        assert root.tag.endswith("svg")
    data.top[0].tokens[0] = "<b>&"
    html = neuron_view(data)
    assert "&lt;b&gt;&amp;" in html and "<b>&" not in html
    jsonschema.validate(neuron_record(data), SCHEMA)


def test_log_axis_keeps_only_positive_counts():
    chart = Chart(xlim=(0, 3), ylim=(0.5, 1000), log_y=True)
    chart.bars(np.array([0, 1, 2, 3]), np.array([0, 10, 1000]))
    svg = chart.svg()
    assert svg.count("<rect") == 1 + 2  # the frame and two bars; the empty bin is skipped
    ET.fromstring(svg)


def test_nice_ticks_and_decoder_cache():
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(-4.3, 21.0) == [0, 10, 20]

    class Tok:
        calls = 0

        def decode(self, ids):
            Tok.calls += 1
            return f"<{ids[0]}>"

    dec = TokenDecoder(Tok())
    assert dec([1, 2, 1, 1]) == ["<1>", "<2>", "<1>", "<1>"] and Tok.calls == 2


def test_a_constant_neuron_still_gets_a_page():
    data = _data(np.full(SEQLEN * 4, 0.25, dtype=np.float32))
    assert data.std == 0 and data.counts.sum() == data.n
    data.stats.update(wd=float("nan"), skew=float("nan"), kurtosis=float("nan"))
    record = neuron_record(data)
    jsonschema.validate(record, SCHEMA)
    assert record["wasserstein_neurons"]["wd"] is None and record["skewness"] is None
    assert "style=--a:0.00" in neuron_view(data)
