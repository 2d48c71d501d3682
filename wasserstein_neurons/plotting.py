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


def _own_axes(ax, figsize: tuple[float, float]):
    """``(fig, ax)``: a new figure and axes when ``ax`` is None, else ``(None, ax)``."""
    if ax is not None:
        return None, ax
    return plt.subplots(figsize=figsize)


def _finish(fig, ax, tight: bool = True):
    """The figure to return: the new one (laid out) or the one ``ax`` was drawn into."""
    if fig is None:
        return ax.figure
    if tight:
        fig.tight_layout()
    return fig


def _outline_hist(ax, values, value_range, bins: int, color: str, label: str) -> None:
    """A density histogram drawn as an outline (sparse outputs over a filled dense one)."""
    ax.hist(
        values,
        bins=bins,
        range=value_range,
        density=True,
        histtype="step",
        lw=1.4,
        color=color,
        label=label,
    )


def plot_neuron_histogram(
    values, wd: float | None = None, title: str = "", ax=None, bins: int = 120, color: str = "C0"
):
    """Histogram of one neuron's z-scored outputs ``[tokens]`` with the N(0, 1) density."""
    fig, ax = _own_axes(ax, (4.5, 3.2))
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
    return _finish(fig, ax, tight=False)


def plot_layer_grid(
    activations, table: pd.DataFrame, hook: str, per_group: int = 3, token_rows=None
):
    """Top / median / bottom WD neurons of one hook, one row each.

    ``activations`` is the hook's ``[tokens, neurons]`` array; ``table`` the ranking table;
    ``token_rows`` (int indices, optional) the tokens the table's statistics kept.
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
            values = activations[:, int(row["neuron"])]
            if token_rows is not None:
                values = values[token_rows]
            values = np.asarray(values, dtype=np.float64)
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
    """Perplexity of each ablation setting: one panel per mode, the dense model dashed in each.

    ``results`` is an ``ablation.csv`` table (:func:`~wasserstein_neurons.ablation.run_ablation`;
    one written before the activation modes, without ``mode``, reads as all ``weights``).
    ``weights``: perplexity vs neuron sparsity, one line per strategy; ``threshold``: vs
    activation sparsity, one line per strategy and scope (``all`` neurons, ``all but`` a set, or
    only the set) and rule; ``zero`` / ``mean`` / ``resample``: one point per strategy.  The
    spread over seeds (``random``) is a shaded band or an error bar.
    """
    if "mode" not in results.columns:
        results = results.assign(mode=np.where(results["strategy"] == "dense", "dense", "weights"))
    modes = [m for m in dict.fromkeys(results["mode"]) if m != "dense"] or ["weights"]
    ncols = min(3, len(modes))
    nrows = -(-len(modes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(modes) :]:
        ax.set_visible(False)
    dense = results[results["strategy"] == "dense"]
    for ax, mode in zip(axes.flat, modes, strict=False):
        if len(dense):
            ax.axhline(dense["perplexity"].iloc[0], color="k", ls="--", lw=1, label="dense")
        rows = results[results["mode"] == mode]
        if mode == "weights":
            _ablation_curves(ax, rows, "neuron_sparsity", ["strategy"])
            ax.set_xlabel("neuron sparsity (fraction of each selected row zeroed)")
        elif mode == "threshold":
            _ablation_curves(ax, rows, "activation_sparsity", ["strategy", "scope", "rule"])
            ax.set_xlabel("activation sparsity (calibration quantile of |a|)")
        else:
            _ablation_points(ax, rows)
        sign = rows["sign"].iloc[0] if mode == "zero" and "sign" in rows else ""
        ax.set_title(mode + (f" (sign {sign})" if sign and sign != "both" else ""), fontsize=10)
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        low, high = ax.get_ylim()
        if high > 20 * low:  # several decades: label the decades only
            ax.yaxis.set_minor_formatter(plt.NullFormatter())
        ax.legend(fontsize=7)
    fig.suptitle(title or "Ablating neuron sets", fontsize=10)
    fig.tight_layout()
    return fig


def _ablation_label(key: dict) -> str:
    """Legend label of one curve: the strategy, with the threshold scope and rule."""
    strategy, scope, rule = key["strategy"], key.get("scope", ""), key.get("rule", "")
    label = {"all": "all neurons", "complement": f"all but {strategy}"}.get(scope, strategy)
    return label + (" (uniform)" if rule == "uniform" else "")


def _ablation_curves(ax, rows: pd.DataFrame, x: str, keys: list[str]) -> None:
    """One line per ``keys`` group: mean perplexity vs ``x``, min-max band over seeds."""
    keys = [k for k in keys if k in rows.columns]
    for i, (values, group) in enumerate(rows.groupby(keys, sort=False, dropna=False)):
        key = dict(zip(keys, values if isinstance(values, tuple) else (values,), strict=True))
        stats = group.groupby(x)["perplexity"].agg(["mean", "min", "max"])
        n_seeds = group["seed"].nunique()
        label = _ablation_label(key) + (f" ({n_seeds} seeds)" if n_seeds > 1 else "")
        ax.plot(stats.index.to_numpy(), stats["mean"], "o-", color=f"C{i}", label=label)
        if n_seeds > 1:
            ax.fill_between(stats.index, stats["min"], stats["max"], color=f"C{i}", alpha=0.2)


def _ablation_points(ax, rows: pd.DataFrame) -> None:
    """One point per strategy (mean over seeds, min-max error bar)."""
    stats = rows.groupby("strategy", sort=False)["perplexity"].agg(["mean", "min", "max"])
    x = np.arange(len(stats))
    err = np.vstack([stats["mean"] - stats["min"], stats["max"] - stats["mean"]])
    for i, strategy in enumerate(stats.index):
        ax.errorbar(
            x[i],
            stats["mean"].iloc[i],
            yerr=err[:, i : i + 1],
            fmt="o",
            color=f"C{i}",
            capsize=3,
            label=strategy,
        )
    ax.set_xticks(x, list(stats.index), fontsize=8)
    ax.set_xlabel("neurons intervened on")


# --------------------------------------------------------------------------------------------
# Disentanglement (Sparse Expansion) figures
# --------------------------------------------------------------------------------------------


def _plain_log_ticks(ax) -> None:
    """Label a log y axis with plain numbers (``20``, not ``2 x 10^1``)."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)


