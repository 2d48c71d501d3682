"""Matplotlib figures. Every function returns a :class:`~matplotlib.figure.Figure`; nothing is
shown or saved unless the caller asks (:func:`save_figure`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.stats import norm


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG and close it; returns the path."""
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _zscore(values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    std = x.std()
    return (x - x.mean()) / std if std > 0 else x - x.mean()


def plot_neuron_histogram(
    values, wd: float | None = None, title: str = "", ax=None, bins: int = 120, color: str = "C0"
):
    """Histogram of one neuron's z-scored outputs ``[tokens]`` with the N(0, 1) density."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
    z = _zscore(values)
    lo, hi = np.percentile(z, [0.05, 99.95])
    lo, hi = min(lo, -4.0), max(hi, 4.0)
    ax.hist(
        z,
        bins=bins,
        range=(lo, hi),
        density=True,
        color=color,
        alpha=0.7,
        label="neuron (z-scored)",
    )
    grid = np.linspace(lo, hi, 400)
    ax.plot(grid, norm.pdf(grid), "k--", lw=1.2, label="N(0, 1)")
    label = title + (f"  WD={wd:.3f}" if wd is not None and np.isfinite(wd) else "")
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("z")
    ax.set_yticks([])
    return fig if fig is not None else ax.figure


def plot_layer_grid(activations, table: pd.DataFrame, hook: str, per_group: int = 3):
    """Top / median / bottom WD neurons of one hook, one row each.

    ``activations`` is the hook's ``[tokens, neurons]`` array; ``table`` the ranking table.
    """
    rows = table[table["hook"] == hook].dropna(subset=["wd"]).sort_values("wd", ascending=False)
    n = len(rows)
    mid = n // 2
    groups = {
        "top": rows.iloc[:per_group],
        "median": rows.iloc[
            max(0, mid - per_group // 2) : max(0, mid - per_group // 2) + per_group
        ],
        "bottom": rows.iloc[-per_group:],
    }
    fig, axes = plt.subplots(3, per_group, figsize=(3.4 * per_group, 7.5), squeeze=False)
    for r, (name, group) in enumerate(groups.items()):
        for c in range(per_group):
            ax = axes[r, c]
            if c >= len(group):
                ax.axis("off")
                continue
            row = group.iloc[c]
            values = np.asarray(activations[:, int(row["neuron"])], dtype=np.float64)
            plot_neuron_histogram(
                values,
                wd=row["wd"],
                ax=ax,
                bins=80,
                title=f"{name}: neuron {int(row['neuron'])}",
                color={"top": "C3", "median": "C0", "bottom": "C2"}[name],
            )
    fig.suptitle(hook)
    fig.tight_layout()
    return fig


def plot_wd_by_layer(table: pd.DataFrame, top_percent: float | None = 3.0):
    """WD distribution of every hook across the model (box plots), with the top-p% cut-off."""
    hooks = list(dict.fromkeys(table.sort_values(["layer", "hook"])["hook"]))
    data = [table.loc[table["hook"] == h, "wd"].dropna().to_numpy() for h in hooks]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(hooks) + 2), 3.8))
    ax.boxplot(data, showfliers=True, flierprops=dict(markersize=2, alpha=0.4))
    if top_percent is not None:
        cut = [np.percentile(d, 100 - top_percent) if len(d) else np.nan for d in data]
        ax.plot(
            np.arange(1, len(hooks) + 1), cut, "r.-", lw=1, label=f"top {top_percent:g}% threshold"
        )
        ax.legend(fontsize=8)
    labels = [h.replace("blocks.", "").replace(".mlp.", " ") for h in hooks]
    ax.set_xticks(np.arange(1, len(hooks) + 1), labels, rotation=90, fontsize=7)
    ax.set_ylabel("W1 to N(0, 1)")
    ax.set_title("Wasserstein distance to a Gaussian, per layer")
    fig.tight_layout()
    return fig


def plot_ablation(results: pd.DataFrame, title: str = ""):
    """Perplexity vs neuron sparsity, one line per strategy; seed spread as a shaded band.

    ``results`` has columns ``strategy, seed, neuron_sparsity, perplexity`` (a ``dense`` row,
    if present, is drawn as a horizontal reference line).
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    dense = results[results["strategy"] == "dense"]
    if len(dense):
        ax.axhline(dense["perplexity"].iloc[0], color="k", ls="--", lw=1, label="dense")
    studied = results[results["strategy"] != "dense"]
    for i, (strategy, group) in enumerate(studied.groupby("strategy", sort=False)):
        stats = group.groupby("neuron_sparsity")["perplexity"].agg(["mean", "min", "max"])
        x = stats.index.to_numpy()
        n_seeds = group["seed"].nunique()
        label = strategy + (f" ({n_seeds} seeds)" if n_seeds > 1 else "")
        ax.plot(x, stats["mean"], "o-", color=f"C{i}", label=label)
        if n_seeds > 1:
            ax.fill_between(x, stats["min"], stats["max"], color=f"C{i}", alpha=0.2)
    ax.set_xlabel("neuron sparsity (fraction of each selected row zeroed)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title or "Sparsifying neuron sets", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
