"""HTML of the dashboard: the neuron view (site page and notebook cell) and its parts.

Everything is rendered here, in Python, to plain HTML and inline SVG, so a neuron page needs
neither JavaScript nor a network to display (the index page's sorting, filtering and search
use the small ``static/report.js``). Token shading: every context token is a
``<span class=p|n style=--a:… data-a=…>`` (unquoted attributes keep a page of ~500 tokens
small) whose ``data-a`` is the neuron's stored output on that token (5 significant digits),
the class ``p`` / ``n`` the sign of its z-score over the run's kept tokens (red / blue) and
``--a = |z| / max |z|`` over every token on the page (the page says that maximum); the chosen
token of a record also has class ``x``.
"""

from __future__ import annotations

import html
import math
from importlib import resources

import numpy as np

from .neuron import ActivationRecord, NeuronData
from .svg import PALETTE, Chart, data_range

_esc = html.escape


def static_text(name: str) -> str:
    """The text of a file of the package's ``static/`` folder (CSS, JavaScript)."""
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def fmt(v, digits: int = 4) -> str:
    """A table cell: ``digits`` significant digits, ``–`` for missing / NaN."""
    if v is None:
        return "–"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return "–" if not math.isfinite(v) else f"{float(v):.{digits}g}"
    return _esc(str(v))


