"""The dashboard's index page: the run, the per-layer WD profile and the neuron table.

The table lists the Wasserstein neurons (the run's ``is_top`` rows); every row links to its
neuron page and carries its values in ``data-v`` attributes, which ``static/report.js`` sorts
(click a header) and filters (layer, minimum WD). A ``<script type="application/json"
id="pages">`` maps ``"<layer>_<neuron>"`` to each page's address for the "layer:neuron" search.
"""

from __future__ import annotations

import html
import json

import numpy as np
import pandas as pd

from .pages import fmt, kv_table, page
from .svg import PALETTE, Chart

#: Columns of the neuron table: (table column, header).
TABLE_COLUMNS = (
    ("layer", "layer"),
    ("neuron", "neuron"),
    ("wd", "WD"),
    ("wd_rank", "wd_rank"),
    ("skew", "skew"),
    ("kurtosis", "kurtosis"),
    ("mean", "mean"),
    ("std", "std"),
    ("first_pos_share", "first_pos_share"),
    ("position_artefact", "artefact"),
)


def _kind(hook: str) -> str:
    return hook.rsplit(".", 1)[-1]


def wd_profile_svg(table: pd.DataFrame) -> str:
    """Per-layer median WD, the Wasserstein neurons' threshold (their smallest WD) and the max."""
    stats = []
    for hook, g in table.groupby("hook", sort=False):
        wd = g["wd"].dropna()
        top = g.loc[g["is_top"].astype(bool), "wd"].dropna() if "is_top" in g else wd[:0]
        stats.append(
            (
                _kind(hook),
                int(g["layer"].iloc[0]),
                wd.median(),
                top.min() if len(top) else np.nan,
                wd.max(),
            )
        )
    df = pd.DataFrame(stats, columns=["kind", "layer", "median", "threshold", "max"])
    layers = df["layer"].to_numpy()
    hi = float(np.nanmax(df["max"])) if len(df) else 1.0
    chart = Chart(
        xlim=(float(layers.min()) - 0.5, float(layers.max()) + 0.5) if len(df) else (0, 1),
        ylim=(0.0, hi * 1.08 if hi > 0 else 1.0),
        width=720,
        height=260,
        xlabel="layer",
        ylabel="WD",
        title="WD per layer",
    )
    kinds = df["kind"].unique().tolist()
    for i, (col, name) in enumerate(
        (("max", "max"), ("threshold", "Wasserstein threshold"), ("median", "median"))
    ):
        for j, kind in enumerate(kinds):
            part = df[df["kind"] == kind].sort_values("layer")
            label = name if len(kinds) == 1 else f"{name} ({kind})"
            chart.line(
                part["layer"],
                part[col],
                color=PALETTE[i],
                dash="" if j == 0 else "4 3",
                label=label,
            )
            chart.points(part["layer"], part[col], color=PALETTE[i], r=2.2)
    return chart.svg(css_class="chart wd-profile", label="WD per layer")


def _cell(value) -> str:
    """A table cell whose `data-v` holds the value the script sorts by."""
    if isinstance(value, bool | np.bool_):
        data = int(bool(value))
    elif isinstance(value, float | np.floating) and not np.isfinite(value):
        data = ""
    else:
        data = value
    return f'<td data-v="{html.escape(str(data), quote=True)}">{fmt(value)}</td>'


def neuron_table(top: pd.DataFrame, links: dict[tuple[str, int], str]) -> str:
    """The sortable / filterable table of Wasserstein neurons."""
    head = "".join(f'<th data-key="{k}">{html.escape(h)}</th>' for k, h in TABLE_COLUMNS)
    rows = []
    for rec in top.to_dict(orient="records"):
        href = links.get((rec["hook"], int(rec["neuron"])))
        cells = []
        for key, _ in TABLE_COLUMNS:
            value = rec.get(key)
            if key == "neuron" and href:
                cells.append(f'<td data-v="{int(value)}"><a href="{href}">{int(value)}</a></td>')
            else:
                cells.append(_cell(value))
        rows.append(
            f'<tr data-layer="{int(rec["layer"])}" data-wd="{rec["wd"]:.6g}">{"".join(cells)}</tr>'
        )
    return (
        f'<table class="grid" id="neurons"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _controls(layers: list[int]) -> str:
    options = "".join(f'<option value="{lay}">{lay}</option>' for lay in layers)
    return (
        '<form id="search-form" class="controls"><label>Go to neuron '
        '<input id="search" placeholder="layer:neuron, e.g. 5:123" size="22"></label>'
        '<button type="submit">open</button><span id="search-msg" class="warn"></span></form>'
        '<div class="controls"><label>Layer <select id="layer-filter"><option value="">all'
        f"</option>{options}</select></label>"
        '<label>WD at least <input id="wd-min" type="number" step="0.01" size="6"></label>'
        '<span id="shown" class="note"></span></div>'
    )


def run_pairs(config: dict) -> list[tuple[str, object]]:
    """Model, corpus, tokens and settings of a rank run's ``config.json``."""
    model = config.get("model") or {}
    corpus = config.get("corpus") or {}
    settings = config.get("config") or {}
    pairs = [
        ("model", model.get("name") if isinstance(model, dict) else model),
        ("architecture", model.get("family") if isinstance(model, dict) else None),
        ("corpus", f"{corpus.get('name')} ({corpus.get('split')} split)"),
        ("tokens captured", config.get("n_tokens")),
        ("tokens kept in the statistics", config.get("n_tokens_kept")),
    ]
    keys = (
        "hooks",
        "seqlen",
        "top_percent",
        "method",
        "seed",
        "exclude_positions",
        "exclude_special",
        "bos",
        "store_dtype",
    )
    return pairs + [(k, settings.get(k)) for k in keys if k in settings]


def index_page(
    config: dict,
    table: pd.DataFrame,
    links: dict[tuple[str, int], str],
    search: dict[str, str],
    extra: list[tuple[str, int]] = (),
    sections: list[str] = (),
) -> str:
    """The whole index page."""
    top = table[table["is_top"].astype(bool)].sort_values(["layer", "wd"], ascending=[True, False])
    layers = sorted(int(v) for v in top["layer"].unique())
    pct = (config.get("config") or {}).get("top_percent")
    others = "".join(
        f'<li><a href="{links[(h, n)]}">layer {int(h.split(".")[1])} neuron {n}</a> ({h})</li>'
        for h, n in extra
        if (h, n) in links and not ((top["hook"] == h) & (top["neuron"] == n)).any()
    )
    body = (
        f"<h1>Wasserstein neurons of {html.escape(str(run_pairs(config)[0][1]))}</h1>"
        f"{kv_table(run_pairs(config))}<h2>WD profile</h2>{wd_profile_svg(table)}"
        f"{''.join(sections)}"
        f"<h2>Wasserstein neurons (top {fmt(pct)}% of each layer: {len(top)})</h2>"
        f"{_controls(layers)}{neuron_table(top, links)}"
        + (f"<h2>Other neuron pages</h2><ul>{others}</ul>" if others else "")
        + f'<script type="application/json" id="pages">{json.dumps(search)}</script>'
    )
    return page("Wasserstein neurons", body, depth=0, script=True)
