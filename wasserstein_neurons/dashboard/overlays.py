"""Expand / disentangle runs on the dashboard: what their run folders say about a neuron.

Both read only the run folders (no model):

* :class:`DisentangleRun` (a ``disentangle`` run of one layer): its ``neurons.csv`` gives every
  neuron of the studied linear its W1(sparse, dense) for SparseGPT and each number of experts
  ``k``, its relative improvement ``ri_k{K}`` of Sparse Expansion over SparseGPT and the
  reconstruction errors; ``top_neuron_outputs.npz`` holds the held-out dense / SparseGPT / SE
  outputs and the expert of every token for the few neurons it plotted, which get the overlaid
  distributions and the outputs split by expert (one colour per expert, with its share of
  tokens).
* :class:`ExpandRun` (an ``expand`` run or grid): perplexity / FLOPs of every model
  (``results.csv``) on the index page, and on a neuron page its layer's per-linear summaries
  (``layers.csv``: experts, cluster sizes, relative output error). An ``expand`` run keeps no
  per-neuron outputs; the page says so and points to ``disentangle``.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..disentangle import NeuronOutputs
from ..runs import read_run_config
from .pages import fmt, grid_table
from .svg import PALETTE, Chart, data_range, group_colors

_K_COLUMN = re.compile(r"^ri_k(\d+)$")
_BINS = 60


def _label(path: Path) -> str:
    """The run folder's path, escaped for HTML."""
    return html.escape(str(path))


def _check_command(path: Path, expected: str) -> dict:
    config = read_run_config(path)
    command = str(config.get("command", ""))
    if not command.startswith(expected):
        raise ValueError(f"{path} is a {command or 'unknown'!r} run folder, not a {expected!r} run")
    if not config.get("finished"):
        raise ValueError(f"the {expected} run in {path} is not finished (config.json)")
    return config