def _central_range(*arrays, q: float = 0.01) -> tuple[float, float]:
    """``[q, 100 - q]`` percentiles of the pooled finite values (a unit range if constant)."""
    v = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    v = v[np.isfinite(v)]
    if v.size == 0:
        return -1.0, 1.0
    lo, hi = np.percentile(v, [q, 100.0 - q])
    if hi <= lo:
        lo, hi = float(v.min()) - 0.5, float(v.max()) + 0.5
    return float(lo), float(hi)


def _expert_colors(k: int) -> list:
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(c % cmap.N) for c in range(k)]


def plot_sparse_vs_dense(
    dense, sparse: dict, title: str = "", ax=None, bins: int = 100, log: bool = False
):
    """Histograms of one neuron's dense outputs and of sparse reconstructions of them.

    Parameters
    ----------
    dense : array-like, shape ``[tokens]``
        Dense outputs (pre-activations) on held-out tokens.
    sparse : dict[str, array-like]
        Label (e.g. ``"SparseGPT"``, ``"SE k=16"``) -> outputs ``[tokens]`` of the same tokens.
        The legend gives each one's W1 distance to the dense sample
        (``scipy.stats.wasserstein_distance``, in output units).
    title : str
    ax : matplotlib Axes, optional
    bins : int
    log : bool
        Log-scaled density axis (shows the tails).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from scipy.stats import wasserstein_distance

    fig, ax = _own_axes(ax, (5.0, 3.4))
    dense = np.asarray(dense, dtype=np.float64).ravel()
    lo, hi = _central_range(dense, *sparse.values())
    ax.hist(dense, bins=bins, range=(lo, hi), density=True, color="0.55", alpha=0.55, label="dense")
    for i, (label, values) in enumerate(sparse.items()):
        values = np.asarray(values, dtype=np.float64).ravel()
        w1 = wasserstein_distance(values, dense)
        _outline_hist(ax, values, (lo, hi), bins, f"C{i}", f"{label}  W1={w1:.3g}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("output (pre-activation); central 99.98% shown")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _finish(fig, ax)


def plot_outputs_by_expert(
    values, labels, title: str = "", ax=None, bins: int = 100, stacked: bool = True
):
    """One neuron's dense outputs split by the expert each token is routed to.

    Parameters
    ----------
    values : array-like, shape ``[tokens]``
        Dense outputs.
    labels : array-like of int, shape ``[tokens]``
        Expert of each token (``0..k-1``); one colour per expert.
    title : str
    ax : matplotlib Axes, optional
    bins : int
    stacked : bool
        Stack the per-expert histograms (they add up to the neuron's histogram) or overlay
        them as outlines.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _own_axes(ax, (5.0, 3.4))
    values = np.asarray(values, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(np.int64).ravel()
    k = int(labels.max()) + 1 if labels.size else 1
    colors = _expert_colors(k)
    present = [c for c in range(k) if np.any(labels == c)]
    lo, hi = _central_range(values)
    ax.hist(
        [values[labels == c] for c in present],
        bins=bins,
        range=(lo, hi),
        stacked=stacked,
        histtype="stepfilled" if stacked else "step",
        color=[colors[c] for c in present],
        alpha=0.85 if stacked else 1.0,
        label=[f"expert {c} (n={int(np.sum(labels == c))})" for c in present],
    )
    if len(present) <= 8:
        ax.legend(fontsize=6)
    ax.set_xlabel("dense output; central 99.98% shown")
    ax.set_ylabel("tokens")
    ax.set_title(title or f"dense outputs by expert ({k} experts)", fontsize=9)
    return _finish(fig, ax)


def plot_ri_vs_wd(table: pd.DataFrame, experts, top_column: str = "is_top"):
    """Relative improvement of Sparse Expansion over SparseGPT vs WD, one panel per ``k``.

    Parameters
    ----------
    table : pd.DataFrame
        Per-neuron table with ``wd`` and ``ri_k{k}`` columns (and optionally a boolean
        ``top_column`` marking the Wasserstein neurons, drawn in red).
    experts : int or sequence of int
        Numbers of experts to show.

    Returns
    -------
    matplotlib.figure.Figure
        Titles give Spearman's ρ between RI and WD.
    """
    from scipy.stats import spearmanr

    ks = [experts] if np.isscalar(experts) else list(experts)
    fig, axes = plt.subplots(1, len(ks), figsize=(3.6 * len(ks), 3.3), squeeze=False)
    top = (
        table[top_column].to_numpy(dtype=bool)
        if top_column in table
        else np.zeros(len(table), bool)
    )
    wd = table["wd"].to_numpy(dtype=np.float64)
    for ax, k in zip(axes[0], ks, strict=True):
        ri = table[f"ri_k{k}"].to_numpy(dtype=np.float64)
        ok = np.isfinite(ri) & np.isfinite(wd)
        rho = spearmanr(wd[ok], ri[ok]).statistic if ok.sum() > 2 else np.nan
        ax.scatter(wd[ok & ~top], ri[ok & ~top], s=3, alpha=0.35, color="C0", label="neurons")
        if np.any(ok & top):
            ax.scatter(wd[ok & top], ri[ok & top], s=8, color="C3", label="top WD")
        ax.axhline(0.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("WD (dense outputs)")
        ax.set_title(f"{k} experts: Spearman ρ = {rho:.2f}", fontsize=9)
    axes[0, 0].set_ylabel("RI = (err_SGPT - err_SE) / err_SGPT")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_expansion_panels(
    dense, sparse_by_k: dict, labels_by_k: dict, title: str = "", bins: int = 80
):
    """The paper's second central figure: one neuron under Sparse Expansion as ``k`` grows.

    Top row, one panel per ``k``: the dense output histogram and the sparse one (``k = 1`` is
    SparseGPT), W1(sparse, dense) in the panel title — it shrinks as ``k`` grows for a
    Wasserstein neuron. Bottom row: the dense outputs split by expert (stacked, one colour per
    expert), with the cluster-size-weighted WD of the per-expert distributions,
    :math:`\\sum_c (n_c / n)\\, \\mathrm{WD}_c`.

    Parameters
    ----------
    dense : array-like, shape ``[tokens]``
    sparse_by_k : dict[int, array-like]
        ``k`` -> sparse outputs ``[tokens]``.
    labels_by_k : dict[int, array-like]
        ``k`` -> expert of every token ``[tokens]``.
    title : str
    bins : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    from scipy.stats import wasserstein_distance

    from .wasserstein import wasserstein_to_gaussian

    ks = sorted(sparse_by_k)
    dense = np.asarray(dense, dtype=np.float64).ravel()
    lo, hi = _central_range(dense, *sparse_by_k.values())
    fig, axes = plt.subplots(2, len(ks), figsize=(3.6 * len(ks), 5.8), squeeze=False)
    for i, k in enumerate(ks):
        ax = axes[0, i]
        values = np.asarray(sparse_by_k[k], dtype=np.float64).ravel()
        w1 = wasserstein_distance(values, dense)
        ax.hist(
            dense, bins=bins, range=(lo, hi), density=True, color="0.55", alpha=0.55, label="dense"
        )
        label = "SparseGPT" if k == 1 else f"SE, {k} experts"
        _outline_hist(ax, values, (lo, hi), bins, "C3", label)
        ax.set_title(f"k={k}: W1(sparse, dense) = {w1:.3g}", fontsize=9)
        ax.legend(fontsize=7)
        ax.set_yticks([])
        labels = np.asarray(labels_by_k[k]).astype(np.int64).ravel()
        sizes = np.bincount(labels, minlength=k)
        wds = np.full(k, np.nan)
        for c in range(k):
            if sizes[c] >= 2:
                wds[c] = float(wasserstein_to_gaussian(dense[labels == c][:, None])[0])
        ok = np.isfinite(wds)
        weighted = float(np.sum(sizes[ok] * wds[ok]) / np.sum(sizes[ok])) if ok.any() else np.nan
        plot_outputs_by_expert(dense, labels, ax=axes[1, i], bins=bins)
        axes[1, i].set_title(f"{k} expert(s): weighted per-expert WD = {weighted:.3f}", fontsize=9)
        axes[1, i].set_xlim(lo, hi)
        if i:
            axes[1, i].set_ylabel("")
    fig.suptitle(title or "Sparse Expansion of one neuron")
    fig.tight_layout()
    return fig


def plot_w1_vs_k(
    table: pd.DataFrame,
    experts,
    column: str = "w1_sparse_dense",
    top_column: str = "is_top",
    n_lines: int = 8,
):
    """W1 between sparse and dense output distributions vs the number of experts.

    Medians over the top-WD neurons (``top_column``) and over all neurons, plus thin lines for
    the ``n_lines`` highest-WD neurons. ``k = 1`` is read from ``{column}_k1`` or, when that is
    absent, from ``{column}_sparsegpt``.

    Parameters
    ----------
    table : pd.DataFrame
        Per-neuron table with ``{column}_k{k}`` columns (and ``wd``).
    experts : sequence of int
    column : str
        ``"w1_sparse_dense"`` (output units) or ``"w1z_sparse_dense"`` (in dense std units).
    top_column : str
    n_lines : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    ks = sorted(set(experts) | ({1} if f"{column}_sparsegpt" in table else set()))

    def col(k: int) -> np.ndarray:
        name = f"{column}_k{k}" if f"{column}_k{k}" in table else f"{column}_sparsegpt"
        return table[name].to_numpy(dtype=np.float64)

    values = np.stack([col(k) for k in ks], axis=1)  # [neurons, len(ks)]
    top = (
        table[top_column].to_numpy(dtype=bool)
        if top_column in table
        else np.zeros(len(table), bool)
    )
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    order = np.argsort(-np.nan_to_num(table["wd"].to_numpy(dtype=np.float64), nan=-np.inf))
    for j in order[:n_lines]:
        ax.plot(ks, values[j], color="C3", lw=0.7, alpha=0.4)
    if top.any():
        ax.plot(
            ks,
            np.nanmedian(values[top], axis=0),
            "o-",
            color="C3",
            lw=2,
            label=f"median, top-WD neurons ({int(top.sum())})",
        )
    ax.plot(
        ks,
        np.nanmedian(values, axis=0),
        "s-",
        color="C0",
        lw=2,
        label=f"median, all neurons ({len(table)})",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("experts k (1 = SparseGPT)")
    ax.set_ylabel("W1(sparse, dense)" + (" / dense std" if column.startswith("w1z") else ""))
    ax.set_title("Sparse vs dense output distributions", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_expansion_grid(results: pd.DataFrame, title: str = "", log_y: bool = True):
    """Perplexity vs sparsity: one line per method / number of experts.

    ``results`` is the table of :func:`~wasserstein_neurons.workflows.run_grid` (columns
    ``method, experts, sparsity, prunen, prunem, perplexity``).  Unstructured sparsities are
    placed left to right in increasing order, n:m patterns (e.g. ``2:4``) after them; the
    ``dense`` row is drawn as a horizontal reference line.  SparseGPT is labelled as the k = 1
    case of Sparse Expansion (SE).
    """
    df = results.copy()
    df["pattern"] = [
        f"{int(n)}:{int(m)}" if m else f"{s:g}"
        for s, n, m in zip(df["sparsity"], df["prunen"], df["prunem"], strict=True)
    ]
    dense = df[df["method"] == "dense"]
    df = df[df["method"] != "dense"]
    order = sorted(df["pattern"].unique(), key=lambda p: (":" in p, _pattern_sparsity(p), p))
    pos = {p: i for i, p in enumerate(order)}
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    if len(dense):
        ax.axhline(dense["perplexity"].iloc[0], color="k", ls="--", lw=1, label="dense")
    baselines = [m for m in df["method"].unique() if m not in ("sparsegpt", "sparse_expansion")]
    series = [(m, df[df["method"] == m], m, "s--") for m in baselines]
    se = df[df["method"].isin(["sparsegpt", "sparse_expansion"])]
    for k in sorted(se["experts"].unique()):
        label = "SparseGPT (SE k=1)" if k == 1 else f"SE k={int(k)}"
        series.append((f"k{k}", se[se["experts"] == k], label, "o-"))
    n_se = max(1, se["experts"].nunique())
    cmap = plt.get_cmap("viridis")
    for i, (key, group, label, style) in enumerate(series):
        group = group.assign(x=group["pattern"].map(pos)).sort_values("x")
        if key.startswith("k"):
            j = i - len(baselines)
            color = cmap(0.1 + 0.8 * j / max(1, n_se - 1))
        else:
            color = f"C{i + 3}"
        ax.plot(group["x"], group["perplexity"], style, color=color, label=label)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("sparsity of the MLP linears")
    ax.set_ylabel("perplexity")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or "Sparse Expansion vs one-shot pruning", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _pattern_sparsity(pattern: str) -> float:
    """Sparsity of a pattern label: ``"0.7"`` -> 0.7, ``"2:4"`` -> 0.5."""
    if ":" in pattern:
        n, m = pattern.split(":")
        return int(n) / int(m)
    return float(pattern)


def show_neuron(
    run, layer: int, neuron: int, kind: str | None = None, tokenizer=None, disentangle=None, **kw
):
    """One neuron's dashboard view, shown inline in a notebook (an HTML cell output).

    The same view as a page of ``wasserstein-neurons report`` (statistics, z-scored histogram
    against N(0, 1) on linear and log count axes, Q–Q plot, shaded contexts at both tails and
    across the quantiles), built from a ``rank`` run folder and its activation store without
    the model.

    Parameters
    ----------
    run : str, Path or RankResult
        The ``rank`` run folder (or the result of ``run_rank``).
    layer, neuron : int
        Which neuron; ``kind`` picks the hook of the layer (``hook_pre``, default the first).
    tokenizer : tokenizer or str, optional
        For the token strings (default: the run's model's tokenizer).
    disentangle : str or Path, optional
        A ``disentangle`` run folder whose results for this neuron join the view.
    **kw
        ``k``, ``per_quantile``, ``before``, ``after``, ``seed`` of
        :func:`~wasserstein_neurons.dashboard.neuron_data`.

    Returns
    -------
    InlineHTML
        A ``str`` of HTML with ``_repr_html_`` (Jupyter renders it).
    """
    from .dashboard import DisentangleRun, RankRun, inline_view  # the one upward import

    rank = RankRun(getattr(run, "out", run), tokenizer=tokenizer)
    hook = rank.hook_for(layer, kind)
    data = rank.neuron(hook, neuron, **kw)
    if disentangle is not None:
        data.overlays["disentangle"] = DisentangleRun(disentangle).section(hook, neuron)
    return inline_view(data)