def kv_table(pairs) -> str:
    """A two-column key / value table."""
    rows = "".join(f"<tr><th>{_esc(str(k))}</th><td>{fmt(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def grid_table(rows: list[dict], columns: list[str], css_id: str = "") -> str:
    """A bordered table of ``rows`` (dicts) with the given ``columns``."""
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    attr = f' id="{css_id}"' if css_id else ""
    return f'<table class="grid"{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ------------------------------------------------------------------------------------ charts


def histogram_svgs(data: NeuronData) -> list[str]:
    """The z-scored histogram against N(0, 1) on a linear and on a log count axis."""
    centers = (data.edges[:-1] + data.edges[1:]) / 2
    out = []
    for log in (False, True):
        top = max(float(data.counts.max()), float(data.expected.max()))
        ylim = (0.5, top * 2.0) if log else (0.0, top * 1.08)
        chart = Chart(
            xlim=(float(data.edges[0]), float(data.edges[-1])),
            ylim=ylim,
            log_y=log,
            xlabel="z = (y − mean) / std",
            ylabel="tokens" + (" (log)" if log else ""),
            title="z-scored outputs, " + ("log" if log else "linear") + " count axis",
        )
        chart.bars(data.edges, data.counts, color=PALETTE[3], label="neuron")
        chart.line(centers, data.expected, color="#000", dash="4 3", label="N(0, 1)")
        kind = "log" if log else "linear"
        out.append(chart.svg(css_class=f"chart hist-{kind}", label=f"histogram ({kind} counts)"))
    return out


def qq_svg(data: NeuronData) -> str:
    """Sorted z-scores against the N(0, 1) quantiles, with the identity line."""
    lo, hi = data_range(data.qq_theory, data.qq_sample)
    chart = Chart(
        xlim=data_range(data.qq_theory),
        ylim=(lo, hi),
        width=300,
        xlabel="N(0, 1) quantile",
        ylabel="neuron z quantile",
        title="Q–Q plot",
    )
    grid = np.array(chart.xlim)
    chart.line(grid, grid, color="#888", dash="4 3")
    chart.points(data.qq_theory, data.qq_sample, color=PALETTE[3])
    return chart.svg(css_class="chart qq", label="Q-Q plot against N(0, 1)")


# ------------------------------------------------------------------------------------ tokens


def _token_text(tok: str) -> str:
    return _esc(tok.replace("\n", "↵").replace("\r", "").replace("\t", "→"))


def context_html(rec: ActivationRecord, mean: float, std: float, zmax: float) -> str:
    """One record: its output on the chosen token, then every token shaded by its output."""
    spans = []
    for i, (tok, a) in enumerate(zip(rec.tokens, rec.activations, strict=True)):
        z = (a - mean) / std if std > 0 else 0.0
        shade = min(1.0, abs(z) / zmax) if zmax > 0 else 0.0
        cls = "p" if z >= 0 else "n"
        cls = f'"{cls} x"' if i == rec.target else cls
        spans.append(
            f"<span class={cls} style=--a:{shade:.2f} data-a={a:.5g}>{_token_text(tok)}</span>"
        )
    zt = (rec.value - mean) / std if std > 0 else float("nan")
    label = (
        f'<span class="v" title="window {rec.window}, position {rec.start + rec.target}">'
        f"{rec.value:.4g} (z {zt:+.2f}) w{rec.window}·p{rec.start + rec.target}</span>"
    )
    return f'<div class="ctx" data-position="{rec.position}">{label}{"".join(spans)}</div>'


def _zmax(data: NeuronData) -> float:
    records = data.top + data.bottom + [r for b in data.by_quantile for r in b]
    acts = np.array([a for r in records for a in r.activations], dtype=np.float64)
    if not len(acts) or data.std <= 0:
        return 0.0
    return float(np.abs((acts - data.mean) / data.std).max())


def contexts_section(data: NeuronData) -> str:
    """The top-k records at both tails and the quantile-binned records."""
    zmax = _zmax(data)
    ctx = lambda recs: "".join(context_html(r, data.mean, data.std, zmax) for r in recs)  # noqa: E731
    parts = [
        "<h2>Contexts</h2>",
        f'<p class="note">Every token is shaded by this neuron\'s output on it: red above the '
        f"mean, blue below, full colour at |z| = {zmax:.3g} (the largest |z| on this page); the "
        "outlined token is the one the context was chosen for. Hover a token for its output.</p>",
        f"<h3>Highest outputs (top {len(data.top)})</h3>"
        f'<div class="tail high">{ctx(data.top)}</div>',
        f"<h3>Lowest outputs (bottom {len(data.bottom)})</h3>"
        f'<div class="tail low">{ctx(data.bottom)}</div>',
        "<h3>Across the distribution (random tokens from each quantile bin)</h3>",
    ]
    levels, bounds = data.quantile_levels, data.quantile_boundaries
    for i, recs in enumerate(data.by_quantile):
        parts.append(
            f'<div class="qbin"><div class="note">quantiles {levels[i]:g}–{levels[i + 1]:g} '
            f"(outputs {bounds[i]:.4g} … {bounds[i + 1]:.4g})</div>{ctx(recs)}</div>"
        )
    return "".join(parts)


# ------------------------------------------------------------------------------------ views


def stats_pairs(data: NeuronData) -> list[tuple[str, object]]:
    """The statistics table of a neuron page."""
    s = data.stats
    rank = s.get("wd_rank")
    size = s.get("layer_neurons")
    rank_text = (
        "–" if rank is None else f"{int(rank) + 1} of {size}" if size else str(int(rank) + 1)
    )
    return [
        ("hook", data.hook),
        ("WD (W1 to N(0, 1))", s.get("wd")),
        ("WD rank in its layer", rank_text),
        ("Wasserstein neuron", s.get("is_top")),
        ("mean", data.mean),
        ("std", data.std),
        ("skew", s.get("skew")),
        ("kurtosis (excess)", s.get("kurtosis")),
        ("tokens", data.n),
        ("first_pos_share", s.get("first_pos_share")),
        ("position_artefact", s.get("position_artefact")),
    ]


def neuron_view(data: NeuronData) -> str:
    """The neuron view (without page chrome): statistics, charts, overlays, contexts."""
    charts = "".join(histogram_svgs(data)) + qq_svg(data)
    overlays = "".join(data.overlays.values())
    return (
        f'<div class="neuron" data-layer="{data.layer}" data-neuron="{data.neuron}">'
        f"<h1>Layer {data.layer} neuron {data.neuron}</h1>{kv_table(stats_pairs(data))}"
        f'<h2>Distribution</h2><div class="charts">{charts}</div>'
        f"{overlays}{contexts_section(data)}</div>"
    )


def page(title: str, body: str, depth: int = 0, script: bool = False) -> str:
    """A standalone HTML page linking the site's stylesheet (``depth``: folders below root)."""
    up = "../" * depth
    js = f'<script src="{up}static/report.js"></script>' if script else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title>"
        f'<link rel="stylesheet" href="{up}static/report.css"></head>'
        f'<body><div class="wn">{body}</div>{js}</body></html>'
    )


def neuron_page(data: NeuronData) -> str:
    """A neuron's page of the site (in ``neurons/``), with links back to the index."""
    nav = (
        '<p><a href="../index.html" id="back">← all Wasserstein neurons</a> · '
        f'<a href="{data.page_id}.json">neuron record (JSON)</a></p>'
    )
    return page(f"L{data.layer} N{data.neuron}", nav + neuron_view(data), depth=1)


class InlineHTML(str):
    """An HTML string that Jupyter displays as HTML (``_repr_html_``)."""

    def _repr_html_(self) -> str:
        return str(self)


def inline_view(data: NeuronData) -> InlineHTML:
    """The neuron view with its stylesheet inlined (a notebook cell's HTML output)."""
    css = static_text("report.css")
    return InlineHTML(f'<div class="wn"><style>{css}</style>{neuron_view(data)}</div>')