class DisentangleRun:
    """A finished ``disentangle`` run folder, read for the neuron pages."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.label = _label(self.path)
        self.config = _check_command(self.path, "disentangle")
        summary = self.config.get("summary", {})
        self.hook = str(summary.get("hook", ""))
        self.layer = int(summary.get("layer", -1))
        table = pd.read_csv(self.path / "neurons.csv")
        self.table = table.set_index("neuron", drop=False)
        self.ks = sorted(int(m.group(1)) for c in table.columns if (m := _K_COLUMN.match(c)))
        npz = self.path / "top_neuron_outputs.npz"
        self.outputs = NeuronOutputs.load(npz) if npz.is_file() else None

    @property
    def plotted(self) -> list[int]:
        """Neurons whose held-out outputs the run kept."""
        return [] if self.outputs is None else [int(j) for j in self.outputs.neurons]

    def index_section(self, links: dict) -> str:
        """The run's per-``k`` summary and links to its plotted neurons (index page)."""
        per_k = self.path / "per_k.csv"
        cols = [
            "experts",
            "layer_err",
            "median_ri",
            "median_ri_top",
            "median_w1_top",
            "median_w1_all",
            "spearman_ri_wd",
        ]
        table = ""
        if per_k.is_file():
            df = pd.read_csv(per_k)
            table = grid_table(df.to_dict(orient="records"), [c for c in cols if c in df])
        pages = ", ".join(
            f'<a href="{links[(self.hook, n)]}">{n}</a>'
            for n in self.plotted
            if (self.hook, n) in links
        )
        return (
            f'<section class="overlay disentangle"><h2>Disentanglement of layer {self.layer}'
            f'</h2><p class="note">{self.label} ({self.hook}); neurons with output overlays: '
            f"{pages or 'none'}</p>{table}</section>"
        )

    def per_k_rows(self, neuron: int) -> list[dict]:
        """One row per number of experts: error, RI, W1(sparse, dense), cluster-weighted WD."""
        row = self.table.loc[neuron]
        rows = [
            {
                "model": "SparseGPT (k = 1)",
                "rel. error": row.get("err_sparsegpt"),
                "W1(sparse, dense)": row.get("w1_sparse_dense_sparsegpt"),
            }
        ]
        for k in (k for k in self.ks if k > 1):  # SE with one expert is SparseGPT
            rows.append(
                {
                    "model": f"SE k = {k}",
                    "rel. error": row.get(f"err_se_k{k}"),
                    "RI": row.get(f"ri_k{k}"),
                    "W1(sparse, dense)": row.get(f"w1_sparse_dense_k{k}"),
                    "expert-weighted WD": row.get(f"weighted_expert_wd_k{k}"),
                }
            )
        return rows

    def section(self, hook: str, neuron: int) -> str:
        """The disentangle part of a neuron page ('' for another hook or an unknown neuron)."""
        if hook != self.hook or neuron not in self.table.index:
            return ""
        rows = self.per_k_rows(neuron)
        cols = ["model", "rel. error", "RI", "W1(sparse, dense)", "expert-weighted WD"]
        charts = [self._w1_chart(rows)]
        if neuron in self.plotted:
            charts += self._output_charts(self.plotted.index(neuron))
        else:
            charts.append(
                '<p class="note">This run kept the held-out outputs of neurons '
                f"{', '.join(map(str, self.plotted)) or 'none'} only (--plot-neurons); the "
                "distribution overlays appear on their pages.</p>"
            )
        sparsity = self.config.get("config", {}).get("sparsity")
        return (
            f'<section class="overlay disentangle"><h2>Sparse Expansion (disentangle run, '
            f"sparsity {fmt(sparsity)})</h2>"
            f'<p class="note">{self.label}: held-out tokens of layer {self.layer}; RI = relative '
            "improvement of SE's reconstruction error over SparseGPT's.</p>"
            f'{grid_table(rows, cols)}<div class="charts">{"".join(charts)}</div></section>'
        )

    def _w1_chart(self, rows: list[dict]) -> str:
        ks = [1] + [k for k in self.ks if k > 1]
        w1 = [r["W1(sparse, dense)"] for r in rows]
        chart = Chart(
            xlim=data_range(ks),
            ylim=(0.0, data_range(w1)[1]),
            width=300,
            xlabel="experts k (1 = SparseGPT)",
            ylabel="W1(sparse, dense)",
            title="W1 to the dense outputs vs k",
        )
        chart.line(ks, w1, color=PALETTE[0])
        chart.points(ks, w1, color=PALETTE[0], r=3)
        return chart.svg(css_class="chart w1k", label="W1(sparse, dense) per number of experts")

    def _output_charts(self, col: int) -> list[str]:
        o = self.outputs
        k_max = max(o.se) if o.se else None
        dense = o.dense[:, col].astype(np.float64)
        series = {"SparseGPT": o.sparsegpt[:, col]}
        if k_max is not None and k_max > 1:
            series[f"SE k={k_max}"] = o.se[k_max][:, col]
        lo, hi = np.quantile(np.concatenate([dense, *series.values()]), [0.0005, 0.9995])
        edges = np.linspace(lo, hi, _BINS + 1)
        counts = np.histogram(np.clip(dense, lo, hi), bins=edges)[0]
        other = {k: np.histogram(np.clip(v, lo, hi), bins=edges)[0] for k, v in series.items()}
        top = max(counts.max(), *(c.max() for c in other.values()))
        chart = Chart(
            xlim=(lo, hi),
            ylim=(0, top * 1.08),
            xlabel="output",
            ylabel="tokens",
            title="dense vs sparse outputs (held-out)",
        )
        chart.bars(edges, counts, color="#999", label="dense")
        for i, (name, c) in enumerate(other.items()):
            chart.line(edges, c, color=PALETTE[i + 1], step=True, label=name)
        charts = [chart.svg(css_class="chart overlay-dist", label="dense vs sparse outputs")]
        if k_max is not None and k_max > 1:
            charts.append(self._by_expert(dense, o.labels[k_max], k_max, edges))
        return charts

    def _by_expert(self, dense, labels, k: int, edges) -> str:
        colors = group_colors(k)
        clipped = np.clip(dense, edges[0], edges[-1])
        counts = np.stack([np.histogram(clipped[labels == e], bins=edges)[0] for e in range(k)])
        chart = Chart(
            xlim=(edges[0], edges[-1]),
            ylim=(0, counts.sum(0).max() * 1.08),
            xlabel="dense output",
            ylabel="tokens",
            title=f"dense outputs by expert (k={k})",
        )
        chart.stacked_bars(edges, counts, colors)
        shares = np.bincount(labels, minlength=k) / max(1, len(labels))
        legend = "".join(
            f'<span style="color:{c}">■</span> expert {e}: {s:.1%} '
            for e, (c, s) in enumerate(zip(colors, shares, strict=True))
        )
        svg = chart.svg(css_class="chart by-expert", label="outputs by expert")
        return f'<div>{svg}<div class="note">{legend}</div></div>'


class ExpandRun:
    """A finished ``expand`` run folder (single setting or grid)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.label = _label(self.path)
        self.config = _check_command(self.path, "expand")
        self.results = pd.read_csv(self.path / "results.csv", dtype={"pattern": str})
        layers = self.path / "layers.csv"
        self.layers = pd.read_csv(layers, dtype={"pattern": str}) if layers.is_file() else None

    def index_section(self) -> str:
        """Perplexity and cost of every model of the run (index page)."""
        cols = ["method", "experts", "pattern", "perplexity", "relative_flops", "relative_params"]
        cols = [c for c in cols if c in self.results.columns]
        return (
            '<section class="overlay expand"><h2>Sparse Expansion run</h2>'
            f'<p class="note">{self.label}</p>'
            f"{grid_table(self.results.to_dict(orient='records'), cols)}</section>"
        )

    def section(self, layer: int) -> str:
        """The layer's per-linear summaries of every model of the run (neuron page)."""
        if self.layers is None or "layer" not in self.layers.columns:
            return ""
        rows = self.layers[self.layers["layer"] == layer]
        if not len(rows):
            return ""
        cols = [
            "method",
            "experts",
            "pattern",
            "role",
            "sparsity",
            "rel_error",
            "cluster_min",
            "cluster_max",
        ]
        cols = [c for c in cols if c in rows.columns]
        return (
            f'<section class="overlay expand"><h2>Sparse Expansion of layer {layer} (expand run)'
            f'</h2><p class="note">Per linear of this layer ({self.label}); the expand run keeps '
            "no per-neuron outputs: a <code>disentangle --layer</code> run adds this neuron's "
            f"distributions.</p>{grid_table(rows.to_dict(orient='records'), cols)}</section>"
        )
